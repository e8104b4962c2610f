//! Connecting to the applier: the QUIC endpoint, a connection and its control stream, the
//! hello, and an attempt's connections with the reader of its control stream.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::mpsc;
use vmreplica_common::lineage::Lineage;
use vmreplica_common::link::{self, Client, LinkError};
use vmreplica_common::tls::{self, Identity};
use vmreplica_common::wire::{Message, PROTOCOL_VERSION};

use super::{Link, Report};
use crate::config::ShipperConfig;
use crate::session::Event;
use crate::ship::ShipError;

pub fn resolve(addr: &str) -> Result<SocketAddr, ShipError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ShipError::Local(format!("cannot resolve replica address {addr:?}")))
}

pub fn endpoint(cfg: &ShipperConfig) -> Result<Client, ShipError> {
    let id = Identity::load(&cfg.cert, &cfg.key, &cfg.ca).map_err(LinkError::from)?;
    let remote = resolve(&cfg.replica)?;
    let bind: SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    Ok(link::client(bind, &id, &cfg.tuning)?)
}

/// One QUIC connection to the applier and its control stream; a certificate either side
/// refuses is reported in plain words: which side refused whose certificate, and why.
pub(crate) async fn open(
    ep: &Client,
    cfg: &ShipperConfig,
) -> Result<(Connection, (SendStream, RecvStream)), ShipError> {
    let remote = resolve(&cfg.replica)?;
    let refused = |reason: String| LinkError::Connect {
        peer: cfg.replica.clone(),
        reason: tls::describe_refusal(&reason, "primary", "replica"),
    };
    let conn = ep
        .connect(remote, &cfg.server_name)
        .map_err(|e| refused(e.to_string()))?
        .await
        .map_err(|e| refused(e.to_string()))?;
    let ctl = conn.open_bi().await.map_err(|e| refused(e.to_string()))?;
    Ok((conn, ctl))
}

/// Says hello on a control stream and returns the welcome. The replica checks this
/// primary's certificate after the handshake completed here: a refusal arrives as the
/// connection's end, on this first exchange.
pub(crate) async fn hello(
    cfg: &ShipperConfig,
    ctl: &mut (SendStream, RecvStream),
    lineage: Option<Lineage>,
) -> Result<Message, ShipError> {
    let refused = |reason: String| LinkError::Connect {
        peer: cfg.replica.clone(),
        reason: tls::describe_refusal(&reason, "primary", "replica"),
    };
    let r = async {
        link::send(
            &mut ctl.0,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                vm: cfg.vm.clone(),
                lineage,
            },
        )
        .await?;
        link::expect(&mut ctl.1).await
    }
    .await;
    match r {
        Ok(m) => Ok(m),
        Err(LinkError::Peer(reason)) => Err(ShipError::Refused { cycle: 0, reason }),
        Err(LinkError::Connection(c)) => Err(refused(c.to_string()).into()),
        Err(LinkError::Truncated) => Err(ShipError::Protocol(
            "the applier closed the control stream at hello: it may run an older vmreplica \
             (replication protocol 1); upgrade it"
                .into(),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Connects and says hello for the configured VM only: the replica's lineage and last
/// cycle (a certificate refused either way is said in plain words).
pub async fn greet(cfg: &ShipperConfig) -> Result<(Option<Lineage>, u64), ShipError> {
    let ep = endpoint(cfg)?;
    let (conn, mut ctl) = open(&ep, cfg).await?;
    let r = match hello(cfg, &mut ctl, None).await? {
        Message::Welcome {
            lineage,
            last_cycle,
            ..
        } => Ok((lineage, last_cycle)),
        other => Err(ShipError::Protocol(other.name().into())),
    };
    conn.close(0u32.into(), b"hello only");
    ep.endpoint.wait_idle().await;
    r
}

/// Connects `cfg.connections` times: the first connection's control stream carries the
/// session's messages (its reader feeds them back as events; checksums go to the planner);
/// the others say hello for the VM only, so data streams may use them.
pub(super) async fn connect(
    ep: &Client,
    cfg: &ShipperConfig,
    attempt: u64,
    tx: mpsc::UnboundedSender<Report>,
    hashes: Arc<Mutex<Option<mpsc::UnboundedSender<Message>>>>,
) -> Result<Link, ShipError> {
    let (first, (mut send, mut recv)) = open(ep, cfg).await?;
    let mut conns = vec![first.clone()];
    for _ in 1..cfg.connections {
        let (c, mut ctl) = open(ep, cfg).await?;
        match hello(cfg, &mut ctl, None).await? {
            Message::Welcome { .. } => {}
            other => return Err(ShipError::Protocol(other.name().to_string())),
        }
        conns.push(c);
    }
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            if link::send(&mut send, &m).await.is_err() {
                return;
            }
        }
    });
    let reason = |e: LinkError| match e {
        LinkError::Connection(c) => tls::describe_refusal(&c.to_string(), "primary", "replica"),
        LinkError::Truncated => "the applier closed the control stream (it may run an older \
                                 vmreplica, replication protocol 1: upgrade it)"
            .to_string(),
        e => e.to_string(),
    };
    tokio::spawn(async move {
        loop {
            match link::recv(&mut recv).await {
                Ok(Some(m @ Message::Hashes { .. })) => {
                    let h = hashes.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(h) = h {
                        let _ = h.send(m);
                    }
                }
                Ok(Some(msg)) => {
                    let _ = tx.send(Report::Session(Event::Message { attempt, msg }));
                }
                Ok(None) => {
                    let _ = tx.send(Report::Session(Event::Disconnected {
                        attempt,
                        reason: reason(LinkError::Truncated),
                    }));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Report::Session(Event::Disconnected {
                        attempt,
                        reason: reason(e),
                    }));
                    return;
                }
            }
        }
    });
    let _ = first;
    Ok(Link {
        attempt,
        conns,
        ctl: ctl_tx,
    })
}
