//! The cycle protocol's two state machines ([`ShipperSession`], [`ApplierSession`]) driven
//! against each other through a simulated network in virtual time, as quinn-proto tests its
//! connections: seeded, deterministic, thousands of steps per seed. Messages on a control
//! stream keep their order, data chunks arrive in any order, connections are cut with
//! messages in flight (and some of an old connection's chunks arrive after a new attempt
//! began), acknowledgements are lost, either side crashes and restarts at any step, the
//! tracker loses its state or gets an older one back, the replica store is restored from an
//! older copy, and a second shipper runs against the same tracker. The tracker and the
//! replica store are models in memory with the real lineage rules.
//!
//! Checked at every step: a generation is released only after the replica applied it (in
//! the tracker's lineage, with the frozen contents); the replica never commits a delta that
//! does not follow its last cycle; every point holds the primary's contents at its freeze.
//! At the end, with faults stopped, replication converges: the replica equals the primary.
//!
//! The VM definition travels along: the operator edits it now and then (sometimes into one
//! the replica refuses); a refusal never stops replication, and at the end the replica holds
//! the primary's last good definition.
//! A planned failover runs the same way: the guest stops, the tracker is sealed, a shipper in
//! planned mode ships the last generation, adopts, and asks the replica to `Promote`, while
//! links are cut, acknowledgements and answers lost, and either side crashes. Checked: the
//! replica is promoted only holding exactly the sealed disk, once, after the adoption, and
//! the shipper finishes with that very point and lineage.
//!
//! An operator pauses and resumes replication now and then (in its own test): while paused
//! nothing is frozen or shipped; the replica site is told of the pause through cut links
//! and crashes (it records exactly the operator's pause whenever the shipper says it was
//! told), keeps showing it after its applier restarts, and the resume ends it.
//!
//! `SIM_SEEDS=N` runs more seeds (CI runs a bounded number), `SIM_SEED=S` one.

// The harness lives in `simulated_pair/`. A crate root looks for its modules beside itself
// (in `tests/`, where each file is a test crate of its own), hence the paths.
#[path = "simulated_pair/model.rs"]
mod model;
#[path = "simulated_pair/net.rs"]
mod net;
#[path = "simulated_pair/sim/mod.rs"]
mod sim;

use std::collections::BTreeMap;
use std::time::Duration;

use net::Faults;
use sim::{definition, Sim};

fn run(seed: u64, steps: usize, locked: bool) -> Faults {
    eprintln!("SIM_SEED={seed}");
    let mut sim = Sim::new(seed);
    sim.locked = locked;
    sim.start_shipper(true);
    for _ in 0..steps {
        sim.step(true);
        sim.check_points();
    }
    // Faults stop: the guest stops writing, every shipper but one is gone; replication must
    // converge within a bounded number of steps.
    let ctx = format!("SIM_SEED={seed}");
    sim.keep_one_shipper();
    converge(&mut sim, &ctx);
    sim.faults
        .0
        .insert("cycles acknowledged", sim.applied_cycles as u32);
    sim.faults
        .0
        .insert("cycles committed", sim.committed.len() as u32);
    sim.faults
}

/// With faults stopped and one shipper (resumed, if paused), replication must converge
/// within a bounded number of steps: the replica equals the primary, in its lineage, with
/// its last good definition and no pause recorded.
fn converge(sim: &mut Sim, ctx: &str) {
    if sim.op_paused.is_some() {
        sim.toggle_pause();
    }
    // The last edit is one the replica keeps.
    sim.edit_definition(false);
    let want_definition = Some(definition(sim.definition).hash);
    let target = sim.disk.clone();
    let mut converged = false;
    for _ in 0..20_000 {
        sim.step(false);
        let done = sim.store.image == target
            && sim.store.receiving.is_none()
            && sim.store.lineage.is_some()
            && sim.store.lineage == sim.tracker.lineage
            && sim.tracker.frozen.is_none()
            && sim.store.definition == want_definition
            && sim.store.paused.is_none();
        if done {
            converged = true;
            break;
        }
        // Nothing in flight and no timer: advance virtual time to wake the shipper.
        sim.now += Duration::from_millis(50);
    }
    assert!(
        converged,
        "{ctx}: replication did not converge: replica {:?} primary {:?}, replica lineage {:?} at {} paused {:?}, tracker {:?} next {} frozen {:?}",
        sim.store.image,
        target,
        sim.store.lineage,
        sim.store.last_cycle,
        sim.store.paused,
        sim.tracker.lineage,
        sim.tracker.next_generation,
        sim.tracker.frozen.as_ref().map(|f| (f.0, f.1))
    );
    sim.check_points();
    assert!(
        !sim.committed.is_empty(),
        "{ctx}: no cycle was ever committed"
    );
}

fn seeds(default: u64) -> Vec<u64> {
    match std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => vec![s],
        None => {
            let n = std::env::var("SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default);
            (1..=n).collect()
        }
    }
}

/// Runs `seeds` and returns how often each fault happened across them.
fn run_all(seeds: Vec<u64>, locked: bool) -> BTreeMap<&'static str, u32> {
    let mut seen: BTreeMap<&'static str, u32> = BTreeMap::new();
    for seed in seeds {
        for (k, v) in run(seed, 4000, locked).0 {
            *seen.entry(k).or_default() += v;
        }
    }
    eprintln!("{seen:#?}");
    seen
}

/// Two shippers feeding from one tracker (as without `shipper.lock`): each may freeze, ship
/// and release, yet none releases a generation the replica did not apply (the release needs
/// the replica's proof), and one of them alone converges.
#[test]
fn two_shippers_on_one_tracker_never_release_what_the_replica_lacks() {
    let seen = run_all(
        seeds(60).into_iter().map(|s| s + 1_000_000).collect(),
        false,
    );
    assert!(seen.get("two shippers at once").copied().unwrap_or(0) > 0);
}

#[test]
fn simulated_pairs_survive_every_fault_and_converge() {
    let seen = run_all(seeds(150), true);
    for f in [
        "link cut",
        "shipper crash",
        "applier crash",
        "tracker state lost",
        "tracker state restored",
        "replica store restored",
        "second shipper refused",
        "lost acknowledgement",
        "stale chunk delivered",
        "a gap refused",
        "different lineages: stopped",
        "definition edited",
        "definition stored",
        "definition refused",
    ] {
        assert!(
            seen.get(f).copied().unwrap_or(0) > 0,
            "the seeds never exercised: {f}"
        );
    }
}

/// A planned failover after a run of replication with faults: the guest stops, the disk is
/// sealed, every shipper stops, and one in planned mode ships the last generation, adopts,
/// and promotes the replica through cut links, lost acknowledgements and answers, and
/// crashes of either side (shippers restart in planned mode). The replica is promoted once,
/// holding exactly the sealed disk, after the adoption; the shipper finishes with it.
#[test]
fn a_planned_failover_promotes_exactly_the_sealed_disk_once_through_faults() {
    let mut seen: BTreeMap<&'static str, u32> = BTreeMap::new();
    for seed in seeds(60) {
        let seed = seed + 2_000_000;
        eprintln!("SIM_SEED={seed}");
        let mut sim = Sim::new(seed);
        sim.start_shipper(true);
        for _ in 0..1500 {
            sim.step(true);
            sim.check_points();
        }
        // Replication settles (one shipper), so the planned failover starts from a pair that
        // replicates; the guest may still write while it does.
        let mut keep = true;
        for sh in (0..sim.shippers.len()).rev() {
            if sim.shippers[sh].alive && !std::mem::replace(&mut keep, false) {
                sim.shippers[sh].alive = false;
                sim.kill_conns(|c| c.shipper == sh);
            }
        }
        if !sim.shippers.iter().any(|s| s.alive) {
            sim.lock_holder = None;
            sim.start_shipper(true);
        }
        for _ in 0..20_000 {
            sim.step(false);
            if sim.store.lineage.is_some() && sim.store.lineage == sim.tracker.lineage {
                break;
            }
            sim.now += Duration::from_millis(50);
        }
        // The guest shuts down; the tracker is sealed; the running shippers stop.
        sim.tracker.sealed = true;
        sim.planned = true;
        for sh in 0..sim.shippers.len() {
            if sim.shippers[sh].alive {
                sim.shippers[sh].alive = false;
                sim.kill_conns(|c| c.shipper == sh);
            }
        }
        sim.pending.clear();
        sim.tracker_answers.clear();
        sim.lock_holder = None;
        // A tracker that lost its lineage would need a resync first; a restored one too: the
        // planned failover starts from a replicating pair.
        assert!(
            sim.tracker.lineage.is_some() && sim.tracker.lineage == sim.store.lineage,
            "SIM_SEED={seed}: replication did not settle before the planned failover"
        );
        sim.start_shipper(true);
        let mut steps = 0;
        while sim.finished.is_none() {
            steps += 1;
            assert!(
                steps < 30_000,
                "SIM_SEED={seed}: the planned failover did not finish: store {:?} at {}, role {:?}, tracker next {} frozen {:?}",
                sim.store.lineage,
                sim.store.last_cycle,
                sim.store.role,
                sim.tracker.next_generation,
                sim.tracker.frozen.as_ref().map(|f| f.0)
            );
            sim.step(steps < 3000);
            sim.check_points_unless_promoted();
            if !sim.shippers.iter().any(|s| s.alive) && sim.finished.is_none() {
                sim.lock_holder = None;
                sim.start_shipper(true);
            }
            sim.now += Duration::from_millis(20);
        }
        assert_eq!(
            sim.promotions, 1,
            "SIM_SEED={seed}: promoted {} times",
            sim.promotions
        );
        let (parent, _) = sim.finished.unwrap();
        assert_eq!(parent.cycle, sim.tracker.next_generation - 1);
        assert_eq!(sim.store.image, sim.disk);
        sim.faults.hit("planned failovers finished");
        for (k, v) in sim.faults.0 {
            *seen.entry(k).or_default() += v;
        }
    }
    eprintln!("{seen:#?}");
    for f in ["adopted", "link cut", "shipper crash", "applier crash"] {
        assert!(
            seen.get(f).copied().unwrap_or(0) > 0,
            "never exercised: {f}"
        );
    }
}

/// An operator pauses and resumes through every fault: nothing is frozen or shipped while
/// paused, and whenever the shipper says the replica site was told, the replica records
/// exactly that pause (checked in the drivers). Then, faults stopped and paused: the pause
/// reaches the replica (also when the link was down when it was made), survives an
/// applier restart, and the resume ends it before replication converges.
#[test]
fn pauses_reach_the_replica_through_faults_and_survive_its_restart() {
    let mut seen: BTreeMap<&'static str, u32> = BTreeMap::new();
    for seed in seeds(40) {
        let seed = seed + 3_000_000;
        eprintln!("SIM_SEED={seed}");
        let ctx = format!("SIM_SEED={seed}");
        let mut sim = Sim::new(seed);
        sim.pausing = true;
        sim.start_shipper(true);
        for _ in 0..3000 {
            sim.step(true);
            sim.check_points();
        }
        sim.keep_one_shipper();
        // Paused (anew), the connection that would tell it cut: told once one gets through.
        if sim.op_paused.is_some() {
            sim.toggle_pause();
        }
        sim.kill_conns(|_| true);
        sim.toggle_pause();
        sim.kill_conns(|_| true);
        let since = sim.op_paused.expect("paused");
        let sh = sim
            .shippers
            .iter()
            .position(|s| s.alive)
            .expect("a shipper");
        let mut told = false;
        for _ in 0..20_000 {
            sim.step(false);
            let s = &sim.shippers[sh].s;
            if s.is_paused() && s.is_idle() && s.poll_timeout().is_none() {
                told = true;
                break;
            }
            sim.now += Duration::from_millis(50);
        }
        assert!(told, "{ctx}: the pause was never told");
        let empty = sim.store.lineage.is_none()
            && sim.store.last_cycle == 0
            && sim.store.receiving.is_none();
        assert_eq!(
            sim.store.paused,
            (!empty).then_some(since),
            "{ctx}: the replica does not record the pause"
        );
        // The applier restarts: its welcome shows the pause it read from the store.
        sim.kill_conns(|_| true);
        sim.stale.clear();
        sim.new_applier();
        assert_eq!(sim.welcome_paused(), sim.store.paused, "{ctx}");
        sim.faults.hit("pause settled");
        converge(&mut sim, &ctx);
        for (k, v) in sim.faults.0 {
            *seen.entry(k).or_default() += v;
        }
    }
    eprintln!("{seen:#?}");
    for f in [
        "paused",
        "resumed",
        "pause told",
        "pause not told yet",
        "link cut",
        "applier crash",
        "shipper crash",
        "replica store restored",
    ] {
        assert!(
            seen.get(f).copied().unwrap_or(0) > 0,
            "never exercised: {f}"
        );
    }
}
