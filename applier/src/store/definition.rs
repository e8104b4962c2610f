//! The VM definition a replica holds: `definition.toml` beside `state.json` (the text the
//! primary shipped, `VmDefinition::to_toml()`), its hash and the primary site's reverse
//! target in the state. See [`crate::definition`] for reading it.

use std::path::PathBuf;

use vmreplica_common::wire::{DefinitionHash, ReverseTarget};

use super::state::DefinitionInfo;
use super::{StoreError, VmStore};

/// The file a replica's definition is kept in, in the VM's directory.
pub const DEFINITION_FILE: &str = "definition.toml";

impl VmStore {
    /// The definition the replica holds, by hash.
    pub fn definition_hash(&self) -> Option<DefinitionHash> {
        self.state.definition.as_ref().map(|d| d.hash)
    }

    pub(crate) fn definition_path(&self) -> PathBuf {
        self.dir().join(DEFINITION_FILE)
    }

    /// Checks and keeps a definition shipped by the primary (`hash` is its hash, checked by
    /// the session). A definition that does not pass [`crate::definition::check`] is refused
    /// and the one held stays. An empty text means the primary ships no definition (only its
    /// reverse target): the one held is removed. Written before the state refers to it (a
    /// crash in between leaves the state naming the older one, so the primary sends it again).
    pub fn store_definition(
        &mut self,
        hash: DefinitionHash,
        text: &str,
        reverse: Option<ReverseTarget>,
    ) -> Result<(), StoreError> {
        let path = self.definition_path();
        let dir = self.dir().to_path_buf();
        crate::undo::log::create_dirs(&dir).map_err(self.io(&dir))?;
        if text.is_empty() {
            crate::undo::log::remove(&path).map_err(self.io(&path))?;
        } else {
            crate::definition::check(self.vm(), text, &path)
                .map_err(|e| StoreError::Definition(e.to_string()))?;
            vmreplica_common::write_atomic(&path, text.as_bytes()).map_err(self.io(&path))?;
        }
        let mut next = self.state.clone();
        next.definition = Some(DefinitionInfo {
            hash,
            has_definition: !text.is_empty(),
            reverse,
            stored_at: super::apply::now(),
        });
        self.commit_state(next)?;
        tracing::info!(vm = %self.vm(), %hash, "stored the VM definition the primary shipped");
        Ok(())
    }
}
