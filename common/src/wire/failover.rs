//! The failover part of the protocol (version 3): roles, points of a lineage, the
//! addresses sites give each other, and the codec of `Promote`, `Promoted`, `Reverse` and
//! `ReverseOk`.

use super::{
    Message, WireError, R, RESUME_PAGE, T_PROMOTE, T_PROMOTED, T_REVERSE, T_REVERSE_OK, W,
};
use crate::lineage::Lineage;
use crate::ranges::{Range, RangeSet};

/// Most bytes of a VM definition carried in `Promote`.
pub const MAX_DEFINITION: u32 = 256 * 1024;

/// A point of a lineage: its cycle `cycle` (a new lineage's parent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LineagePoint {
    pub lineage: Lineage,
    pub cycle: u64,
}

impl std::fmt::Display for LineagePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cycle {} of lineage {}", self.cycle, self.lineage)
    }
}

/// What a site is for a VM, as its applier tells a shipper in `Welcome`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// Takes cycles from its primary.
    #[default]
    Replica,
    /// Failed over (not committed yet): primary in `lineage`, which continues `parent`.
    FailedOver {
        lineage: Lineage,
        parent: LineagePoint,
    },
    /// Primary in `lineage` (a committed or planned failover), which continues `parent`.
    Primary {
        lineage: Lineage,
        parent: LineagePoint,
    },
    /// Waits for a `Reverse` cycle continuing `parent`; its divergent ranges follow the
    /// welcome in `Divergent` pages.
    ReversePending { parent: LineagePoint },
}

/// How one site's applier is reached: its address and the name in its certificate.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub addr: String,
    pub name: String,
}

impl W<'_> {
    pub(super) fn point(&mut self, p: &LineagePoint) {
        self.lineage(&p.lineage);
        self.u64(p.cycle);
    }

    pub(super) fn opt_point(&mut self, p: &Option<LineagePoint>) {
        match p {
            Some(p) => {
                self.u8(1);
                self.point(p);
            }
            None => self.u8(0),
        }
    }

    pub(super) fn role(&mut self, r: &Role) {
        match r {
            Role::Replica => self.u8(0),
            Role::FailedOver { lineage, parent } | Role::Primary { lineage, parent } => {
                self.u8(if matches!(r, Role::FailedOver { .. }) {
                    1
                } else {
                    2
                });
                self.lineage(lineage);
                self.point(parent);
            }
            Role::ReversePending { parent } => {
                self.u8(3);
                self.point(parent);
            }
        }
    }

    fn endpoint(&mut self, e: &Endpoint) {
        self.str(&e.addr);
        self.str(&e.name);
    }

    /// A long string (a VM definition): `u32` length, cut at [`MAX_DEFINITION`] bytes.
    fn long_str(&mut self, s: &str) {
        let mut n = s.len().min(MAX_DEFINITION as usize);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.u32(n as u32);
        self.0.extend_from_slice(&s.as_bytes()[..n]);
    }
}

impl R<'_> {
    pub(super) fn point(&mut self) -> Result<LineagePoint, WireError> {
        Ok(LineagePoint {
            lineage: self.lineage()?,
            cycle: self.u64()?,
        })
    }

    pub(super) fn opt_point(&mut self) -> Result<Option<LineagePoint>, WireError> {
        Ok(match self.flag()? {
            false => None,
            true => Some(self.point()?),
        })
    }

    pub(super) fn role(&mut self) -> Result<Role, WireError> {
        Ok(match self.u8()? {
            0 => Role::Replica,
            1 => Role::FailedOver {
                lineage: self.lineage()?,
                parent: self.point()?,
            },
            2 => Role::Primary {
                lineage: self.lineage()?,
                parent: self.point()?,
            },
            3 => Role::ReversePending {
                parent: self.point()?,
            },
            k => return Err(WireError::BadKind(k)),
        })
    }

    fn endpoint(&mut self) -> Result<Endpoint, WireError> {
        Ok(Endpoint {
            addr: self.str()?,
            name: self.str()?,
        })
    }

    fn long_str(&mut self) -> Result<String, WireError> {
        let n = self.u32()?;
        if n > MAX_DEFINITION {
            return Err(WireError::BadString);
        }
        String::from_utf8(self.take(n as usize, "long string")?.to_vec())
            .map_err(|_| WireError::BadString)
    }
}

pub(super) fn encode(w: &mut W<'_>, m: &Message) {
    match m {
        Message::Promote {
            lineage,
            cycle,
            back,
            here,
            interval,
            start,
            definition,
        } => {
            w.u8(T_PROMOTE);
            w.lineage(lineage);
            w.u64(*cycle);
            w.endpoint(back);
            w.endpoint(here);
            w.str(interval);
            w.bool(*start);
            match definition {
                Some(d) => {
                    w.u8(1);
                    w.long_str(d);
                }
                None => w.u8(0),
            }
        }
        Message::Promoted { lineage } => {
            w.u8(T_PROMOTED);
            w.lineage(lineage);
        }
        Message::Reverse {
            start,
            discard_local,
            last_write_at,
            back,
            here,
            interval,
        } => {
            w.u8(T_REVERSE);
            w.bool(*start);
            w.bool(*discard_local);
            w.u64(*last_write_at);
            w.endpoint(back);
            w.endpoint(here);
            w.str(interval);
        }
        Message::ReverseOk {
            lineage,
            parent,
            since,
        } => {
            w.u8(T_REVERSE_OK);
            w.lineage(lineage);
            w.point(parent);
            w.u64(*since);
        }
        _ => unreachable!("only failover messages are encoded here"),
    }
}

pub(super) fn decode(t: u8, r: &mut R<'_>) -> Result<Message, WireError> {
    Ok(match t {
        T_PROMOTE => Message::Promote {
            lineage: r.lineage()?,
            cycle: r.u64()?,
            back: r.endpoint()?,
            here: r.endpoint()?,
            interval: r.str()?,
            start: r.bool()?,
            definition: match r.flag()? {
                false => None,
                true => Some(r.long_str()?),
            },
        },
        T_PROMOTED => Message::Promoted {
            lineage: r.lineage()?,
        },
        T_REVERSE => Message::Reverse {
            start: r.bool()?,
            discard_local: r.bool()?,
            last_write_at: r.u64()?,
            back: r.endpoint()?,
            here: r.endpoint()?,
            interval: r.str()?,
        },
        T_REVERSE_OK => Message::ReverseOk {
            lineage: r.lineage()?,
            parent: r.point()?,
            since: r.u64()?,
        },
        t => return Err(WireError::UnknownType(t)),
    })
}

/// The refusal a site the VM failed over to gives its old primary's cycles: where it failed
/// over, and the commands that replicate back or resolve a split brain.
pub fn failed_over_message(vm: &str, role: &Role) -> Option<String> {
    let (lineage, parent, committed) = match role {
        Role::FailedOver { lineage, parent } => (lineage, parent, false),
        Role::Primary { lineage, parent } => (lineage, parent, true),
        _ => return None,
    };
    let commit = if committed {
        String::new()
    } else {
        format!("commit the failover here (`vmreplica failover commit {vm}`), then ")
    };
    Some(format!(
        "VM {vm} failed over to this site at {parent} (this site is its primary now, in \
         lineage {lineage}): it takes no cycles from the old primary, and nothing here was \
         changed. To replicate back to the old primary, {commit}run `vmreplica reverse {vm} \
         --config SHIPPER.toml` on the old primary. If the VM ran on both sites since {parent} \
         (a split brain), choose which site's changes to keep: `vmreplica reverse {vm} \
         --discard-local-changes` on the old primary keeps this site's; `vmreplica failover \
         abandon {vm}` here keeps the old primary's. The site overwritten keeps its state as a \
         recovery point"
    ))
}

/// A replica's divergent ranges as `Divergent` pages that each fit a frame (at least one
/// page, the last one marked).
pub fn divergent_pages(set: &RangeSet) -> Vec<Message> {
    let all: Vec<Range> = set.iter().collect();
    let mut pages: Vec<Message> = all
        .chunks(RESUME_PAGE)
        .map(|ranges| Message::Divergent {
            ranges: ranges.to_vec(),
            last: false,
        })
        .collect();
    if pages.is_empty() {
        pages.push(Message::Divergent {
            ranges: Vec::new(),
            last: false,
        });
    }
    if let Some(Message::Divergent { last, .. }) = pages.last_mut() {
        *last = true;
    }
    pages
}
