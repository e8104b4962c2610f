//! Which applier a command on a replica site talks to: the one serving `--store` (its admin
//! socket there, or `--admin-socket`). Test failovers, failovers and recovery plans share it.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::Value;
use vmreplica_applier::admin::{self, Request};

/// The store of the applier's service (`dist/systemd/vmreplica-applier.service`).
pub const DEFAULT_STORE: &str = "/var/lib/vmreplica-replicas";

/// Which applier: the one serving `--store` (its admin socket there, or `--admin-socket`).
#[derive(clap::Args, Clone)]
pub struct Site {
    /// This site's replica store (the one its applier serves).
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: PathBuf,
    /// The applier's admin socket (default: STORE/applier.sock).
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
}

impl Site {
    pub fn socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.store.join("applier.sock"))
    }

    /// Sends `req` to the applier. When none answers, the error says that `what` (a test
    /// failover, a failover) runs through it, and how to start it.
    pub fn call(&self, req: &Request, what: &str) -> Result<Value> {
        let socket = self.socket();
        match admin::call(&socket, req)? {
            Some(v) => Ok(v),
            None => bail!(
                "no applier answers on {} (store {}): {what} runs through this site's \
                 applier; start it (systemctl start vmreplica-applier, or vmreplica applier \
                 --store {} ...), or give --store/--admin-socket",
                socket.display(),
                self.store.display(),
                self.store.display()
            ),
        }
    }
}
