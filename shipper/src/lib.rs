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
//! - [`failover`]: what the replica site is for a VM, and asking it to replicate back;
//! - [`lock`]: one shipper per tracker;
//! - [`progress`]: a cycle's progress, for a bar or log lines;
//! - [`ratelimit`]: pacing to a bandwidth limit, [`schedule`]: the limit by time of day;
//! - operations: [`control`] (the control socket: status, pause, resume, resync, set,
//!   reload), [`state`] (history and pause, across restarts), [`status`] (the primary's view
//!   of the VM), [`appfreeze`] (application-consistent freezes through the guest agent).

// The docs are built with private items (scripts/test.sh), where links to them resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod appfreeze;
pub mod config;
pub mod control;
pub mod definition;
pub mod failover;
pub mod lock;
mod ops;
pub mod progress;
pub mod ratelimit;
pub mod run;
pub mod schedule;
pub mod seed;
pub mod session;
pub mod ship;
pub mod state;
pub mod status;

pub use config::ShipperConfig;
