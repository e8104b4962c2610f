//! Recovery plans: many VMs failed over in order, with hooks and operator pauses.
//!
//! ```toml
//! version = 1
//! name = "web shop"                       # optional, for messages
//!
//! [[group]]                               # groups run in order
//! name = "databases"
//! vms = ["db1", "db2"]                    # the VMs of a group fail over in parallel
//! before = { run = "systemctl stop shop-lb", timeout = "2m" }   # a shell command, or
//! after = { run = ["/usr/local/bin/check-db", "--all"], timeout = "10m" }  # an argv
//! pause = "Check the databases, then continue"   # wait for the operator after the group
//!
//! [[group]]
//! name = "web"
//! vms = ["web1"]
//!
//! [vm.db1]                                # optional, per VM
//! point = 42                              # test and unplanned failover: the point (default: latest)
//! start = false                           # boot the VM (default: true)
//! config = "/etc/vmreplica/db1/shipper.toml"   # planned failover: the VM's shipper config
//! ```
//!
//! Hooks get `VMREPLICA_PLAN`, `VMREPLICA_GROUP`, `VMREPLICA_VMS` (space-separated),
//! `VMREPLICA_MODE` (test, planned, unplanned) and `VMREPLICA_STEP` (before, after) in their
//! environment; a hook that exits non-zero or outlives its timeout (default 5 minutes) fails
//! the plan. See [`runner`] for how a plan runs.

pub mod runner;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The plan format version this code reads.
pub const PLAN_VERSION: u32 = 1;
const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("recovery plan {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("recovery plan {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Shell(String),
    Argv(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    run: RawCommand,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Option<String>,
    vms: Vec<String>,
    before: Option<RawHook>,
    after: Option<RawHook>,
    pause: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    point: Option<u64>,
    start: Option<bool>,
    config: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    version: Option<u32>,
    name: Option<String>,
    #[serde(default)]
    group: Vec<RawGroup>,
    #[serde(default)]
    vm: BTreeMap<String, RawVm>,
}

/// A hook: a command run before or after a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// The program and its arguments (a shell command is `/bin/sh -c COMMAND`).
    pub argv: Vec<String>,
    pub timeout: Duration,
}

impl Hook {
    /// The command as the operator wrote it, for messages.
    pub fn show(&self) -> String {
        match self.argv.as_slice() {
            [sh, c, cmd] if sh == "/bin/sh" && c == "-c" => cmd.clone(),
            a => a.join(" "),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub vms: Vec<String>,
    pub before: Option<Hook>,
    pub after: Option<Hook>,
    pub pause: Option<String>,
}

/// What a plan says of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmPlan {
    /// None: the newest point.
    pub point: Option<u64>,
    /// Boot the VM.
    pub start: bool,
    /// Its shipper's configuration (planned failover runs on the primary).
    pub config: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    pub groups: Vec<Group>,
    pub vms: BTreeMap<String, VmPlan>,
}

impl Plan {
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Plan::parse(&text, path)
    }

    /// Checks a plan's text; `path` names it in messages and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Plan, PlanError> {
        let bad = |reason: String| PlanError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        match raw.version {
            Some(PLAN_VERSION) => {}
            Some(v) => {
                return Err(bad(format!(
                    "version {v} is not supported (this vmreplica reads version {PLAN_VERSION})"
                )))
            }
            None => return Err(bad(format!("no version: add version = {PLAN_VERSION}"))),
        }
        if raw.group.is_empty() {
            return Err(bad(
                "no [[group]]: a plan lists its VMs in groups, run in order".into(),
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut seen = BTreeSet::new();
        let mut groups = Vec::new();
        for (i, g) in raw.group.into_iter().enumerate() {
            let name = g.name.unwrap_or_else(|| format!("{}", i + 1));
            let what = format!("group {name:?}");
            if g.vms.is_empty() {
                return Err(bad(format!("{what} has no VMs")));
            }
            for vm in &g.vms {
                vmreplica_common::validate_name(vm)
                    .map_err(|e| bad(format!("{what}: VM {vm:?}: {e}")))?;
                if !seen.insert(vm.clone()) {
                    return Err(bad(format!(
                        "{what}: VM {vm} is listed twice in the plan (a VM fails over once)"
                    )));
                }
            }
            let hook = |h: Option<RawHook>, step: &str| -> Result<Option<Hook>, PlanError> {
                let Some(h) = h else { return Ok(None) };
                let argv = match h.run {
                    RawCommand::Shell(s) if !s.trim().is_empty() => {
                        vec!["/bin/sh".to_string(), "-c".to_string(), s]
                    }
                    RawCommand::Argv(a) if a.first().is_some_and(|p| !p.is_empty()) => a,
                    _ => return Err(bad(format!("{what} {step}: run is empty"))),
                };
                let timeout = match h.timeout {
                    None => DEFAULT_HOOK_TIMEOUT,
                    Some(t) => humantime::parse_duration(&t)
                        .ok()
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| {
                            bad(format!(
                                "{what} {step}: timeout {t:?} is not a duration (30s, 5m, 1h)"
                            ))
                        })?,
                };
                Ok(Some(Hook { argv, timeout }))
            };
            groups.push(Group {
                before: hook(g.before, "before")?,
                after: hook(g.after, "after")?,
                pause: g.pause.filter(|p| !p.trim().is_empty()),
                vms: g.vms,
                name,
            });
        }
        let mut vms = BTreeMap::new();
        for name in &seen {
            vms.insert(
                name.clone(),
                VmPlan {
                    start: true,
                    ..VmPlan::default()
                },
            );
        }
        for (name, v) in raw.vm {
            let Some(p) = vms.get_mut(&name) else {
                return Err(bad(format!(
                    "[vm.{name}]: VM {name} is in no group (add it to a group's vms)"
                )));
            };
            p.point = v.point;
            p.start = v.start.unwrap_or(true);
            p.config = v
                .config
                .map(|c| if c.is_absolute() { c } else { base.join(c) });
        }
        Ok(Plan {
            name: raw.name.unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "plan".into())
            }),
            groups,
            vms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
version = 1
name = "shop"
[[group]]
name = "db"
vms = ["db1", "db2"]
before = { run = "echo hi", timeout = "2m" }
after = { run = ["/bin/true", "x"] }
pause = "check"
[[group]]
vms = ["web1"]
[vm.db1]
point = 42
start = false
config = "db1/shipper.toml"
"#;

    #[test]
    fn plans_parse_with_defaults_and_careless_ones_are_refused() {
        let p = Plan::parse(PLAN, Path::new("/etc/plans/shop.toml")).unwrap();
        assert_eq!(p.name, "shop");
        assert_eq!(p.groups.len(), 2);
        let g = &p.groups[0];
        assert_eq!(g.vms, vec!["db1", "db2"]);
        let before = g.before.as_ref().unwrap();
        assert_eq!(before.argv, vec!["/bin/sh", "-c", "echo hi"]);
        assert_eq!(before.timeout, Duration::from_secs(120));
        assert_eq!(before.show(), "echo hi");
        assert_eq!(g.after.as_ref().unwrap().timeout, DEFAULT_HOOK_TIMEOUT);
        assert_eq!(g.pause.as_deref(), Some("check"));
        assert_eq!(p.groups[1].name, "2");
        assert_eq!(
            p.vms["db1"],
            VmPlan {
                point: Some(42),
                start: false,
                config: Some(PathBuf::from("/etc/plans/db1/shipper.toml"))
            }
        );
        assert!(p.vms["web1"].start && p.vms["web1"].point.is_none());

        for (bad, want) in [
            ("[[group]]\nvms = [\"a\"]", "no version"),
            ("version = 2\n[[group]]\nvms = [\"a\"]", "version 2"),
            ("version = 1", "no [[group]]"),
            ("version = 1\n[[group]]\nvms = []", "has no VMs"),
            ("version = 1\n[[group]]\nvms = [\"../x\"]", "VM \"../x\""),
            (
                "version = 1\n[[group]]\nvms = [\"a\"]\n[[group]]\nvms = [\"a\"]",
                "listed twice",
            ),
            (
                "version = 1\n[[group]]\nvms = [\"a\"]\nbefore = { run = \"\" }",
                "run is empty",
            ),
            (
                "version = 1\n[[group]]\nvms = [\"a\"]\nafter = { run = \"x\", timeout = \"soon\" }",
                "not a duration",
            ),
            ("version = 1\n[[group]]\nvms = [\"a\"]\n[vm.b]\npoint = 1", "in no group"),
            ("version = 1\n[[group]]\nvms = [\"a\"]\ncolour = 3", "colour"),
        ] {
            let e = Plan::parse(bad, Path::new("p.toml")).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("p.toml"), "{bad}: {e}");
        }
    }
}
