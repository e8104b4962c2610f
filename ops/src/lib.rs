//! vmreplica operations: what an administrator sees of replication and how scripts follow it.
//!
//! - [`registry`]: the runtime registry, where every running role says where it listens;
//! - [`status`]: the status schema (`vmreplica status --json`) and the health rules;
//! - [`history`]: the cycle history both sites keep for status;
//! - [`events`]: the event stream (`vmreplica events`);
//! - [`metrics`]: Prometheus metrics from status, and their HTTP listener.

// The docs are built with private items (scripts/test.sh), where links to them resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod events;
pub mod history;
pub mod metrics;
pub mod registry;
pub mod status;
