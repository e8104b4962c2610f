//! Starting and stopping the VMs vmreplica protects, on whichever site holds their disks.
//!
//! - [`VmDefinition`]: the VM definition file (TOML, versioned): a QEMU command-line
//!   template with placeholders for each disk's NBD URI, the QMP and guest-agent sockets,
//!   the console log and the network (production or an isolated test network), optionally
//!   a libvirt domain XML template.
//! - [`Instance`]: the launcher. One run directory, one detached QEMU; started when QMP
//!   answers; stopped by power button, `quit` or SIGKILL, reporting which.
//! - [`Qmp`]: a blocking QMP client (greeting, capabilities, commands, typed errors,
//!   buffered events, timeouts).
//! - [`GuestAgent`]: a blocking qemu-ga client (`guest-sync-delimited`, ping, fsfreeze;
//!   [`GuestAgent::freeze_then`] always thaws).
//!
//! Everything blocks with a timeout and names its socket or file in errors.

// The docs are built with private items (scripts/test.sh), where links to them resolve.
#![allow(rustdoc::private_intra_doc_links)]

mod conn;
pub mod definition;
pub mod error;
pub mod instance;
pub mod qga;
pub mod qmp;
pub mod template;
pub mod uri;

pub use conn::LineConn;
pub use definition::{DefinitionError, Network, RenderInput, VmDefinition, DEFINITION_VERSION};
pub use error::{Peer, ProtocolError};
pub use instance::{
    Instance, LaunchError, RunState, Started, StopOutcome, StopPolicy, DEFAULT_RUN_ROOT,
};
pub use qga::{AgentError, FreezeStatus, FreezeTimeouts, Frozen, GuestAgent};
pub use qmp::{Qmp, QmpError, QmpEvent};
pub use uri::NbdUri;
