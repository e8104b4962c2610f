//! Recovery plans with the real processes: two VMs replicated to one applier; a plan of two
//! groups with hooks and a pause (answered on stdin) runs their test failovers in order; a
//! plan whose hook fails stops there and names what it had done; `plan test-stop` undoes a
//! test plan.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::site::*;
use common::testfo::*;
use common::*;

const LIMIT: Duration = Duration::from_secs(120);

/// Runs `vmreplica plan ARGS --store STORE` with `input` on stdin; (success, stdout, stderr).
fn plan(store: &std::path::Path, args: &[&str], input: &str) -> (bool, String, String) {
    let mut c = Command::new(bin())
        .arg("plan")
        .args(args)
        .arg("--store")
        .arg(store)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_plan_runs_groups_in_order_with_hooks_and_a_pause_and_a_failing_hook_stops_it() {
    let (dir, site, img, t1) = small_site(2);
    // A second VM on the same applier: its own tracker and shipper.
    let d2 = dir.path().join("vm2");
    std::fs::create_dir_all(&d2).unwrap();
    let img2 = image(&d2, "sys.img", 16 * MIB);
    fill_random(&img2, 1);
    let t2 = TrackerProc::start(&d2, &[("sys", &img2)], &[]);
    let c1 = site.config_with(&t1, "1s", "");
    let c2 = d2.join("shipper.toml");
    std::fs::write(
        &c2,
        std::fs::read_to_string(&c1)
            .unwrap()
            .replace("vm = \"vm1\"", "vm = \"vm2\"")
            .replace(
                &t1.control.display().to_string(),
                &t2.control.display().to_string(),
            ),
    )
    .unwrap();
    let _applier = site.applier();
    let _s1 = site.shipper(&c1, &[]);
    let s2 = site.shipper(&c2, &[]);
    let store = site.store.clone();
    let deadline = Instant::now() + LIMIT;
    let has_points =
        |vm: &str| store.join(vm).join("state.json").exists() && !points(&store, vm).is_empty();
    while !(has_points("vm1") && has_points("vm2")) {
        assert!(Instant::now() < deadline, "no points for both VMs");
        std::thread::sleep(Duration::from_millis(200));
    }

    let hooks = dir.path().join("hooks.log");
    let text = format!(
        r#"version = 1
name = "shop"
[[group]]
name = "db"
vms = ["vm1"]
before = {{ run = "echo before $VMREPLICA_PLAN $VMREPLICA_GROUP $VMREPLICA_VMS $VMREPLICA_MODE >> {h}" }}
after = {{ run = ["/bin/sh", "-c", "echo after $VMREPLICA_GROUP >> {h}"], timeout = "30s" }}
pause = "Check the database"
[[group]]
name = "web"
vms = ["vm2"]
before = {{ run = "echo before $VMREPLICA_GROUP >> {h}" }}
[vm.vm1]
start = false
[vm.vm2]
start = false
"#,
        h = hooks.display()
    );
    let p = dir.path().join("shop.toml");
    std::fs::write(&p, &text).unwrap();
    let ps = p.to_str().unwrap();

    let (ok, out, err) = plan(&store, &["failover", ps, "--test"], "\n");
    assert!(ok, "{out}\n{err}");
    assert_eq!(
        std::fs::read_to_string(&hooks).unwrap(),
        "before shop db vm1 test\nafter db\nbefore web\n"
    );
    for want in [
        "[1/2] group db (vm1)",
        "pause: Check the database",
        "press Enter",
        "[2/2] group web (vm2)",
        "vm1: ok",
        "vm2: ok",
        "nbd+unix:///sys?socket=",
        "plan \"shop\" done",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    // The pause came after group db's after hook, before group web.
    assert!(out.find("after hook: ok").unwrap() < out.find("pause:").unwrap());
    assert!(out.find("pause:").unwrap() < out.find("[2/2]").unwrap());
    let listed = tests_listed(&store);
    assert_eq!(listed.len(), 2, "{listed:?}");

    // Undone by plan test-stop.
    let (ok, out, err) = plan(&store, &["test-stop", ps], "");
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("vm1: 1 test failovers stopped"), "{out}");
    assert!(tests_listed(&store).is_empty());

    // The second group's hook fails: the plan stops there, names it and what it had done;
    // vm2 is not failed over. --yes answers the pause.
    std::fs::write(
        &p,
        text.replace("echo before $VMREPLICA_GROUP >>", "exit 7; echo >>"),
    )
    .unwrap();
    let (ok, out, err) = plan(&store, &["failover", ps, "--test", "--yes"], "");
    assert!(!ok, "{out}");
    assert!(out.contains("--yes: going on"), "{out}");
    for want in [
        "the plan stopped at group web: before hook",
        "exit status: 7",
        "done before it: group db: before hook; group db: test failover of vm1; group db: \
         after hook; group db: pause (answered)",
    ] {
        assert!(err.contains(want), "no {want:?} in:\n{err}");
    }
    let listed = tests_listed(&store);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["vm"], "vm1");
    plan(&store, &["test-stop", ps], "");

    // Stopped at the pause; a planned failover needs each VM's shipper configuration (refused
    // before anything runs); a bad plan is refused.
    let (ok, _, err) = plan(&store, &["failover", ps, "--test"], "q\n");
    assert!(!ok && err.contains("group db: pause"), "{err}");
    plan(&store, &["test-stop", ps], "");
    let (ok, out, err) = plan(&store, &["failover", ps, "--planned"], "");
    assert!(!ok && err.contains("[vm.vm1] config"), "{err}");
    assert!(!out.contains("[1/2]"), "ran: {out}");

    // An unplanned failover of the plan's second group (vm2, its primary gone): the disks
    // are served by this site; cancelled, vm2 replicates again.
    drop(s2);
    let p2 = dir.path().join("vm2-plan.toml");
    std::fs::write(
        &p2,
        "version = 1\n[[group]]\nname = \"web\"\nvms = [\"vm2\"]\n[vm.vm2]\nstart = false\n",
    )
    .unwrap();
    let (ok, out, err) = plan(
        &store,
        &["failover", p2.to_str().unwrap(), "--unplanned"],
        "",
    );
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("vm2: ok") && out.contains("disks served in"),
        "{out}"
    );
    run(Command::new(bin())
        .args(["failover", "cancel", "vm2", "--store"])
        .arg(&store));
    std::fs::write(&p, "version = 1\n[[group]]\nvms = [\"vm1\", \"vm1\"]\n").unwrap();
    let (ok, _, err) = plan(&store, &["failover", ps, "--test"], "");
    assert!(!ok && err.contains("shop.toml"), "{err}");

    let n = site.applied();
    site.wait_cycles(n, 2, LIMIT);
    site.assert_equal(&c1, &img);
}
