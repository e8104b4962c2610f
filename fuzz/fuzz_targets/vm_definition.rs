//! Fuzzes what a VM definition file holds (`vmreplica_vm`): the TOML, its `${...}` templates
//! and the NBD URIs rendering takes.
//!
//! Checked on every input:
//! - no parser panics (definition, template, NBD URI);
//! - a definition that loads renders its QEMU command line for both networks once every disk
//!   has a URI, and its libvirt XML when it has one;
//! - `to_toml` (what is shipped to the other site) loads back and renders the same.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmreplica_vm::{template, NbdUri, Network, RenderInput, VmDefinition};

fn input(def: &VmDefinition, network: Network) -> RenderInput {
    let disks: BTreeMap<String, String> = def
        .disks()
        .iter()
        .map(|d| (d.clone(), format!("nbd+unix:///{d}?socket=/run/vmreplica/vm1/nbd.sock")))
        .collect();
    RenderInput {
        disks,
        qmp: "/run/vmreplica/vm/vm1/qmp.sock".into(),
        qga: "/run/vmreplica/vm/vm1/qga.sock".into(),
        console: "/run/vmreplica/vm/vm1/console.log".into(),
        network,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = template::parse(text);
    if let Ok(u) = NbdUri::parse(text) {
        let _ = u.libvirt_source();
    }
    let Ok(def) = VmDefinition::parse(text, Path::new("/fuzz/vm1.toml")) else {
        return;
    };
    let again = VmDefinition::parse(&def.to_toml(), Path::new("/elsewhere/vm1.toml"))
        .expect("a definition's own TOML loads");
    for network in [Network::Production, Network::Test] {
        let i = input(&def, network);
        let argv = def.render_qemu(&i).expect("every disk has a URI");
        assert_eq!(again.render_qemu(&i).unwrap(), argv);
        if def.has_libvirt() {
            let xml = def.render_libvirt(&i).expect("every disk has a URI");
            assert_eq!(again.render_libvirt(&i).unwrap(), xml);
        }
    }
});
