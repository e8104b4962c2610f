//! Running a recovery plan: its groups in order; in each, the `before` hook, then the VMs in
//! parallel (one thread each), then the `after` hook, then the operator's pause. Each step is
//! reported as it starts and ends. The first failure stops the plan (VMs of the same group
//! already on their way finish first: a failover is never abandoned half-way), and the
//! report names the failed VM or step and lists every step already done.
//!
//! What "fail over one VM" means is a [`FailoverVm`]: test failover (this build), planned and
//! unplanned failover (F2's, wired in `plan_cmd`).

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Group, Hook, Plan, VmPlan};

/// Fails one VM over; the plan runner calls it for each VM of a group, in parallel.
pub trait FailoverVm: Sync {
    /// What it does, for reports: "test failover", "planned failover", ...
    fn kind(&self) -> &'static str;
    /// The `VMREPLICA_MODE` hooks see: test, planned, unplanned.
    fn mode(&self) -> &'static str;
    /// Fails `vm` over as the plan says (`plan`); returns a line for the report (what was
    /// started, where), or why it failed.
    fn fail_over(&self, vm: &str, plan: &VmPlan) -> anyhow::Result<String>;
}

/// The operator, for pauses.
pub trait Operator {
    /// Shows `message` and waits for the go-ahead: Ok(true) to go on, Ok(false) to stop.
    fn confirm(&mut self, message: &str) -> std::io::Result<bool>;
}

/// Pauses answered on a line of input: Enter (or anything but `q`) goes on, `q` or the end
/// of input stops; with `yes`, every pause goes on by itself.
pub struct LineOperator<R: BufRead, W: Write> {
    pub input: R,
    pub out: W,
    pub yes: bool,
}

impl<R: BufRead, W: Write> Operator for LineOperator<R, W> {
    fn confirm(&mut self, message: &str) -> std::io::Result<bool> {
        if self.yes {
            writeln!(self.out, "  pause: {message} (--yes: going on)")?;
            return Ok(true);
        }
        write!(
            self.out,
            "  pause: {message}\n  press Enter to go on, or q then Enter to stop the plan: "
        )?;
        self.out.flush()?;
        let mut line = String::new();
        if self.input.read_line(&mut line)? == 0 {
            writeln!(self.out)?;
            return Ok(false);
        }
        Ok(line.trim() != "q")
    }
}

/// Why a plan stopped: the step, its error, and everything done before it.
#[derive(Debug)]
pub struct Stopped {
    pub step: String,
    pub error: String,
    pub done: Vec<String>,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the plan stopped at {}: {}", self.step, self.error)?;
        if self.done.is_empty() {
            write!(f, "; nothing was done before it")
        } else {
            write!(f, "; done before it: {}", self.done.join("; "))
        }
    }
}

impl std::error::Error for Stopped {}

/// Runs a hook with the plan's environment, in its own process group (killed whole at its
/// timeout); its output goes to this process's.
fn run_hook(hook: &Hook, env: &[(&str, String)]) -> Result<(), String> {
    let mut cmd = Command::new(&hook.argv[0]);
    cmd.args(&hook.argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", hook.argv[0]))?;
    let deadline = Instant::now() + hook.timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("it failed ({st})")),
            Ok(None) if Instant::now() >= deadline => {
                let pgid = child.id() as i32;
                // SAFETY: kill(2) on the process group of the hook this function started (its
                // group id is its pid: process_group(0)); no memory is involved.
                unsafe { libc::kill(-pgid, libc::SIGTERM) };
                std::thread::sleep(Duration::from_secs(2).min(hook.timeout));
                // SAFETY: as above.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                return Err(format!(
                    "it did not finish within its timeout of {}; it was killed",
                    humantime::format_duration(hook.timeout)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    }
}

/// Runs `plan`, failing each VM over with `failover`, pausing through `operator`, reporting
/// on `out`. Returns the steps done, or where it stopped.
pub fn run(
    plan: &Plan,
    failover: &dyn FailoverVm,
    operator: &mut dyn Operator,
    out: &mut dyn Write,
) -> Result<Vec<String>, Stopped> {
    let mut done: Vec<String> = Vec::new();
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    };
    say(
        out,
        format!(
            "plan {:?}: {} of {} VMs in {} groups",
            plan.name,
            failover.kind(),
            plan.vms.len(),
            plan.groups.len()
        ),
    );
    let stop = |step: String, error: String, done: &[String]| Stopped {
        step,
        error,
        done: done.to_vec(),
    };
    for (i, g) in plan.groups.iter().enumerate() {
        say(
            out,
            format!(
                "[{}/{}] group {} ({})",
                i + 1,
                plan.groups.len(),
                g.name,
                g.vms.join(", ")
            ),
        );
        let env = hook_env(plan, g, failover.mode());
        for (step, hook) in [("before", &g.before), ("after", &g.after)] {
            // The VMs go between the two hooks.
            if step == "after" {
                run_vms(plan, g, failover, out, &mut done)
                    .map_err(|(vm, e)| stop(format!("group {}, VM {vm}", g.name), e, &done))?;
            }
            let Some(hook) = hook else { continue };
            let name = format!("group {}: {step} hook", g.name);
            say(out, format!("  {step} hook: {}", hook.show()));
            let t0 = Instant::now();
            let mut env = env.clone();
            env.push(("VMREPLICA_STEP", step.to_string()));
            run_hook(hook, &env).map_err(|e| stop(name.clone(), e, &done))?;
            say(
                out,
                format!("  {step} hook: ok ({:.1} s)", t0.elapsed().as_secs_f64()),
            );
            done.push(name);
        }
        if let Some(message) = &g.pause {
            let name = format!("group {}: pause", g.name);
            match operator.confirm(message) {
                Ok(true) => done.push(format!("{name} (answered)")),
                Ok(false) => {
                    return Err(stop(
                        name,
                        "the operator stopped the plan (or the input ended; --yes runs \
                         without pauses)"
                            .into(),
                        &done,
                    ))
                }
                Err(e) => return Err(stop(name, e.to_string(), &done)),
            }
        }
    }
    say(
        out,
        format!(
            "plan {:?} done: {} of {} VMs",
            plan.name,
            failover.kind(),
            plan.vms.len()
        ),
    );
    Ok(done)
}

fn hook_env(plan: &Plan, g: &Group, mode: &str) -> Vec<(&'static str, String)> {
    vec![
        ("VMREPLICA_PLAN", plan.name.clone()),
        ("VMREPLICA_GROUP", g.name.clone()),
        ("VMREPLICA_VMS", g.vms.join(" ")),
        ("VMREPLICA_MODE", mode.to_string()),
    ]
}

/// Fails the VMs of group `g` over in parallel; every one finishes before the group's
/// outcome is known. Records each success in `done`; the first failure (in the group's
/// order) is returned as (VM, error).
fn run_vms(
    plan: &Plan,
    g: &Group,
    failover: &dyn FailoverVm,
    out: &mut dyn Write,
    done: &mut Vec<String>,
) -> Result<(), (String, String)> {
    let results: Vec<(String, Duration, anyhow::Result<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = g
            .vms
            .iter()
            .map(|vm| {
                let vp = plan.vms.get(vm).cloned().unwrap_or_default();
                s.spawn(move || {
                    let t0 = Instant::now();
                    let r = failover.fail_over(vm, &vp);
                    (vm.clone(), t0.elapsed(), r)
                })
            })
            .collect();
        let _ = writeln!(out, "  {}: {} ...", g.vms.join(", "), failover.kind());
        handles
            .into_iter()
            .zip(&g.vms)
            .map(|(h, vm)| {
                h.join().unwrap_or_else(|_| {
                    (
                        vm.clone(),
                        Duration::ZERO,
                        Err(anyhow::anyhow!("it panicked")),
                    )
                })
            })
            .collect()
    });
    let mut failed = None;
    for (vm, took, r) in results {
        match r {
            Ok(line) => {
                let _ = writeln!(
                    out,
                    "  {vm}: ok ({:.1} s){}{line}",
                    took.as_secs_f64(),
                    if line.is_empty() { "" } else { ": " }
                );
                done.push(format!("group {}: {} of {vm}", g.name, failover.kind()));
            }
            Err(e) => {
                let _ = writeln!(out, "  {vm}: FAILED: {e:#}");
                failed.get_or_insert((vm, format!("{} failed: {e:#}", failover.kind())));
            }
        }
    }
    let _ = out.flush();
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Mutex;

    /// Records the VMs it fails over; refuses the ones named in `fail`.
    struct Recorder {
        fail: Vec<&'static str>,
        seen: Mutex<Vec<String>>,
    }

    impl FailoverVm for Recorder {
        fn kind(&self) -> &'static str {
            "test failover"
        }
        fn mode(&self) -> &'static str {
            "test"
        }
        fn fail_over(&self, vm: &str, _: &VmPlan) -> anyhow::Result<String> {
            self.seen.lock().unwrap().push(vm.to_string());
            if self.fail.contains(&vm) {
                anyhow::bail!("no such point")
            }
            Ok(String::new())
        }
    }

    struct Answers(Vec<bool>, Vec<String>);

    impl Operator for Answers {
        fn confirm(&mut self, message: &str) -> std::io::Result<bool> {
            self.1.push(message.to_string());
            Ok(self.0.remove(0))
        }
    }

    fn plan(hooks: &str) -> Plan {
        let text = format!(
            "version = 1\nname = \"p\"\n[[group]]\nname = \"a\"\nvms = [\"v1\", \"v2\"]\n{hooks}pause = \"look\"\n[[group]]\nname = \"b\"\nvms = [\"v3\"]\n"
        );
        Plan::parse(&text, Path::new("p.toml")).unwrap()
    }

    #[test]
    fn groups_run_in_order_hooks_see_the_plan_and_a_failure_names_what_was_done() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hooks.log");
        let hooks = format!(
            "before = {{ run = \"echo before $VMREPLICA_GROUP $VMREPLICA_VMS $VMREPLICA_MODE $VMREPLICA_STEP >> {0}\" }}\nafter = {{ run = \"echo after $VMREPLICA_GROUP >> {0}\" }}\n",
            log.display()
        );
        let r = Recorder {
            fail: vec![],
            seen: Mutex::new(vec![]),
        };
        let mut op = Answers(vec![true], vec![]);
        let mut out = Vec::new();
        let done = run(&plan(&hooks), &r, &mut op, &mut out).unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "before a v1 v2 test before\nafter a\n"
        );
        assert_eq!(op.1, vec!["look"]);
        assert_eq!(done.len(), 6, "{done:?}");
        let mut seen = r.seen.lock().unwrap().clone();
        seen[..2].sort();
        assert_eq!(seen, vec!["v1", "v2", "v3"]);

        // A VM fails: its group's others finish, the after hook and later groups do not run.
        let r = Recorder {
            fail: vec!["v2"],
            seen: Mutex::new(vec![]),
        };
        std::fs::remove_file(&log).unwrap();
        let e = run(
            &plan(&hooks),
            &r,
            &mut Answers(vec![], vec![]),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.step, "group a, VM v2");
        assert!(e.error.contains("no such point"), "{e}");
        assert_eq!(
            e.done,
            vec!["group a: before hook", "group a: test failover of v1"]
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
        assert_eq!(r.seen.lock().unwrap().len(), 2);

        // A failing hook, a hook past its timeout, a pause answered "stop".
        let e = run(
            &plan("before = { run = \"exit 3\" }\n"),
            &r,
            &mut Answers(vec![], vec![]),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.step, "group a: before hook");
        assert!(e.error.contains("exit status: 3"), "{e}");
        assert!(e.to_string().contains("nothing was done before it"));
        let t0 = Instant::now();
        let e = run(
            &plan("after = { run = \"sleep 30\", timeout = \"1s\" }\n"),
            &Recorder {
                fail: vec![],
                seen: Mutex::new(vec![]),
            },
            &mut Answers(vec![], vec![]),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(e.error.contains("timeout of 1s"), "{e}");
        assert_eq!(e.done.len(), 2, "{e}");
        let e = run(
            &plan(""),
            &Recorder {
                fail: vec![],
                seen: Mutex::new(vec![]),
            },
            &mut Answers(vec![false], vec![]),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.step, "group a: pause");
    }

    #[test]
    fn pauses_read_a_line_and_yes_skips_them() {
        let mut out = Vec::new();
        let mut op = LineOperator {
            input: &b"\n"[..],
            out: &mut out,
            yes: false,
        };
        assert!(op.confirm("look").unwrap());
        assert!(!op.confirm("again").unwrap(), "the end of input stops");
        let mut op = LineOperator {
            input: &b"q\n"[..],
            out: Vec::new(),
            yes: false,
        };
        assert!(!op.confirm("look").unwrap());
        let mut op = LineOperator {
            input: &b""[..],
            out: Vec::new(),
            yes: true,
        };
        assert!(op.confirm("look").unwrap());
        assert!(String::from_utf8(out).unwrap().contains("press Enter"));
    }
}
