//! Undo logs: the old contents a cycle overwrote, written ahead of the overwrite, so that
//! the cycle can be rolled back and every older recovery point read (the replica image always
//! holds the newest).
//!
//! - [`format`](mod@format): the on-disk format as a pure codec (fuzzed);
//! - [`log`]: writing a cycle's log, reopening it after a crash, loading finished logs,
//!   merging two;
//! - [`index`]: the in-memory index of a log that point views read through.

pub mod format;
pub mod index;
pub mod log;

pub use format::{Enc, Entry, Header};
pub use index::LogIndex;
pub use log::{Loaded, UndoLog};
