//! The VM definition the shipper keeps on the replica site: read from the file the
//! configuration names (`definition = "FILE"`), checked as the replica will check it, and
//! rendered self-contained (`VmDefinition::to_toml()`, a libvirt template inlined) with the
//! configuration's `[reverse]` target.
//!
//! The file is read again before each connection and each freeze, so an edited definition
//! reaches the replica with the next cycle, without a restart; a reloaded configuration
//! (SIGHUP, `reload`) may name another file or `[reverse]` target ([`Source`]). A definition
//! that cannot be read or checked is said in the log (at most once a minute) and not sent:
//! replication goes on, and the replica keeps the last good one it received.

use std::time::Duration;

use vmreplica_common::error_limited;
use vmreplica_common::wire::MAX_DEFINITION;
use vmreplica_vm::VmDefinition;

use std::path::PathBuf;

use vmreplica_common::wire::ReverseTarget;

use crate::config::ShipperConfig;
use crate::session::Definition;

/// Where the definition comes from: the configuration's `definition` and `[reverse]`, as
/// last (re)loaded.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub vm: String,
    pub definition: Option<PathBuf>,
    pub reverse: Option<ReverseTarget>,
}

impl Source {
    pub fn of(cfg: &ShipperConfig) -> Source {
        Source {
            vm: cfg.vm.clone(),
            definition: cfg.definition.clone(),
            reverse: cfg.reverse.as_ref().map(|r| ReverseTarget {
                replica: r.replica.clone(),
                server_name: r.server_name.clone(),
            }),
        }
    }
}

/// Why a configured definition is not sent.
pub fn check(cfg: &Source) -> Result<Option<Definition>, String> {
    let Some(path) = &cfg.definition else {
        return Ok(cfg
            .reverse
            .clone()
            .map(|r| Definition::new(String::new(), Some(r))));
    };
    let def = VmDefinition::load(path).map_err(|e| e.to_string())?;
    if def.name() != cfg.vm {
        return Err(format!(
            "VM definition {}: it defines VM {:?}, but this shipper protects {:?}; give {}'s \
             definition",
            path.display(),
            def.name(),
            cfg.vm,
            cfg.vm
        ));
    }
    let text = def.to_toml();
    if text.len() > MAX_DEFINITION as usize {
        return Err(format!(
            "VM definition {}: {} bytes rendered, more than the {MAX_DEFINITION} a definition \
             may hold",
            path.display(),
            text.len()
        ));
    }
    Ok(Some(Definition::new(text, cfg.reverse.clone())))
}

/// [`check`], with a failure logged (rate-limited) instead of returned.
pub fn load(cfg: &Source) -> Option<Definition> {
    match check(cfg) {
        Ok(d) => d,
        Err(e) => {
            error_limited!(
                Duration::from_secs(60),
                vm = cfg.vm,
                "{e}; the definition is not sent (replication goes on, the replica keeps the \
                 last one it received)"
            );
            None
        }
    }
}
