//! What the shipper's driver does for operations, beside shipping: its settings as they
//! change at run time (`vmreplica set`, SIGHUP, the bandwidth schedule), its state file
//! (history, pause, application-consistent freezes), its registry entry, events, and the
//! live figures status reads.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use vmreplica_common::wire::{CycleKind, CycleMeta, Message};
use vmreplica_ops::events::{self, Event};
use vmreplica_ops::history::CycleRecord;
use vmreplica_ops::registry::{self, Entry, Registration};
use vmreplica_ops::status::{Level, VmStatus};
use vmreplica_tracker::Generation;

use crate::config::{
    parse_duration, parse_interval, parse_limit, Interval, ShipperConfig, SETTABLE,
};
use crate::progress::{Progress, Snapshot};
use crate::ratelimit::RateLimit;
use crate::schedule::Schedule;
use crate::state::{self, ShipperState};
use crate::status::Live;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The settings that change at run time.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Settings {
    pub interval: Interval,
    pub bandwidth_limit: Option<u64>,
    pub schedule: Schedule,
    pub compression: bool,
    pub rpo_limit: Duration,
    pub app_every: Option<Duration>,
    pub guest_agent: Option<PathBuf>,
}

impl Settings {
    pub fn of(cfg: &ShipperConfig) -> Settings {
        Settings {
            interval: cfg.interval.clone(),
            bandwidth_limit: cfg.bandwidth_limit,
            schedule: cfg.bandwidth_schedule.clone(),
            compression: cfg.compression,
            rpo_limit: cfg.rpo_limit,
            app_every: cfg.app_consistent_every,
            guest_agent: cfg.guest_agent.clone(),
        }
    }

    pub fn interval(&self) -> Option<Duration> {
        match self.interval {
            Interval::Every(d) => Some(d),
            Interval::Continuous => None,
        }
    }

    pub fn interval_secs(&self) -> Option<u64> {
        self.interval().map(|d| d.as_secs().max(1))
    }

    /// Applies `key = value` (see [`SETTABLE`]).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let v = value.trim();
        match key {
            "interval" => self.interval = parse_interval(v)?,
            "bandwidth_limit" => self.bandwidth_limit = parse_limit(v)?,
            "compression" => {
                self.compression = match v {
                    "true" | "on" | "yes" => true,
                    "false" | "off" | "no" => false,
                    _ => return Err(format!("compression: {v:?} is not true or false")),
                }
            }
            "rpo_limit" => self.rpo_limit = parse_duration(v)?,
            "app_consistent_every" => {
                self.app_every = match v {
                    "off" | "never" => None,
                    d => {
                        if self.guest_agent.is_none() {
                            return Err("app_consistent_every needs guest_agent in the \
                                        configuration"
                                .into());
                        }
                        Some(parse_duration(d)?)
                    }
                }
            }
            k => {
                return Err(format!(
                    "{k} cannot be set on a running shipper (settable: {})",
                    SETTABLE.join(", ")
                ))
            }
        }
        crate::config::check_rpo_limit(&self.interval, self.rpo_limit)?;
        Ok(())
    }

    /// The keys whose values differ from `other`'s, with the new values, for events.
    pub fn changes(&self, new: &Settings) -> Value {
        let mut m = serde_json::Map::new();
        if self.interval != new.interval {
            m.insert("interval".into(), json!(format!("{:?}", new.interval)));
        }
        if self.bandwidth_limit != new.bandwidth_limit {
            m.insert("bandwidth_limit".into(), json!(new.bandwidth_limit));
        }
        if self.schedule != new.schedule {
            m.insert("bandwidth_schedule".into(), json!("changed"));
        }
        if self.compression != new.compression {
            m.insert("compression".into(), json!(new.compression));
        }
        if self.rpo_limit != new.rpo_limit {
            m.insert("rpo_limit".into(), json!(new.rpo_limit.as_secs()));
        }
        if self.app_every != new.app_every {
            m.insert(
                "app_consistent_every".into(),
                json!(new.app_every.map(|d| d.as_secs())),
            );
        }
        if self.guest_agent != new.guest_agent {
            m.insert("guest_agent".into(), json!(new.guest_agent));
        }
        Value::Object(m)
    }
}

/// A progress sink that also keeps the latest snapshot for status.
struct Tee {
    inner: Arc<dyn Progress>,
    live: Arc<Mutex<Option<(Snapshot, &'static str)>>>,
}

impl Progress for Tee {
    fn begin(&self, cycle: u64, kind: CycleKind, total: u64) {
        *lock(&self.live) = Some((
            Snapshot {
                cycle,
                kind,
                done: 0,
                total,
                elapsed: Duration::ZERO,
            },
            "sending",
        ));
        self.inner.begin(cycle, kind, total);
    }
    fn update(&self, now: &Snapshot) {
        *lock(&self.live) = Some((*now, "sending"));
        self.inner.update(now);
    }
    fn sent(&self, now: &Snapshot) {
        *lock(&self.live) = Some((*now, "sending"));
        self.inner.sent(now);
    }
    fn end(&self, applied: bool) {
        *lock(&self.live) = None;
        self.inner.end(applied);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Ops {
    pub vm: String,
    pub settings: Settings,
    pub limit: Arc<RateLimit>,
    /// The limit in force (configured or scheduled).
    pub effective_limit: Option<u64>,
    pub state: ShipperState,
    state_path: PathBuf,
    pub socket: PathBuf,
    pub tracker: PathBuf,
    pub config_path: PathBuf,
    /// Where the VM definition is read from (changes with a reload).
    pub definition: crate::definition::Source,
    pub registration: Registration,
    pub live: Arc<Mutex<Option<(Snapshot, &'static str)>>>,
    /// The cycle being shipped, and when it began (ms since the epoch).
    pub cycle: Option<(u64, CycleKind)>,
    pub cycle_started_ms: u64,
    /// The cycle whose start was last announced as an event.
    announced: Option<u64>,
    pub health: Option<Level>,
    /// Disks the tracker serves and does not track.
    pub excluded: Vec<(String, u64)>,
    /// The configuration it started with (a reload takes over only what may change).
    pub started: ShipperConfig,
}

impl Ops {
    /// Reads the state file (refusing one it cannot read: it may hold a pause) and
    /// registers the shipper.
    pub fn new(cfg: &ShipperConfig) -> Result<Ops, String> {
        let state_path = state::path_for(&cfg.tracker);
        let mut state = ShipperState::load(&state_path)
            .map_err(|e| {
                format!(
                    "{e}: it holds the VM's pause and cycle history; fix it, or remove it to \
                     start afresh (replication is then not paused, and its history is empty)"
                )
            })?
            .unwrap_or_default();
        if state.vm != cfg.vm {
            if !state.vm.is_empty() {
                tracing::warn!(
                    "{} was the state of VM {}, now of VM {}",
                    state_path.display(),
                    state.vm,
                    cfg.vm
                );
            }
            state.vm = cfg.vm.clone();
        }
        let settings = Settings::of(cfg);
        let effective_limit = settings.schedule.limit_now(settings.bandwidth_limit);
        let socket = crate::control::socket_for(&cfg.tracker);
        let mut entry = Entry::me(registry::SHIPPER);
        entry.vm = Some(cfg.vm.clone());
        entry.control = Some(socket.clone());
        entry.tracker = Some(cfg.tracker.clone());
        entry.state = Some(state_path.clone());
        entry.config = Some(std::path::absolute(&cfg.path).unwrap_or(cfg.path.clone()));
        Ok(Ops {
            vm: cfg.vm.clone(),
            limit: Arc::new(RateLimit::new(effective_limit)),
            effective_limit,
            settings,
            state,
            state_path,
            socket,
            tracker: cfg.tracker.clone(),
            config_path: cfg.path.clone(),
            definition: crate::definition::Source::of(cfg),
            registration: registry::register(entry),
            live: Arc::default(),
            cycle: None,
            cycle_started_ms: 0,
            announced: None,
            health: None,
            excluded: Vec::new(),
            started: cfg.clone(),
        })
    }

    pub fn progress(&self, inner: Arc<dyn Progress>) -> Arc<dyn Progress> {
        Arc::new(Tee {
            inner,
            live: Arc::clone(&self.live),
        })
    }

    pub fn event(&self, name: &str) -> Event {
        Event::new(name).vm(&self.vm)
    }

    /// Saves the state file; a failure is logged (rate-limited) and kept in memory.
    pub fn save(&self) -> Result<(), String> {
        self.state.save(&self.state_path).map_err(|e| {
            vmreplica_common::warn_limited!(
                Duration::from_secs(60),
                "{e} (status and history are kept in memory until a save works)"
            );
            e.to_string()
        })
    }

    /// Fills in what a `BeginCycle` says of its cycle, and announces initial copies and
    /// resyncs as events.
    pub fn begin(&mut self, msg: &mut Message, frozen: Option<&Generation>) {
        let Message::BeginCycle {
            cycle,
            kind,
            freeze,
            meta,
            ..
        } = msg
        else {
            return;
        };
        self.cycle = Some((*cycle, *kind));
        self.cycle_started_ms = now_ms();
        *meta = CycleMeta {
            app_consistent: self.state.app.is_app_consistent(*freeze),
            frozen_at: frozen
                .filter(|g| g.generation == *cycle)
                .map_or(0, |g| g.frozen_at),
            interval: self
                .settings
                .interval_secs()
                .unwrap_or(CycleMeta::CONTINUOUS),
            rpo_limit: self.settings.rpo_limit.as_secs(),
            excluded: self.excluded.clone(),
        };
        if self.announced != Some(*cycle) {
            self.announced = Some(*cycle);
            let name = match kind {
                CycleKind::Initial => Some(events::INITIAL_COPY_STARTED),
                CycleKind::Resync => Some(events::RESYNC_STARTED),
                CycleKind::Delta | CycleKind::Reverse => None,
            };
            if let Some(name) = name {
                tracing::info!(vm = self.vm, cycle, "{} started", kind.name());
                events::emit(self.event(name).field("cycle", *cycle));
            }
        }
    }

    /// A cycle was applied: recorded in the history (and the state file), announced.
    pub fn done(
        &mut self,
        cycle: u64,
        kind: CycleKind,
        bytes: u64,
        wire_bytes: u64,
        frozen: Option<&Generation>,
    ) {
        let g = frozen.filter(|g| g.generation == cycle);
        let app_consistent = g.is_some_and(|g| self.state.app.is_app_consistent(g.id));
        let rec = CycleRecord {
            cycle,
            kind: kind.name().to_string(),
            frozen_at: g.map_or(self.cycle_started_ms / 1000, |g| g.frozen_at),
            started_ms: self.cycle_started_ms,
            applied_ms: now_ms().max(self.cycle_started_ms),
            bytes,
            wire_bytes,
            app_consistent,
        };
        events::emit(
            self.event(events::CYCLE_APPLIED)
                .field("cycle", cycle)
                .field("kind", kind.name())
                .field("bytes", bytes)
                .field("wire_bytes", wire_bytes)
                .field("seconds", rec.seconds())
                .field("app_consistent", app_consistent),
        );
        self.state.history.record(rec);
        self.state.stopped = None;
        // A full cycle (a resync, or an initial copy into a replica emptied meanwhile) ends
        // a requested resync.
        if matches!(kind, CycleKind::Resync | CycleKind::Initial) {
            self.state.resync_requested = None;
        }
        self.cycle = None;
        let _ = self.save();
    }

    pub fn failed(&mut self, error: &str, after: Duration) {
        self.cycle = None;
        self.state.history.failed(now_ms() / 1000, error);
        let _ = self.save();
        events::emit(
            self.event(events::CYCLE_FAILED)
                .field("error", error)
                .field("retry_in_s", after.as_secs()),
        );
    }

    pub fn stopped(&mut self, error: &str) {
        self.cycle = None;
        self.state.stopped = Some(error.to_string());
        self.state.history.failed(now_ms() / 1000, error);
        let _ = self.save();
        events::emit(
            self.event(events::REPLICATION_STOPPED)
                .field("error", error),
        );
    }

    /// An operator's resync was marked in the tracker: remembered until a resync cycle is
    /// applied, so that status does not call it lost tracking.
    pub fn resync_requested(&mut self) {
        self.state.resync_requested = Some(now_ms() / 1000);
        let _ = self.save();
    }

    /// Pause or resume, saved before it takes effect.
    pub fn set_paused(&mut self, paused: bool) -> Result<bool, String> {
        // Resuming a VM stopped on an error (not paused) tries again: a change too.
        let retry = !paused && self.state.stopped.is_some();
        if self.state.paused() == paused && !retry {
            return Ok(false);
        }
        let mut next = self.state.clone();
        let now = now_ms() / 1000;
        if paused {
            next.history.pause(now);
        } else {
            if self.state.paused() {
                next.history.resume(now);
            }
            next.stopped = None;
        }
        next.save(&self.state_path)
            .map_err(|e| format!("{e}: not {}", if paused { "paused" } else { "resumed" }))?;
        self.state = next;
        events::emit(self.event(if paused {
            events::PAUSED
        } else {
            events::RESUMED
        }));
        tracing::info!(
            vm = self.vm,
            "replication {}",
            if paused {
                "paused (the tracker keeps tracking)"
            } else {
                "resumed"
            }
        );
        Ok(true)
    }

    /// Checks the bandwidth schedule: the limit in force changes at once.
    pub fn schedule_tick(&mut self) {
        let want = self
            .settings
            .schedule
            .limit_now(self.settings.bandwidth_limit);
        if want != self.effective_limit {
            self.effective_limit = want;
            self.limit.set_rate(want);
            tracing::info!(
                vm = self.vm,
                limit = ?want,
                "bandwidth limit now {}",
                want.map_or("unlimited".to_string(), |b| format!("{b} bytes/s"))
            );
            events::emit(
                self.event(events::BANDWIDTH_CHANGED)
                    .field("limit_bytes_per_second", want),
            );
        }
    }

    /// New settings (a `set`, a reload): applied, announced.
    pub fn apply(&mut self, new: Settings, by: &str) -> Value {
        let changed = self.settings.changes(&new);
        self.settings = new;
        self.schedule_tick();
        if changed.as_object().is_some_and(|m| !m.is_empty()) {
            tracing::info!(vm = self.vm, by, "settings changed: {changed}");
            events::emit(
                self.event(events::SETTINGS_CHANGED)
                    .field("changed", &changed)
                    .field("by", by),
            );
        }
        changed
    }

    /// Whether the next freeze should be application-consistent.
    pub fn app_due(&self) -> bool {
        let (Some(every), Some(_)) = (self.settings.app_every, &self.settings.guest_agent) else {
            return false;
        };
        match self.state.app.last_at {
            None => true,
            Some(at) => now_ms() / 1000 >= at + every.as_secs().saturating_sub(1),
        }
    }

    /// What a running shipper adds to the state file for status.
    pub fn live(&self) -> Live {
        let progress = *lock(&self.live);
        Live {
            pid: std::process::id(),
            socket: self.socket.display().to_string(),
            cycle: self.cycle,
            frozen_remaining: progress
                .as_ref()
                .filter(|(s, _)| Some(s.cycle) == self.cycle.map(|c| c.0))
                .map(|(s, _)| s.total.saturating_sub(s.done)),
            progress,
            limit: self.effective_limit,
            compression: self.settings.compression,
            app_every: self.settings.app_every.map(|d| d.as_secs()),
        }
    }

    /// Notes a status's health; a change of level is an event.
    pub fn note_health(&mut self, st: &VmStatus) {
        let level = st.health.level;
        if self.health != Some(level) {
            if let Some(from) = self.health {
                tracing::info!(
                    vm = self.vm,
                    "health {} -> {}: {}",
                    from.name(),
                    level.name(),
                    st.health.reasons.join("; ")
                );
                events::emit(
                    self.event(events::HEALTH_CHANGED)
                        .field("site", "primary")
                        .field("from", from.name())
                        .field("to", level.name())
                        .field("reasons", &st.health.reasons),
                );
            }
            self.health = Some(level);
        }
    }
}
