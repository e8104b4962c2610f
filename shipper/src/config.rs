//! The shipper's configuration file (TOML).
//!
//! ```toml
//! vm = "vm1"
//! tracker = "/var/lib/vmreplica/vm1/control.sock"  # the tracker's control socket
//! replica = "192.0.2.10:7443"                       # the applier
//! server_name = "replica-1"                         # name in the applier's certificate
//! ca = "/etc/vmreplica/ca.pem"
//! cert = "/etc/vmreplica/primary-1.pem"
//! key = "/etc/vmreplica/primary-1.key"
//! interval = "5m"              # any duration (30s, 5m, 15m, ...) or "continuous"
//! bandwidth_limit = "50M"      # bytes per second; absent: unlimited
//! compression = true
//! streams = 4                  # parallel QUIC streams
//! connections = 1              # QUIC connections the streams are spread over
//! initial_sync_at = "2026-11-24T02:00:00Z"   # optional: when the initial copy may start
//! qmp = "/run/vmreplica/vm/vm1/qmp.sock"      # optional: the VM's QMP socket (planned failover)
//! rpo_limit = "1h"             # past it the VM's health is critical (default 1h)
//! metrics = "127.0.0.1:9464"   # optional: Prometheus metrics (GET /metrics)
//! guest_agent = "/run/vmreplica/vm/vm1/qga.sock"  # optional: the VM's qemu-guest-agent
//! app_consistent_every = "1h"  # with guest_agent: how often a point is app-consistent
//! definition = "vm1.vm.toml"   # optional: the VM definition, kept on the replica site
//! [[bandwidth_schedule]]       # optional, repeatable (see `schedule`)
//! days = "mon-fri"
//! from = "08:00"
//! to = "18:00"
//! limit = "10M"
//! [tuning]
//! congestion = "vmr"           # vmr (default: long lossy links) | cubic | newreno | bbr (experimental in quinn)
//! [reverse]                    # optional: this site's applier, where the replica site
//! replica = "192.0.2.5:7443"   # ships after a failover (replication back)
//! server_name = "site-a"       # the name in this site's applier certificate
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use thiserror::Error;
use vmreplica_common::link::Tuning;

use crate::schedule::{RawWindow, Schedule};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    vm: String,
    tracker: PathBuf,
    replica: String,
    server_name: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "default_interval")]
    interval: String,
    bandwidth_limit: Option<String>,
    #[serde(default = "yes")]
    compression: bool,
    #[serde(default = "default_streams")]
    streams: usize,
    #[serde(default = "one")]
    connections: usize,
    initial_sync_at: Option<String>,
    definition: Option<PathBuf>,
    rpo_limit: Option<String>,
    metrics: Option<String>,
    guest_agent: Option<PathBuf>,
    app_consistent_every: Option<String>,
    #[serde(default)]
    bandwidth_schedule: Vec<RawWindow>,
    #[serde(default)]
    tuning: Tuning,
    qmp: Option<PathBuf>,
    reverse: Option<ReverseConfig>,
}

/// This (primary) site's applier, as the replica site reaches it: where a failed-over VM
/// replicates back to.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReverseConfig {
    pub replica: String,
    pub server_name: String,
}

fn default_interval() -> String {
    "5m".into()
}
fn yes() -> bool {
    true
}
fn default_streams() -> usize {
    4
}
fn one() -> usize {
    1
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interval {
    Every(Duration),
    Continuous,
}

#[derive(Clone, Debug)]
pub struct ShipperConfig {
    pub vm: String,
    pub tracker: PathBuf,
    pub replica: String,
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub interval: Interval,
    /// Bytes per second.
    pub bandwidth_limit: Option<u64>,
    pub compression: bool,
    pub streams: usize,
    /// QUIC connections the streams are spread over: each has its own congestion control,
    /// which helps on long links with random loss, where one flow stays far below the link.
    pub connections: usize,
    pub initial_sync_at: Option<SystemTime>,
    /// Past it (the age of the last cycle applied) health is critical.
    pub rpo_limit: Duration,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// The VM's qemu-guest-agent socket, for application-consistent points.
    pub guest_agent: Option<PathBuf>,
    /// How often a point is application-consistent (needs `guest_agent`).
    pub app_consistent_every: Option<Duration>,
    pub bandwidth_schedule: Schedule,
    pub tuning: Tuning,
    /// The VM definition file (`VmDefinition`), shipped to the replica site when it changes.
    pub definition: Option<PathBuf>,
    /// The VM's QMP socket: a planned failover shuts the VM down through it.
    pub qmp: Option<PathBuf>,
    /// This site's applier, for replication back after a failover (also shipped with the
    /// definition).
    pub reverse: Option<ReverseConfig>,
    /// The interval as written (passed on to the site that replicates back).
    pub interval_text: String,
    /// The file it was read from (for reloads).
    pub path: PathBuf,
}

/// Parses an interval: a duration or `continuous`.
pub fn parse_interval(s: &str) -> Result<Interval, String> {
    if s == "continuous" {
        return Ok(Interval::Continuous);
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err("must be positive (or \"continuous\")".into());
    }
    Ok(Interval::Every(d))
}

/// Parses a positive duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e}"))
        .and_then(|d| {
            if d.is_zero() {
                Err(format!("{s:?} must be positive"))
            } else {
                Ok(d)
            }
        })
}

/// Parses a bandwidth limit (`unlimited` or `none`: no limit).
pub fn parse_limit(s: &str) -> Result<Option<u64>, String> {
    match s.trim() {
        "unlimited" | "none" => Ok(None),
        s => parse_bytes(s).map(Some),
    }
}

/// An RPO limit no longer than the interval would make health critical before every cycle.
pub fn check_rpo_limit(interval: &Interval, rpo_limit: Duration) -> Result<(), String> {
    match interval {
        Interval::Every(d) if rpo_limit <= *d => Err(format!(
            "rpo_limit ({}) must be longer than the interval ({}): the latest point would pass \
             it before every cycle and health would always be critical",
            humantime::format_duration(rpo_limit),
            humantime::format_duration(*d)
        )),
        _ => Ok(()),
    }
}

/// The keys `vmreplica set` changes on a running shipper (and in its file).
pub const SETTABLE: [&str; 5] = [
    "interval",
    "bandwidth_limit",
    "compression",
    "rpo_limit",
    "app_consistent_every",
];

/// Parses sizes like `100M`, `1G`, `500K` or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a byte count (examples: 500K, 100M, 1G)"))
}

impl ShipperConfig {
    pub fn parse(text: &str, path: &Path) -> Result<ShipperConfig, ConfigError> {
        let bad = |reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        vmreplica_common::validate_name(&raw.vm).map_err(|e| bad(format!("vm: {e}")))?;
        let interval_text = raw.interval.clone();
        let interval = parse_interval(&raw.interval).map_err(|e| bad(format!("interval {e}")))?;
        let bandwidth_limit = match raw.bandwidth_limit.as_deref() {
            Some(l) => parse_limit(l).map_err(|e| bad(format!("bandwidth_limit: {e}")))?,
            None => None,
        };
        let rpo_limit = match raw.rpo_limit.as_deref() {
            Some(r) => parse_duration(r).map_err(|e| bad(format!("rpo_limit: {e}")))?,
            // An hour, or two intervals if they are longer.
            None => {
                Duration::from_secs(vmreplica_ops::status::DEFAULT_RPO_LIMIT).max(match interval {
                    Interval::Every(d) => 2 * d,
                    Interval::Continuous => Duration::ZERO,
                })
            }
        };
        check_rpo_limit(&interval, rpo_limit).map_err(bad)?;
        let metrics = raw
            .metrics
            .as_deref()
            .map(|m| {
                m.parse::<SocketAddr>().map_err(|e| {
                    bad(format!(
                        "metrics {m:?}: {e} (an address such as 127.0.0.1:9464)"
                    ))
                })
            })
            .transpose()?;
        let app_consistent_every = match raw.app_consistent_every.as_deref() {
            Some("off" | "never") | None => None,
            Some(d) => {
                Some(parse_duration(d).map_err(|e| bad(format!("app_consistent_every: {e}")))?)
            }
        };
        if app_consistent_every.is_some() && raw.guest_agent.is_none() {
            return Err(bad(
                "app_consistent_every needs guest_agent (the VM's qemu-guest-agent socket)".into(),
            ));
        }
        let bandwidth_schedule = Schedule::parse(&raw.bandwidth_schedule).map_err(bad)?;
        let initial_sync_at = raw
            .initial_sync_at
            .as_deref()
            .map(humantime::parse_rfc3339_weak)
            .transpose()
            .map_err(|e| bad(format!("initial_sync_at: {e}")))?;
        if raw.streams == 0 || raw.streams > 64 {
            return Err(bad("streams must be 1 to 64".into()));
        }
        if raw.connections == 0 || raw.connections > 16 {
            return Err(bad("connections must be 1 to 16".into()));
        }
        let reverse = match raw.reverse {
            None => None,
            Some(r) => {
                if r.replica.trim().is_empty() || r.replica.len() > 255 {
                    return Err(bad(
                        "[reverse] replica: give HOST:PORT of this site's applier".into(),
                    ));
                }
                if r.server_name.trim().is_empty() || r.server_name.len() > 255 {
                    return Err(bad(
                        "[reverse] server_name: give the name in that applier's certificate".into(),
                    ));
                }
                Some(r)
            }
        };
        // Relative paths are the file's neighbours, made absolute: the runtime registry and
        // the control socket are found from any directory (`vmreplica status` run elsewhere).
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(ShipperConfig {
            vm: raw.vm,
            tracker: rel(raw.tracker),
            replica: raw.replica,
            server_name: raw.server_name,
            ca: rel(raw.ca),
            cert: rel(raw.cert),
            key: rel(raw.key),
            interval,
            bandwidth_limit,
            compression: raw.compression,
            streams: raw.streams,
            connections: raw.connections,
            initial_sync_at,
            rpo_limit,
            metrics,
            guest_agent: raw.guest_agent.map(rel),
            app_consistent_every,
            bandwidth_schedule,
            tuning: raw.tuning,
            definition: raw.definition.map(rel),
            qmp: raw.qmp.map(rel),
            reverse,
            interval_text,
            path: path.clone(),
        })
    }

    /// Sets each `key = value` (keys of [`SETTABLE`]) in the configuration file at `path`,
    /// keeping its comments and layout. The whole file is checked as the shipper reads it,
    /// and must configure VM `vm`, before it is replaced (atomically, once for all pairs): a
    /// bad value, key or file changes nothing.
    pub fn set_in_file(
        path: &Path,
        vm: &str,
        pairs: &[(&str, &str)],
    ) -> Result<ShipperConfig, ConfigError> {
        let bad = |reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut doc: toml_edit::DocumentMut = text
            .parse()
            .map_err(|e: toml_edit::TomlError| bad(e.to_string()))?;
        for &(key, value) in pairs {
            if !SETTABLE.contains(&key) {
                return Err(bad(format!(
                    "{key:?} cannot be set on a running shipper (settable: {}); edit the file \
                     and restart; nothing was changed",
                    SETTABLE.join(", ")
                )));
            }
            doc[key] = if key == "compression" {
                match value {
                    "true" | "on" | "yes" => toml_edit::value(true),
                    "false" | "off" | "no" => toml_edit::value(false),
                    v => {
                        return Err(bad(format!(
                            "compression: {v:?} is not true or false; nothing was changed"
                        )))
                    }
                }
            } else {
                toml_edit::value(value)
            };
        }
        let new = doc.to_string();
        let cfg = Self::parse(&new, path)?;
        if cfg.vm != vm {
            return Err(bad(format!(
                "it configures VM {}, not {vm}; nothing was changed",
                cfg.vm
            )));
        }
        vmreplica_common::write_atomic(path, new.as_bytes()).map_err(|source| {
            ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(cfg)
    }

    /// The keys changed in `new` that a running shipper cannot take over (it keeps its
    /// values until it restarts): everything but [`SETTABLE`], the bandwidth schedule and
    /// the guest agent.
    pub fn restart_only_changes(&self, new: &ShipperConfig) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut differ = |key, changed: bool| {
            if changed {
                v.push(key);
            }
        };
        differ("vm", self.vm != new.vm);
        differ("tracker", self.tracker != new.tracker);
        differ("replica", self.replica != new.replica);
        differ("server_name", self.server_name != new.server_name);
        differ("ca", self.ca != new.ca);
        differ("cert", self.cert != new.cert);
        differ("key", self.key != new.key);
        differ("streams", self.streams != new.streams);
        differ("connections", self.connections != new.connections);
        differ(
            "initial_sync_at",
            self.initial_sync_at != new.initial_sync_at,
        );
        differ("metrics", self.metrics != new.metrics);
        differ("qmp", self.qmp != new.qmp);
        differ(
            "tuning",
            format!("{:?}", self.tuning) != format!("{:?}", new.tuning),
        );
        v
    }

    pub fn load(path: &Path) -> Result<ShipperConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
vm = "vm1"
tracker = "t.sock"
replica = "127.0.0.1:7443"
server_name = "replica-1"
ca = "ca.pem"
cert = "p.pem"
key = "p.key"
"#;

    #[test]
    fn parses_intervals_limits_and_relative_paths() {
        let p = Path::new("/etc/vmr/shipper.toml");
        let c = ShipperConfig::parse(BASE, p).unwrap();
        assert_eq!(c.interval, Interval::Every(Duration::from_secs(300)));
        assert_eq!(c.tracker, PathBuf::from("/etc/vmr/t.sock"));
        assert!(c.compression && c.bandwidth_limit.is_none());
        let c = ShipperConfig::parse(&format!("{BASE}interval = \"continuous\"\nbandwidth_limit = \"10M\"\n[tuning]\ncongestion = \"bbr\"\n"), p).unwrap();
        assert_eq!(c.interval, Interval::Continuous);
        assert_eq!(c.bandwidth_limit, Some(10 << 20));
        assert!(c.definition.is_none() && c.reverse.is_none() && c.qmp.is_none());
        let c = ShipperConfig::parse(
            &format!("{BASE}definition = \"vm1.vm.toml\"\n[reverse]\nreplica = \"192.0.2.5:7443\"\nserver_name = \"primary-1-applier\"\n"),
            p,
        )
        .unwrap();
        assert_eq!(c.definition, Some(PathBuf::from("/etc/vmr/vm1.vm.toml")));
        assert_eq!(
            c.reverse,
            Some(ReverseConfig {
                replica: "192.0.2.5:7443".into(),
                server_name: "primary-1-applier".into()
            })
        );
        let c = ShipperConfig::parse(
            &format!("{BASE}qmp = \"run/qmp.sock\"\n[reverse]\nreplica = \"192.0.2.5:7443\"\nserver_name = \"site-a\"\n"),
            p,
        )
        .unwrap();
        assert_eq!(c.qmp, Some(PathBuf::from("/etc/vmr/run/qmp.sock")));
        assert_eq!(c.reverse.unwrap().server_name, "site-a");
        // No [tuning]: vmr, the controller made for long lossy links, is the default.
        let c = ShipperConfig::parse(BASE, p).unwrap();
        assert_eq!(c.tuning.congestion, vmreplica_common::link::Congestion::Vmr);
        let c =
            ShipperConfig::parse(&format!("{BASE}[tuning]\nudp_buffer = 1048576\n"), p).unwrap();
        assert_eq!(c.tuning.congestion, vmreplica_common::link::Congestion::Vmr);
        let c =
            ShipperConfig::parse(&format!("{BASE}[tuning]\ncongestion = \"cubic\"\n"), p).unwrap();
        assert_eq!(
            c.tuning.congestion,
            vmreplica_common::link::Congestion::Cubic
        );
        let e = ShipperConfig::parse(&format!("{BASE}[tuning]\ncongestion = \"fast\"\n"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vmr"), "the error lists the choices: {e}");
        for bad in [
            "interval = \"soon\"",
            "bandwidth_limit = \"lots\"",
            "streams = 0",
            "connections = 0",
            "connections = 17",
            "colour = 1",
            "initial_sync_at = \"tomorrow\"",
            "[reverse]\nreplica = \"h:1\"",
            "[reverse]\nreplica = \"\"\nserver_name = \"x\"",
            "[reverse]\nreplica = \"h:1\"\nserver_name = \"x\"\nport = 3",
        ] {
            let e = ShipperConfig::parse(&format!("{BASE}{bad}\n"), p)
                .unwrap_err()
                .to_string();
            assert!(e.contains("shipper.toml"), "{bad}: {e}");
        }
        assert!(ShipperConfig::parse("vm = \"../x\"", p).is_err());
    }

    #[test]
    fn operations_keys_and_set_keeps_the_file_readable_and_commented() {
        let p = Path::new("/etc/vmr/shipper.toml");
        let c = ShipperConfig::parse(
            &format!(
                "{BASE}rpo_limit = \"30m\"\nmetrics = \"127.0.0.1:0\"\nguest_agent = \"qga.sock\"\n\
                 app_consistent_every = \"1h\"\nbandwidth_limit = \"unlimited\"\n\
                 [[bandwidth_schedule]]\nfrom = \"08:00\"\nto = \"18:00\"\nlimit = \"1M\"\n"
            ),
            p,
        )
        .unwrap();
        assert_eq!(c.rpo_limit, Duration::from_secs(1800));
        assert_eq!(c.guest_agent, Some(PathBuf::from("/etc/vmr/qga.sock")));
        assert_eq!(c.app_consistent_every, Some(Duration::from_secs(3600)));
        assert!(!c.bandwidth_schedule.is_empty() && c.bandwidth_limit.is_none());
        for bad in [
            "app_consistent_every = \"1h\"",
            "metrics = \"localhost\"",
            "rpo_limit = \"0s\"",
            "interval = \"5m\"\nrpo_limit = \"5m\"",
        ] {
            let e = ShipperConfig::parse(&format!("{BASE}{bad}\n"), p)
                .unwrap_err()
                .to_string();
            assert!(e.contains("shipper.toml"), "{bad}: {e}");
        }

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("shipper.toml");
        std::fs::write(&f, format!("# my VM\n{BASE}interval = \"5m\" # five\n")).unwrap();
        let c = ShipperConfig::set_in_file(&f, "vm1", &[("interval", "30s")]).unwrap();
        assert_eq!(c.interval, Interval::Every(Duration::from_secs(30)));
        ShipperConfig::set_in_file(
            &f,
            "vm1",
            &[("compression", "false"), ("bandwidth_limit", "20M")],
        )
        .unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.starts_with("# my VM\n"), "{text}");
        let c = ShipperConfig::load(&f).unwrap();
        assert!(!c.compression);
        assert_eq!(c.bandwidth_limit, Some(20 << 20));
        // A bad value or key changes nothing, not even the good pairs beside it; nor does
        // a file of another VM.
        let set = |pairs: &[(&str, &str)]| ShipperConfig::set_in_file(&f, "vm1", pairs);
        assert!(set(&[("interval", "soon")]).is_err());
        assert!(set(&[("vm", "vm2")]).is_err());
        assert!(set(&[("interval", "1s"), ("bandwidth_limit", "bad")]).is_err());
        assert!(set(&[("interval", "1s"), ("compression", "maybe")]).is_err());
        let e = ShipperConfig::set_in_file(&f, "vm2", &[("interval", "1s")]).unwrap_err();
        assert!(e.to_string().contains("configures VM vm1, not vm2"), "{e}");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), text);
    }
}
