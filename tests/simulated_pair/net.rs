//! The simulated network: messages in flight, connections, shippers and the faults met.

use std::collections::{BTreeMap, VecDeque};

use vmreplica_common::wire::{Message, Tag};
use vmreplica_shipper::session::ShipperSession;

/// A message in flight on a connection.
#[derive(Clone, Debug)]
pub(crate) enum Wire {
    Ctl(Message),
    Chunk {
        send: u64,
        tag: Tag,
        block: u64,
        value: u64,
    },
    Ack {
        send: u64,
        result: Result<(), (u16, String)>,
    },
}

pub(crate) struct Conn {
    pub(crate) shipper: usize,
    pub(crate) attempt: u64,
    pub(crate) alive: bool,
    /// Control messages keep their order; data may overtake them and each other.
    pub(crate) to_applier: VecDeque<Wire>,
    pub(crate) to_applier_data: Vec<Wire>,
    pub(crate) to_shipper: VecDeque<Wire>,
    pub(crate) connected: bool,
}

/// A shipper: its session and the sends in flight.
pub(crate) struct Shipper {
    pub(crate) s: ShipperSession,
    /// The current data send: id, attempt, chunks not yet acknowledged.
    pub(crate) sending: Option<(u64, u64, usize)>,
    pub(crate) alive: bool,
}

#[derive(Default, Debug)]
pub(crate) struct Faults(pub(crate) BTreeMap<&'static str, u32>);

impl Faults {
    pub(crate) fn hit(&mut self, f: &'static str) {
        *self.0.entry(f).or_default() += 1;
    }
}
