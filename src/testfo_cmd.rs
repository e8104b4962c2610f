//! `vmreplica failover test|test-stop|tests`: test failovers, through the running applier's
//! admin socket (the applier serves them, and goes on replicating meanwhile).

use std::path::Path;

use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::Value;
use vmreplica_applier::admin::{self, Request};
use vmreplica_applier::testfo::admin::{ListRequest, StartRequest, StopRequest};

use crate::site::{Site, DEFAULT_STORE};

/// A point: a cycle number, or the newest (`latest`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointArg(pub Option<u64>);

pub fn parse_point(s: &str) -> Result<PointArg, String> {
    if s == "latest" {
        return Ok(PointArg(None));
    }
    s.parse::<u64>()
        .map(|n| PointArg(Some(n)))
        .map_err(|_| format!("{s:?} is not a point: give its cycle number or `latest`"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    vmreplica_shipper::config::parse_bytes(s)
}

#[derive(Subcommand)]
pub enum TestOp {
    /// Test failover: serve a recovery point's disks over NBD with a scratch overlay (writes
    /// never reach the replica) while replication goes on; print one NBD URI per disk.
    Test {
        vm: String,
        /// The point (cycle number, see `vmreplica applier points`) or `latest`.
        #[arg(long, default_value = "latest", value_parser = parse_point)]
        point: PointArg,
        /// Boot the VM from the definition its primary shipped, on its isolated test network.
        #[arg(long)]
        start: bool,
        /// Also serve the disks on TCP (NBD over TLS, this applier's certificate).
        #[arg(long, value_name = "HOST:PORT")]
        tcp: Option<String>,
        /// Client certificate names admitted on --tcp (issued by the applier's CA).
        /// Repeatable.
        #[arg(long = "tls-allow", value_name = "NAME")]
        tls_allow: Vec<String>,
        /// Most bytes each disk's scratch file may hold (default: half the store's free
        /// space); beyond, the test VM's writes fail with ENOSPC.
        #[arg(long, value_parser = parse_size)]
        scratch_limit: Option<u64>,
        #[command(flatten)]
        site: Site,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a test failover: its VM, its exports; its scratch writes are discarded and its
    /// point unpinned.
    TestStop {
        vm: String,
        /// The point under test (needed when several are).
        #[arg(long, conflicts_with = "all")]
        point: Option<u64>,
        /// Every test failover of the VM.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        site: Site,
    },
    /// The test failovers this site serves.
    Tests {
        vm: Option<String>,
        #[command(flatten)]
        site: Site,
        #[arg(long)]
        json: bool,
    },
}

/// Prints a test failover as `test-start` and `tests` describe it.
fn print_test(t: &Value) {
    let vm = t["vm"].as_str().unwrap_or_default();
    let point = t["point"].as_u64().unwrap_or_default();
    if let Some(e) = t["error"].as_str() {
        println!("{vm} point {point}: {e}");
        return;
    }
    println!("{vm} point {point}:");
    for d in t["disks"].as_array().into_iter().flatten() {
        let name = d["disk"].as_str().unwrap_or_default();
        println!("  {name}  {}", d["uri"].as_str().unwrap_or_default());
        if let Some(u) = d["tcp_uri"].as_str() {
            println!("  {name}  {u}");
        }
    }
    if let Some(q) = t["qemu"].as_object() {
        println!(
            "  VM running (pid {}); QMP {}, console {}",
            q["pid"],
            q["qmp"].as_str().unwrap_or_default(),
            q["console"].as_str().unwrap_or_default()
        );
    }
}

fn show(v: &Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

/// Starts a test failover (what `vmreplica failover test` and recovery plans run); returns
/// the applier's description of it.
pub fn start(site: &Site, req: StartRequest) -> Result<Value> {
    site.call(&Request::TestStart(req), "a test failover")
}

pub fn run(op: TestOp) -> Result<()> {
    match op {
        TestOp::Test {
            vm,
            point,
            start: boot,
            tcp,
            tls_allow,
            scratch_limit,
            site,
            json,
        } => {
            if tcp.is_none() && !tls_allow.is_empty() {
                bail!("--tls-allow names TCP clients: give --tcp HOST:PORT too");
            }
            let v = start(
                &site,
                StartRequest {
                    vm: vm.clone(),
                    point: point.0,
                    start: boot,
                    tcp,
                    tls_allow,
                    scratch_limit,
                },
            )?;
            if json {
                return show(&v, true);
            }
            println!(
                "test failover of VM {vm} (replication goes on; the test's writes go to scratch \
                 files and never reach the replica)"
            );
            print_test(&v);
            println!(
                "stop it (discarding its writes): vmreplica failover test-stop {vm} --point {}{}",
                v["point"],
                store_arg(&site)
            );
            Ok(())
        }
        TestOp::TestStop {
            vm,
            point,
            all,
            site,
        } => {
            let req = StopRequest {
                vm: vm.clone(),
                point,
                all,
            };
            let v = match admin::call(&site.socket(), &Request::TestStop(req))? {
                Some(v) => v,
                // No applier: stopped from the store (its test VMs too).
                None => {
                    eprintln!(
                        "no applier answers on {}: stopping from the store {}",
                        site.socket().display(),
                        site.store.display()
                    );
                    vmreplica_applier::testfo::admin::stop_offline(
                        &site.store,
                        StopRequest { vm, point, all },
                    )?
                }
            };
            for s in v["stopped"].as_array().into_iter().flatten() {
                println!(
                    "stopped the test failover of {} point {} ({}); its scratch writes are \
                     discarded",
                    v["vm"].as_str().unwrap_or_default(),
                    s["point"],
                    match s["vm_stop"].as_str() {
                        Some("NotRunning") | None => "no VM was running".to_string(),
                        Some(o) => format!("VM: {o}"),
                    }
                );
            }
            Ok(())
        }
        TestOp::Tests { vm, site, json } => {
            let v = site.call(&Request::Tests(ListRequest { vm }), "a test failover")?;
            if json {
                return show(&v, true);
            }
            let all = v.as_array().cloned().unwrap_or_default();
            if all.is_empty() {
                println!("no test failover is running");
            }
            for t in &all {
                print_test(t);
            }
            Ok(())
        }
    }
}

fn store_arg(site: &Site) -> String {
    if site.store == Path::new(DEFAULT_STORE) {
        String::new()
    } else {
        format!(" --store {}", site.store.display())
    }
}
