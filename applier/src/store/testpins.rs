//! Test failovers as the replica's state records them (`tests`): each pins its point (also
//! for retention, while no view holds it: see `points`), and is served again after an
//! applier restart. Saved before the test failover is reported started, removed before its
//! scratch files are.

use super::state::{Role, TestPin};
use super::{StoreError, VmStore};

impl VmStore {
    /// The test failovers recorded.
    pub fn tests(&self) -> Vec<TestPin> {
        self.state.tests.clone()
    }

    /// Only a replica (or an old primary waiting for its reverse cycle) has points to test:
    /// on a site the VM failed over to, its images are the running VM's disks and change
    /// outside any point, so a point view of them would not read the point.
    pub fn check_testable(&self) -> Result<(), StoreError> {
        if !matches!(self.state.role, Role::Replica | Role::ReversePending(_)) {
            return Err(StoreError::Role(format!(
                "VM {}: this site is its {} (the VM runs here from the replica's images), so \
                 there is no recovery point to test here: test it on the site that replicates \
                 it{}",
                self.vm(),
                self.state.role.name(),
                if matches!(self.state.role, Role::FailedOver(_)) {
                    format!(
                        ", or cancel the failover first (vmreplica failover cancel {})",
                        self.vm()
                    )
                } else {
                    String::new()
                }
            )));
        }
        Ok(())
    }

    /// Records a test failover (a second one of the same point is refused; see
    /// [`Self::check_testable`]).
    pub fn add_test(&mut self, pin: TestPin) -> Result<(), StoreError> {
        self.check_testable()?;
        if self.state.tests.iter().any(|t| t.point == pin.point) {
            return Err(StoreError::Refused(format!(
                "VM {}: point {} is already under test; stop that test failover first \
                 (vmreplica failover test-stop {} --point {})",
                self.vm(),
                pin.point,
                self.vm(),
                pin.point
            )));
        }
        let mut next = self.state.clone();
        next.tests.push(pin);
        next.tests.sort_by_key(|t| t.point);
        self.commit_state(next)
    }

    /// Records that the test failover of `point` booted its VM (or not).
    pub fn set_test_started(&mut self, point: u64, started: bool) -> Result<(), StoreError> {
        let mut next = self.state.clone();
        for t in next.tests.iter_mut().filter(|t| t.point == point) {
            t.started = started;
        }
        self.commit_state(next)
    }

    /// Forgets the test failover of `point` (its point may then go by retention).
    pub fn remove_test(&mut self, point: u64) -> Result<(), StoreError> {
        if !self.state.tests.iter().any(|t| t.point == point) {
            return Ok(());
        }
        let mut next = self.state.clone();
        next.tests.retain(|t| t.point != point);
        self.commit_state(next)
    }
}
