//! vmreplica shipper: on the primary host, turns the tracker's frozen generations into cycles
//! shipped over QUIC to the applier.
//!
//! - [`config`]: the TOML configuration;
//! - [`session`]: the cycle protocol on the primary side, as a state machine without I/O
//!   (which cycle next, the lineage rules, resume, manifest, release);
//! - [`run`]: its async driver (tracker requests, connections, planning and sending tasks);
//!   `verify`;
//! - [`ship`]: the data path: plan, read, pack on a pool of threads, send, acknowledgements;
//! - [`definition`]: the VM definition kept on the replica site;
//! - [`lock`]: one shipper per tracker;
//! - [`progress`]: a cycle's progress, for a bar or log lines;
//! - [`ratelimit`]: pacing to a bandwidth limit.

pub mod config;
pub mod definition;
pub mod lock;
pub mod progress;
pub mod ratelimit;
pub mod run;
pub mod session;
pub mod ship;

pub use config::ShipperConfig;
