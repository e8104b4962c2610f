//! The VM definitions a replica site holds: how to start each VM whose disks it keeps. The
//! primary's shipper sends its definition (`definition = "FILE"` in its configuration) when
//! the replica's differs; the applier checks it ([`check`]) and keeps it as
//! `STORE/VM/definition.toml` (see `VmStore::store_definition`), with the primary site's
//! reverse target in the state. Failover and test failover start the VM from it ([`load`]).
//!
//! A shipped definition is checked on this side too, as any input from a peer is: it parses
//! as a `VmDefinition`, names this VM, is self-contained (a libvirt template inline, never a
//! path on this host), and its program is QEMU (`qemu-system-*` or `qemu-kvm`): a primary may
//! say how its VM starts, not run another program on the replica site.

use std::path::Path;

use vmreplica_common::wire::ReverseTarget;
use vmreplica_vm::{DefinitionError, VmDefinition};

use crate::store::state::VmState;
use crate::store::{StoreError, DEFINITION_FILE};

/// Checks a shipped definition's text (named `path` in messages) for VM `vm`.
pub fn check(vm: &str, text: &str, path: &Path) -> Result<VmDefinition, DefinitionError> {
    let bad = |reason: String| DefinitionError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let raw: toml::Value = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    if raw.get("libvirt").and_then(|l| l.get("template")).is_some() {
        return Err(bad(
            "[libvirt] template names a file on the primary's host; a shipped definition \
             carries its domain XML inline (the shipper sends VmDefinition::to_toml())"
                .into(),
        ));
    }
    let def = VmDefinition::parse(text, path)?;
    if def.name() != vm {
        return Err(bad(format!(
            "it defines VM {:?}, not {vm:?}: the primary sent another VM's definition",
            def.name()
        )));
    }
    let program = raw
        .get("qemu")
        .and_then(|q| q.get(0))
        .and_then(|p| p.as_str())
        .unwrap_or_default();
    let base = Path::new(program)
        .file_name()
        .and_then(|b| b.to_str())
        .unwrap_or_default();
    if !(base.starts_with("qemu-system-") || base == "qemu-kvm") {
        return Err(bad(format!(
            "qemu[0] {program:?} is not QEMU (qemu-system-ARCH or qemu-kvm): a replica site \
             starts only QEMU from a shipped definition"
        )));
    }
    Ok(def)
}

/// The definition the replica of `vm` under `store_root` holds, if any (read without the
/// replica's lock: the file is replaced atomically).
pub fn load(store_root: &Path, vm: &str) -> Result<Option<VmDefinition>, DefinitionError> {
    let bad = |reason: String| DefinitionError::Invalid {
        path: store_root.join(vm),
        reason,
    };
    vmreplica_common::validate_name(vm).map_err(|e| bad(format!("VM name: {e}")))?;
    let path = store_root.join(vm).join(DEFINITION_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(DefinitionError::Read { path, source }),
    };
    check(vm, &text, &path).map(Some)
}

/// The primary site's reverse target for `vm` (where to ship after a failover), as its shipper
/// last sent it, from the state under `store_root`.
pub fn reverse(store_root: &Path, vm: &str) -> Result<Option<ReverseTarget>, StoreError> {
    vmreplica_common::validate_name(vm).map_err(|source| StoreError::Name {
        name: vm.to_string(),
        source,
    })?;
    let p = store_root.join(vm).join("state.json");
    let state = VmState::load(&p)?.ok_or_else(|| StoreError::NoReplica(vm.to_string()))?;
    Ok(state.definition.and_then(|d| d.reverse))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Retention, Store};
    use vmreplica_common::wire::DefinitionHash;

    /// A definition of `name` whose program is `program`.
    fn text(name: &str, program: &str) -> String {
        format!(
            "version = 1\nname = \"{name}\"\ndisks = [\"sys\"]\nqemu = [\"{program}\", \
             \"-drive\", \"file=${{disk:sys}},format=raw\", \"-qmp\", \
             \"unix:${{qmp}},server=on,wait=off\", \"${{net}}\"]\nnet = [\"-nic\", \"none\"]\n"
        )
    }

    #[test]
    fn shipped_definitions_are_checked_as_input_from_a_peer() {
        let p = Path::new("/store/vm1/definition.toml");
        check("vm1", &text("vm1", "qemu-system-x86_64"), p).unwrap();
        check("vm1", &text("vm1", "/usr/libexec/qemu-kvm"), p).unwrap();
        for (t, want) in [
            (text("vm2", "qemu-system-x86_64"), "not \"vm1\""),
            (text("vm1", "/bin/sh"), "is not QEMU"),
            (text("vm1", "qemu-img"), "is not QEMU"),
            ("version = 2".to_string(), "version"),
            ("not toml [".to_string(), "definition.toml"),
            (
                format!(
                    "{}[libvirt]\ntemplate = \"/etc/shadow\"\nnet = \"\"\n",
                    text("vm1", "qemu-system-x86_64")
                ),
                "inline",
            ),
        ] {
            let e = check("vm1", &t, p).unwrap_err().to_string();
            assert!(e.contains(want), "{t}: {e}");
            assert!(e.contains("definition.toml"), "{e}");
        }
    }

    /// Stored atomically and loaded back; a refused one leaves the one held; an empty text
    /// (reverse target only) removes it; the reverse target is kept in the state.
    #[test]
    fn stored_refused_and_removed_definitions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Retention::default()).unwrap();
        let mut vs = store.open_vm("vm1", "primary-1").unwrap();
        assert!(load(dir.path(), "vm1").unwrap().is_none());
        let good = text("vm1", "qemu-system-x86_64");
        let r = ReverseTarget {
            replica: "192.0.2.5:7443".into(),
            server_name: "primary-1-applier".into(),
        };
        let h = DefinitionHash::of(&good, Some(&r));
        vs.store_definition(h, &good, Some(r.clone())).unwrap();
        assert_eq!(vs.definition_hash(), Some(h));
        assert_eq!(load(dir.path(), "vm1").unwrap().unwrap().name(), "vm1");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("vm1/definition.toml")).unwrap(),
            good
        );
        assert_eq!(reverse(dir.path(), "vm1").unwrap(), Some(r.clone()));

        let bad = text("vm1", "/bin/sh");
        let e = vs
            .store_definition(DefinitionHash::of(&bad, None), &bad, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not QEMU"), "{e}");
        assert_eq!(vs.definition_hash(), Some(h), "the one held stays");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("vm1/definition.toml")).unwrap(),
            good
        );

        let only_reverse = DefinitionHash::of("", Some(&r));
        vs.store_definition(only_reverse, "", Some(r.clone()))
            .unwrap();
        assert!(load(dir.path(), "vm1").unwrap().is_none());
        assert_eq!(reverse(dir.path(), "vm1").unwrap(), Some(r));
        drop(vs);
        // Reopened, the replica knows what it holds.
        let vs = store.open_existing("vm1").unwrap();
        assert_eq!(vs.definition_hash(), Some(only_reverse));
        assert!(load(dir.path(), "../x").is_err());
        assert!(matches!(
            reverse(dir.path(), "vm9"),
            Err(StoreError::NoReplica(_))
        ));
    }
}
