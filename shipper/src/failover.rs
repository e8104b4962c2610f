//! The primary side's requests of failover, over the same authenticated link as cycles:
//! what the replica site is for a VM (its welcome), and an old primary's request to be
//! replicated back to after an unplanned failover (`Reverse`). A planned failover's last
//! cycle and promote run in the cycle session itself (`run::run_with`).

use vmreplica_common::lineage::Lineage;
use vmreplica_common::link::{self, LinkError};
use vmreplica_common::wire::{Endpoint, LineagePoint, Message, Role};

use crate::config::ShipperConfig;
use crate::run::{endpoint, hello, open};
use crate::ship::ShipError;

/// What the replica site said of the VM at hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub lineage: Option<Lineage>,
    pub last_cycle: u64,
    pub role: Role,
}

/// Says hello for the configured VM and returns the welcome.
pub async fn welcome(cfg: &ShipperConfig) -> Result<Welcome, ShipError> {
    let ep = endpoint(cfg)?;
    let (conn, mut ctl) = open(&ep, cfg).await?;
    let r = match hello(cfg, &mut ctl, None).await? {
        Message::Welcome {
            lineage,
            last_cycle,
            role,
            ..
        } => Ok(Welcome {
            lineage,
            last_cycle,
            role,
        }),
        other => Err(ShipError::Protocol(other.name().into())),
    };
    conn.close(0u32.into(), b"hello only");
    ep.endpoint.wait_idle().await;
    r
}

/// An old primary's request to be replicated back to.
#[derive(Clone, Debug)]
pub struct ReverseAsk {
    /// False: only check (commit, split brain); true: the new primary starts shipping back.
    pub start: bool,
    pub discard_local: bool,
    /// This site's last write (seconds since the epoch).
    pub last_write_at: u64,
    /// This site's applier, as the new primary reaches it.
    pub back: Endpoint,
}

/// What the new primary answered: its lineage, the point it continues, the failover's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseOk {
    pub lineage: Lineage,
    pub parent: LineagePoint,
    pub since: u64,
}

/// Asks the new primary (the configured replica) to replicate back to this site.
pub async fn reverse(cfg: &ShipperConfig, ask: &ReverseAsk) -> Result<ReverseOk, ShipError> {
    let ep = endpoint(cfg)?;
    let (conn, mut ctl) = open(&ep, cfg).await?;
    let r = async {
        match hello(cfg, &mut ctl, None).await? {
            Message::Welcome { .. } => {}
            other => return Err(ShipError::Protocol(other.name().into())),
        }
        link::send(
            &mut ctl.0,
            &Message::Reverse {
                start: ask.start,
                discard_local: ask.discard_local,
                last_write_at: ask.last_write_at,
                back: ask.back.clone(),
                here: Endpoint {
                    addr: cfg.replica.clone(),
                    name: cfg.server_name.clone(),
                },
                interval: cfg.interval_text.clone(),
            },
        )
        .await?;
        match link::expect(&mut ctl.1).await {
            Ok(Message::ReverseOk {
                lineage,
                parent,
                since,
            }) => Ok(ReverseOk {
                lineage,
                parent,
                since,
            }),
            Ok(other) => Err(ShipError::Protocol(other.name().into())),
            Err(LinkError::Peer(reason)) => Err(ShipError::Refused { cycle: 0, reason }),
            Err(e) => Err(e.into()),
        }
    }
    .await;
    conn.close(0u32.into(), b"reverse asked");
    ep.endpoint.wait_idle().await;
    r
}
