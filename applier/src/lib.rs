//! vmreplica applier: receives cycles from primaries and applies them in place into sparse
//! replica images, behind a write-ahead undo log per cycle; keeps recovery points, and serves
//! any of them while later cycles land.
//!
//! - [`rules`]: which cycles a replica accepts (the lineage rules);
//! - [`undo`]: undo logs (the old contents a cycle overwrote), format and files;
//! - `image`: a replica image, and the direct, many-at-once writes into it;
//! - [`store`]: per-VM replicas: state, receiving, commit and rollback, points, export;
//! - [`pointview`]: reading a recovery point while later cycles apply;
//! - [`session`]: the replica side of the cycle protocol, without I/O;
//! - [`definition`]: the VM definitions the primaries ship (how to start each VM here);
//! - [`server`]: its QUIC driver; [`admin`]: the local admin socket;
//! - [`failover`]: unplanned failover, commit, cancel, abandon, promote, reverse and
//!   adoption, and the processes a site runs for a VM it is primary for;
//! - [`ops`]: status, health and removal of replicas;
//! - [`testfo`]: test failovers (a point served over NBD with a scratch overlay).

// The docs are built with private items (scripts/test.sh), where links to them resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod admin;
pub mod definition;
pub mod failover;
mod image;
mod logfile;
pub mod ops;
pub mod pointview;
pub mod rules;
pub mod seed;
pub mod server;
pub mod session;
pub mod store;
pub mod testfo;
pub mod undo;

pub use pointview::{Extent, ExtentKind, PointView, VmShared};
pub use store::{PointInfo, Retention, Store, StoreError, VmStore};
