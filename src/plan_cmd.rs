//! `vmreplica plan ...`: recovery plans (see `plan`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use vmreplica_applier::testfo::admin::StartRequest;

use crate::plan::runner::{self, FailoverVm, LineOperator};
use crate::plan::{Plan, VmPlan};
use crate::site::Site;
use crate::testfo_cmd;

#[derive(Subcommand)]
pub enum PlanOp {
    /// Fail a plan's VMs over: groups in order, the VMs of a group in parallel, hooks and
    /// pauses between; stops at the first failure, naming it and what was done.
    Failover {
        /// The plan (TOML).
        plan: PathBuf,
        /// Test failovers (on the replica site; replication goes on).
        #[arg(long, group = "kind")]
        test: bool,
        /// Planned failovers (on the primary site; zero data loss).
        #[arg(long, group = "kind")]
        planned: bool,
        /// Unplanned failovers (on the replica site; the primary is gone).
        #[arg(long, group = "kind")]
        unplanned: bool,
        /// Go on at every pause without asking.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        site: Site,
    },
    /// Stop the test failovers of a plan's VMs (every point of each), discarding their writes.
    TestStop {
        plan: PathBuf,
        #[command(flatten)]
        site: Site,
    },
    /// Check a plan and print its groups.
    Check { plan: PathBuf },
}

/// Test failover of one VM, through the applier's admin socket.
pub struct TestFailover {
    pub site: Site,
}

impl FailoverVm for TestFailover {
    fn kind(&self) -> &'static str {
        "test failover"
    }

    fn mode(&self) -> &'static str {
        "test"
    }

    fn fail_over(&self, vm: &str, plan: &VmPlan) -> Result<String> {
        let v = testfo_cmd::start(
            &self.site,
            StartRequest {
                vm: vm.to_string(),
                point: plan.point,
                start: plan.start,
                tcp: None,
                tls_allow: Vec::new(),
                scratch_limit: None,
            },
        )?;
        let disks: Vec<String> = v["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["uri"].as_str().map(str::to_string))
            .collect();
        let vm_started = match v["qemu"]["pid"].as_i64() {
            Some(pid) => format!(", VM running (pid {pid})"),
            None => String::new(),
        };
        Ok(format!(
            "point {}{vm_started}: {}",
            v["point"],
            disks.join(" ")
        ))
    }
}

/// Unplanned failover of one VM, through this (replica) site's applier.
pub struct UnplannedFailover {
    pub site: Site,
}

impl FailoverVm for UnplannedFailover {
    fn kind(&self) -> &'static str {
        "unplanned failover"
    }

    fn mode(&self) -> &'static str {
        "unplanned"
    }

    fn fail_over(&self, vm: &str, plan: &VmPlan) -> Result<String> {
        let v = crate::failover_cmd::fail_over_unplanned(
            &self.site.socket(),
            vm,
            plan.point,
            plan.start,
            None,
        )?;
        let disks: Vec<String> = match &v["disks"] {
            serde_json::Value::Object(m) => m
                .values()
                .filter_map(|u| u.as_str().map(str::to_string))
                .collect(),
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|d| d["uri"].as_str().or(d.as_str()).map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        Ok(format!(
            "point {}, lineage {}, disks served in {} ms{}: {}",
            v["point"],
            v["lineage"].as_str().unwrap_or("?"),
            v["served_ms"],
            if v["qemu"].is_null() {
                ""
            } else {
                ", VM started"
            },
            disks.join(" ")
        ))
    }
}

/// Planned failover of one VM, run on its primary site with the shipper configuration the
/// plan names (`[vm.NAME] config`).
pub struct PlannedFailover {
    pub site: Site,
}

impl FailoverVm for PlannedFailover {
    fn kind(&self) -> &'static str {
        "planned failover"
    }

    fn mode(&self) -> &'static str {
        "planned"
    }

    fn fail_over(&self, vm: &str, plan: &VmPlan) -> Result<String> {
        let config = plan.config.as_deref().ok_or_else(|| no_config(vm))?;
        let opts = crate::failover_cmd::PlannedOptions {
            no_start: !plan.start,
            shutdown_timeout: std::time::Duration::from_secs(300).into(),
            ..Default::default()
        };
        let f = crate::failover_cmd::fail_over_planned(config, vm, &opts, &self.site.socket())?;
        Ok(format!("{f:?}"))
    }
}

fn no_config(vm: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "VM {vm}: a planned failover runs with the VM's shipper configuration: give it in the \
         plan ([vm.{vm}] config = \"/etc/vmreplica/{vm}/shipper.toml\")"
    )
}

pub fn run(op: PlanOp) -> Result<()> {
    match op {
        PlanOp::Check { plan } => {
            let p = Plan::load(&plan)?;
            println!(
                "plan {:?}: {} VMs in {} groups",
                p.name,
                p.vms.len(),
                p.groups.len()
            );
            for (i, g) in p.groups.iter().enumerate() {
                println!("[{}] group {}: {}", i + 1, g.name, g.vms.join(", "));
                for (step, h) in [("before", &g.before), ("after", &g.after)] {
                    if let Some(h) = h {
                        println!(
                            "    {step}: {} (timeout {})",
                            h.show(),
                            humantime::format_duration(h.timeout)
                        );
                    }
                }
                if let Some(m) = &g.pause {
                    println!("    pause: {m}");
                }
            }
            Ok(())
        }
        PlanOp::TestStop { plan, site } => {
            let p = Plan::load(&plan)?;
            let mut failed = 0;
            for vm in p.vms.keys() {
                let req = vmreplica_applier::admin::Request::TestStop(
                    vmreplica_applier::testfo::admin::StopRequest {
                        vm: vm.clone(),
                        point: None,
                        all: true,
                    },
                );
                match site.call(&req, "a test failover") {
                    Ok(v) => {
                        let n = v["stopped"].as_array().map_or(0, |a| a.len());
                        println!("{vm}: {n} test failovers stopped");
                    }
                    Err(e) if e.to_string().contains("no test failover to stop") => {
                        println!("{vm}: no test failover");
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{vm}: {e:#}");
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} VMs' test failovers could not be stopped");
            }
            Ok(())
        }
        PlanOp::Failover {
            plan,
            test,
            planned,
            unplanned,
            yes,
            site,
        } => {
            let p = Plan::load(&plan)?;
            let failover: Box<dyn FailoverVm> = match (test, planned, unplanned) {
                (true, _, _) => Box::new(TestFailover { site }),
                (_, true, _) => {
                    // Every VM's configuration is named before anything runs.
                    if let Some(vm) = p.vms.iter().find(|(_, v)| v.config.is_none()) {
                        return Err(no_config(vm.0));
                    }
                    Box::new(PlannedFailover { site })
                }
                (_, _, true) => Box::new(UnplannedFailover { site }),
                _ => bail!("say which failover: --test, --planned or --unplanned"),
            };
            let stdin = std::io::stdin();
            let mut operator = LineOperator {
                input: stdin.lock(),
                out: std::io::stdout(),
                yes,
            };
            match runner::run(&p, failover.as_ref(), &mut operator, &mut std::io::stdout()) {
                Ok(_) => Ok(()),
                Err(stopped) => Err(stopped.into()),
            }
        }
    }
}
