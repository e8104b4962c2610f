//! The tracker's side: the shippers' tracker operations against the model.

use rand::Rng;
use vmreplica_common::lineage::Lineage;
use vmreplica_shipper::session::TrackerOp;

use super::Sim;
use crate::model::{blocks_of, BLOCKS};

impl Sim {
    // ---- the tracker -------------------------------------------------------------------

    pub(crate) fn tracker_op(&mut self, sh: usize, op: TrackerOp) {
        let t = &mut self.tracker;
        let r: Result<(), String> = match op {
            TrackerOp::Status | TrackerOp::ClearResync | TrackerOp::MarkResync => {
                if op == TrackerOp::ClearResync && t.resync_since < t.next_generation {
                    t.resync_required = false;
                }
                if op == TrackerOp::MarkResync {
                    t.raise_resync();
                }
                Ok(())
            }
            TrackerOp::Freeze { full } => match t.frozen {
                Some(_) => Err("already frozen".into()),
                None => {
                    let g = t.next_generation;
                    let blocks = if full {
                        (0..BLOCKS).collect()
                    } else {
                        std::mem::take(&mut t.dirty)
                    };
                    if full {
                        t.dirty.clear();
                    }
                    let id = self.rng.gen::<u64>() | 1;
                    t.frozen = Some((g, full, blocks, self.disk.clone(), id));
                    t.next_generation += 1;
                    self.truth.push((t.lineage, g, self.disk.clone()));
                    Ok(())
                }
            },
            TrackerOp::Release { generation, proof } => {
                let ok = t
                    .frozen
                    .as_ref()
                    .is_some_and(|f| f.0 == generation && f.4 == proof.2)
                    && t.lineage == Some(proof.0)
                    && proof.1 == generation;
                if ok {
                    // The invariant: the replica applied exactly this generation's contents.
                    let want = &t.frozen.as_ref().expect("checked").3;
                    assert!(
                        self.committed
                            .iter()
                            .any(|(l, c, d)| Some(*l) == t.lineage && *c == generation && d == want),
                        "released generation {generation} the replica never applied: frozen {want:?}, committed {:?}",
                        self.committed.iter().filter(|c| c.1 == generation).collect::<Vec<_>>()
                    );
                    t.frozen = None;
                    Ok(())
                } else {
                    Err("release refused: no proof".into())
                }
            }
            TrackerOp::Merge { generation } => match t.frozen.take() {
                Some(f) if f.0 == generation => {
                    t.dirty.extend(f.2);
                    Ok(())
                }
                other => {
                    t.frozen = other;
                    Err("not frozen".into())
                }
            },
            TrackerOp::MarkDirty { ranges } => {
                t.dirty.extend(blocks_of(&ranges));
                Ok(())
            }
            TrackerOp::SetLineage {
                lineage: l,
                next_generation,
            } => {
                if t.frozen.is_some() {
                    Err("frozen".into())
                } else {
                    let l = l.unwrap_or_else(|| Lineage(self.rng.gen()));
                    if t.lineage.is_some_and(|h| h != l) {
                        Err("other lineage".into())
                    } else {
                        t.lineage = Some(l);
                        t.next_generation = t.next_generation.max(next_generation);
                        Ok(())
                    }
                }
            }
        };
        let answer = r.map(|()| self.tracker.view());
        self.tracker_answers.push_back((sh, answer));
    }
}
