//! What an operator asks of a running shipper: control-socket commands (status, pause,
//! resume, resync, set, reload) and configuration reloads.

use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use vmreplica_ops::status::VmStatus;
use vmreplica_tracker::control::{self, Request};

use super::{mark_resync, tracker_error, Report};
use crate::config::ShipperConfig;
use crate::control::Command;
use crate::ops::{Ops, Settings};
use crate::session::{Event, ShipperSession};

/// Reads the configuration file again and applies what may change at run time.
pub(super) fn reload_config(
    s: &mut ShipperSession,
    ops: &mut Ops,
    by: &str,
) -> Result<Value, String> {
    let new = ShipperConfig::load(&ops.config_path).map_err(|e| {
        tracing::error!("reload: {e}; the settings in force stay");
        e.to_string()
    })?;
    if new.vm != ops.started.vm {
        let e = format!(
            "reload: {} now configures VM {}, but this shipper ships VM {}: nothing was \
             reloaded (put the VM's name back; another VM needs its own shipper)",
            ops.config_path.display(),
            new.vm,
            ops.started.vm
        );
        tracing::error!("{e}");
        return Err(e);
    }
    let restart = ops.started.restart_only_changes(&new);
    if !restart.is_empty() {
        tracing::warn!(
            vm = ops.vm,
            "reload: {} changed in {}: a running shipper keeps them until it restarts; the \
             other settings are in force now",
            restart.join(", "),
            ops.config_path.display()
        );
    }
    let settings = Settings::of(&new);
    let interval = settings.interval();
    let mut changed = ops.apply(settings, by);
    // A definition named, changed or dropped goes with the next cycle.
    ops.definition = crate::definition::Source::of(&new);
    s.set_definition(crate::definition::load(&ops.definition));
    if s.interval() != interval {
        s.handle(Event::SetInterval(interval), Instant::now());
    }
    if !restart.is_empty() {
        changed["restart_needed"] = serde_json::json!(restart);
    }
    Ok(changed)
}

/// Carries out an operator's request from the control socket.
pub(super) fn control_command(
    cmd: Command,
    s: &mut ShipperSession,
    ops: &mut Ops,
    tx: &mpsc::UnboundedSender<Report>,
) {
    use crate::control::Request as C;
    let Command { req, reply } = cmd;
    let r = match req {
        C::Status => {
            let f = status_job(ops);
            tokio::spawn(async move {
                let r = tokio::task::spawn_blocking(f)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|st| serde_json::to_value(st).map_err(|e| e.to_string()));
                let _ = reply.send(r);
            });
            return;
        }
        C::Pause => ops.set_paused(true).map(|changed| {
            let since = ops
                .state
                .history
                .paused_since()
                .unwrap_or_else(|| crate::ops::now_ms() / 1000);
            s.handle(Event::Pause { since }, Instant::now());
            json!({ "changed": changed })
        }),
        C::Resume => ops.set_paused(false).map(|changed| {
            s.handle(
                Event::Resume {
                    at: resumed_at(ops),
                },
                Instant::now(),
            );
            json!({ "changed": changed })
        }),
        C::Resync => {
            let (tx, socket) = (tx.clone(), ops.tracker.clone());
            tokio::spawn(async move {
                let r = mark_resync(&socket).await;
                let _ = tx.send(Report::ResyncMarked(r, reply));
            });
            return;
        }
        C::Set { key, value } => {
            let mut new = ops.settings.clone();
            new.set(&key, &value).map(|()| {
                let interval = new.interval();
                let changed = ops.apply(new, "set");
                if s.interval() != interval {
                    s.handle(Event::SetInterval(interval), Instant::now());
                }
                changed
            })
        }
        C::Reload => reload_config(s, ops, "reload"),
    };
    let _ = reply.send(r);
}

/// A job that makes the primary's status of the VM (it asks the tracker: run it on a
/// blocking thread).
/// When replication was last resumed (seconds since the epoch; 0: unknown).
pub(super) fn resumed_at(ops: &Ops) -> u64 {
    ops.state
        .history
        .pauses
        .last()
        .and_then(|p| p.to)
        .unwrap_or(0)
}

pub(super) fn status_job(ops: &Ops) -> impl FnOnce() -> VmStatus + Send + 'static {
    let (vm, state, live, socket) = (
        ops.vm.clone(),
        ops.state.clone(),
        ops.live(),
        ops.tracker.clone(),
    );
    let (interval, rpo_limit) = (
        ops.settings.interval_secs(),
        ops.settings.rpo_limit.as_secs(),
    );
    move || {
        let t = control::call(&socket, &Request::Status).map_err(|e| tracker_error(&socket, &e));
        crate::status::primary(crate::status::Inputs {
            vm: &vm,
            now_ms: crate::ops::now_ms(),
            state: &state,
            interval,
            rpo_limit,
            tracker: t.as_ref().map_err(|e| e.to_string()),
            live: Some(&live),
            processes: Vec::new(),
        })
    }
}
