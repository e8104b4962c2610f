//! vmreplica shipper: on the primary host, turns the tracker's frozen generations into cycles
//! shipped over QUIC to the applier.
//!
//! - [`config`]: the TOML configuration;
//! - [`ship`]: one cycle: plan, resume, read, pack, send, manifest;
//! - [`run`]: the loop that picks the next cycle, connection handling, backoff; `verify`;
//! - [`progress`]: a cycle's progress, for a bar or log lines;
//! - [`ratelimit`]: pacing to a bandwidth limit.

pub mod config;
pub mod progress;
pub mod ratelimit;
pub mod run;
pub mod ship;

pub use config::ShipperConfig;
