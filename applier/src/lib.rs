//! vmreplica applier: receives cycles from primaries, stages them durably, applies each one
//! all-or-nothing into sparse replica images, and keeps recovery points as undo logs.
//!
//! - [`staging`]: the durable, resumable log of a cycle's chunks as they arrive;
//! - [`undo`]: undo logs (the old contents of blocks a cycle overwrote);
//! - `image`: a replica image, and the direct, many-at-once writes an apply makes into it;
//! - [`store`]: per-VM replicas, state, apply with crash recovery, recovery points.

mod image;
mod logfile;
pub mod server;
pub mod staging;
pub mod store;
pub mod undo;

pub use store::{PointInfo, Store, StoreError, VmStore};
