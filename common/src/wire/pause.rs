//! The pause part of the protocol (version 4): the primary tells the replica site of an
//! operator's pause and resume, so that the replica's status shows the VM paused instead
//! of counting the pause as missed cycles.
//!
//! `Welcome` carries the pause the replica has recorded (`paused`: since when, seconds since
//! the epoch on the primary's clock, as the primary said). After it the shipper puts the
//! replica right: paused, it sends `Paused { since }` unless the replica recorded that very
//! pause; not paused, it sends `Resumed { at }` if the replica still records one. The
//! applier saves the change before it answers `PauseNoted` with the pause it now records,
//! so a lost answer only makes the shipper ask again, and asking again changes nothing.

use super::{Message, WireError, R, T_PAUSED, T_PAUSE_NOTED, T_RESUMED, W};

impl W<'_> {
    /// An optional time: a 0/1 flag, then the seconds.
    pub(super) fn opt_time(&mut self, t: &Option<u64>) {
        match t {
            Some(t) => {
                self.u8(1);
                self.u64(*t);
            }
            None => self.u8(0),
        }
    }
}

impl R<'_> {
    pub(super) fn opt_time(&mut self) -> Result<Option<u64>, WireError> {
        Ok(match self.flag()? {
            false => None,
            true => Some(self.u64()?),
        })
    }
}

pub(super) fn encode(w: &mut W<'_>, m: &Message) {
    match m {
        Message::Paused { since } => {
            w.u8(T_PAUSED);
            w.u64(*since);
        }
        Message::Resumed { at } => {
            w.u8(T_RESUMED);
            w.u64(*at);
        }
        Message::PauseNoted { paused } => {
            w.u8(T_PAUSE_NOTED);
            w.opt_time(paused);
        }
        _ => unreachable!("only pause messages are encoded here"),
    }
}

pub(super) fn decode(t: u8, r: &mut R<'_>) -> Result<Message, WireError> {
    Ok(match t {
        T_PAUSED => Message::Paused { since: r.u64()? },
        T_RESUMED => Message::Resumed { at: r.u64()? },
        T_PAUSE_NOTED => Message::PauseNoted {
            paused: r.opt_time()?,
        },
        t => return Err(WireError::UnknownType(t)),
    })
}
