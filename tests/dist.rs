//! What `dist/` ships: the systemd units (checked by `systemd-analyze verify` and `security`
//! with the binary built here in place of /usr/local/bin/vmreplica), the sample VM
//! definition (rendered, its libvirt XML validated by libvirt's own schema, its QEMU command
//! line started by real QEMU with its disks on the tracker).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use vmreplica_vm::{Instance, Network, StopOutcome, StopPolicy, VmDefinition};

const MIB: u64 = 1 << 20;
const UNITS: [&str; 3] = [
    "vmreplica-tracker@.service",
    "vmreplica-shipper@.service",
    "vmreplica-applier.service",
];

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist")
}

/// The units with ExecStart pointing at the binary under test (verify checks it exists).
fn units_here(dir: &Path) {
    for u in UNITS {
        let text = std::fs::read_to_string(dist().join("systemd").join(u)).unwrap();
        assert!(
            text.contains("/usr/local/bin/vmreplica "),
            "{u} does not run /usr/local/bin/vmreplica"
        );
        std::fs::write(dir.join(u), text.replace("/usr/local/bin/vmreplica", bin())).unwrap();
    }
}

fn analyze(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        // Dependencies (the shipper's tracker) are found beside the units, then as usual.
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .current_dir(dir)
        .output()
        .expect("systemd-analyze (scripts/install-deps.sh installs systemd)")
}

#[test]
fn systemd_units_verify_cleanly_and_stay_hardened() {
    let dir = tempfile::tempdir().unwrap();
    units_here(dir.path());
    let instances = [
        "./vmreplica-tracker@vm1.service",
        "./vmreplica-shipper@vm1.service",
        "./vmreplica-applier.service",
    ];
    let mut args = vec!["verify"];
    args.extend(instances);
    let out = analyze(dir.path(), &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify warns about unknown keys and bad values without failing: any output is a finding.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );

    for u in instances {
        let out = analyze(dir.path(), &["security", "--offline=true", u]);
        let text = String::from_utf8_lossy(&out.stdout);
        let level: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|r| {
                r.split(": ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no exposure level for {u}:\n{text}"));
        assert!(level <= 2.0, "{u} is exposed {level} (was 1.6):\n{text}");
    }

    // Every role may write the runtime registry and event stream under a read-only /run
    // (`vmreplica status` finds the roles there), kept while any unit runs.
    for u in UNITS {
        let text = std::fs::read_to_string(dir.path().join(u)).unwrap();
        assert!(
            text.contains("RuntimeDirectory=vmreplica\n")
                && text.contains("RuntimeDirectoryPreserve=yes"),
            "{u}"
        );
    }
    // The tracker's ordering: the shipper needs it and starts after it.
    let shipper = std::fs::read_to_string(dir.path().join(UNITS[1])).unwrap();
    assert!(shipper.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(shipper.contains("Requires=vmreplica-tracker@%i.service"));
    assert!(shipper.contains("After=vmreplica-tracker@%i.service"));

    // A broken unit is caught: the test can fail.
    let bad = shipper.replace("ProtectSystem=strict", "ProtectSystem=sttrict");
    std::fs::write(dir.path().join("vmreplica-bad@.service"), bad).unwrap();
    let out = analyze(dir.path(), &["verify", "./vmreplica-bad@vm1.service"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("sttrict"));
}

#[test]
fn the_tracker_runs_without_capabilities_as_its_unit_runs_it() {
    // CapabilityBoundingSet= (none) and NoNewPrivileges=yes, as in the unit: it still
    // serves, tracks and uses io_uring.
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "vm1-sys.img", 64 * MIB);
    let state = dir.path().join("state");
    let log = dir.path().join("tracker.log");
    let mut child = Command::new("setpriv")
        .args([
            "--no-new-privs",
            "--bounding-set",
            "-all",
            "--inh-caps",
            "-all",
            "--",
        ])
        .arg(bin())
        .args(["tracker", "--state-dir"])
        .arg(&state)
        .arg("--disk")
        .arg(format!("sys={}", img.display()))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let sock = state.join("nbd.sock");
    let t0 = std::time::Instant::now();
    while !state.join("control.sock").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "tracker did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///sys?socket={}", sock.display());
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 1M 64K"])
        .arg(&uri));
    let status = stdout(
        Command::new(bin())
            .args(["ctl", "--socket"])
            .arg(state.join("control.sock"))
            .arg("status"),
    );
    let caps = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    assert!(caps.contains("CapEff:\t0000000000000000"), "{caps}");
    // SAFETY: kill(2) on the tracker this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("engine=io_uring") || log.contains("engine=\"io_uring\""),
        "{log}"
    );
    assert!(status.contains("dirty"), "{status}");
}

fn sample_disks(t: &TrackerProc) -> BTreeMap<String, String> {
    [("sys", t.uri("sys")), ("data", t.uri("data"))]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b))
        .collect()
}

#[test]
fn the_sample_definition_renders_valid_libvirt_xml_and_a_command_line_qemu_starts() {
    let dir = tempfile::tempdir().unwrap();
    let sys = image(dir.path(), "vm1-sys.img", 64 * MIB);
    let data = image(dir.path(), "vm1-data.img", 64 * MIB);
    let t = TrackerProc::start(dir.path(), &[("sys", &sys), ("data", &data)], &[]);
    let def = VmDefinition::load(&dist().join("vm1.toml")).unwrap();
    assert_eq!(def.disks(), ["sys", "data"]);

    // libvirt's schema accepts the domain XML, production and test network alike.
    for args in [&[][..], &["--test-net"][..]] {
        let xml = stdout(
            Command::new(bin())
                .args(["vm", "render"])
                .arg(dist().join("vm1.toml"))
                .args(["--disk", &format!("sys={}", t.uri("sys"))])
                .args(["--disk", "data=nbds://primary-1.example:10809/data"])
                .arg("--libvirt")
                .args(args),
        );
        let f = dir.path().join("vm1.xml");
        std::fs::write(&f, &xml).unwrap();
        let out = Command::new("virt-xml-validate")
            .arg(&f)
            .arg("domain")
            .output()
            .expect("virt-xml-validate (scripts/install-deps.sh installs libvirt-clients)");
        assert!(
            out.status.success(),
            "{xml}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(xml.contains("<interface"), args.is_empty());
    }

    // dist/qemu-vm1.sh is the same command line, for running vm1 by hand.
    let rendered = stdout(
        Command::new(bin())
            .args(["vm", "render"])
            .arg(dist().join("vm1.toml"))
            .args([
                "--disk",
                "sys=nbd+unix:///sys?socket=/var/lib/vmreplica/vm1/nbd.sock",
            ])
            .args([
                "--disk",
                "data=nbd+unix:///data?socket=/var/lib/vmreplica/vm1/nbd.sock",
            ]),
    );
    let script = std::fs::read_to_string(dist().join("qemu-vm1.sh")).unwrap();
    assert_eq!(
        script.split_once("\nexec ").map(|(_, c)| c),
        Some(rendered.as_str()),
        "dist/qemu-vm1.sh differs from what dist/vm1.toml renders"
    );

    // The CLI names the definition and the missing disk.
    let out = Command::new(bin())
        .args(["vm", "render"])
        .arg(dist().join("vm1.toml"))
        .args(["--disk", &format!("sys={}", t.uri("sys"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("vm1.toml") && err.contains("\"data\""),
        "{err}"
    );

    // QEMU takes the command line, on the isolated network; KVM and `-cpu host` are not
    // available here, so they become TCG and `max`: everything else is the sample's.
    let run_dir = dir.path().join("run");
    let vm = Instance::new(&run_dir);
    let _guard = common::guest::KillOnDrop(vm.clone());
    let argv: Vec<String> = def
        .render_qemu(&vm.render_input(sample_disks(&t), Network::Test))
        .unwrap()
        .into_iter()
        .map(|a| match a.as_str() {
            "q35,accel=kvm" => "q35,accel=tcg".to_string(),
            "host" => "max".to_string(),
            "4096" => "256".to_string(),
            _ => a,
        })
        .chain(["-S".to_string()])
        .collect();
    assert!(argv.windows(2).any(|w| w == ["-nic", "none"]));
    let s = vm.start(&argv, Duration::from_secs(60)).unwrap();
    assert_eq!(s.status, "prelaunch");
    let mut q = vm.qmp(Duration::from_secs(10)).unwrap();
    let blocks = q.execute("query-block", None).unwrap();
    let files: Vec<String> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["inserted"]["file"].as_str().map(str::to_string))
        .collect();
    assert_eq!(files.len(), 2, "{blocks}");
    assert!(
        files
            .iter()
            .all(|f| f.contains(&t.socket.display().to_string())),
        "{files:?}"
    );
    drop(q);
    let out = vm
        .stop(StopPolicy {
            powerdown: Duration::from_secs(1),
            ..StopPolicy::default()
        })
        .unwrap();
    assert!(matches!(out, StopOutcome::Quit { .. }), "{out:?}");
    t.stop();
}
