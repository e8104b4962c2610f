//! Starting a VM from the definition its primary shipped, detached from the applier (its own
//! process group; under systemd its own scope, so that a restart of the applier's service
//! does not take the VM with it), with each disk on an NBD URI of this site. The run
//! directory (`qmp.sock`, `qga.sock`, `console.log`, `qemu.log`, `qemu.pid`) is the
//! [`Instance`]'s; an applier that restarts finds the VM again by its pidfile's lock.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use vmreplica_vm::{
    Instance, LaunchError, Network, Started, StopOutcome, StopPolicy, VmDefinition,
};

/// How long a starting QEMU may take to answer on QMP.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `argv` as it runs detached from this process: under systemd (`INVOCATION_ID` set, and
/// `systemd-run` there) in a transient scope of its own named `unit`, else as it is (the
/// launcher gives it its own process group).
pub fn detached(argv: Vec<String>, unit: &str) -> Vec<String> {
    let under_systemd = std::env::var_os("INVOCATION_ID").is_some();
    let has_systemd_run = ["/usr/bin/systemd-run", "/bin/systemd-run"]
        .iter()
        .any(|p| Path::new(p).exists());
    if !(under_systemd && has_systemd_run) {
        return argv;
    }
    let mut out = vec![
        "systemd-run".to_string(),
        "--scope".into(),
        "--quiet".into(),
        "--collect".into(),
        format!("--unit={unit}"),
        "--".into(),
    ];
    out.extend(argv);
    out
}

/// Starts `def` in `run_dir` with `disks` (name → NBD URI) on `network`, detached; returns
/// once QMP answers.
pub fn start(
    run_dir: &Path,
    def: &VmDefinition,
    disks: BTreeMap<String, String>,
    network: Network,
    unit: &str,
) -> Result<Started, LaunchError> {
    let inst = Instance::new(run_dir);
    let argv = def.render_qemu(&inst.render_input(disks, network))?;
    inst.start(&detached(argv, unit), START_TIMEOUT)
}

/// Stops the VM of `run_dir`, if one runs: a test VM is thrown away, so the guest gets a
/// short while to power off before QEMU quits.
pub fn stop_test_vm(run_dir: &Path) -> Result<StopOutcome, LaunchError> {
    Instance::new(run_dir).stop(StopPolicy {
        powerdown: Duration::from_secs(5),
        ..StopPolicy::default()
    })
}

/// The pid of the VM running in `run_dir`, if any.
pub fn running(run_dir: &Path) -> Option<i32> {
    Instance::new(run_dir).pid().ok().flatten()
}
