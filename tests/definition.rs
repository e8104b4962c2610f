//! The VM definition travels with the disks, with the real processes: the shipper sends the
//! one its configuration names (and its [reverse] target), the applier keeps it as
//! `STORE/VM/definition.toml`; an edit reaches the replica with the next cycle; a definition
//! the primary cannot check is not sent; one the replica refuses (sent by a hostile primary)
//! is refused with a clear error; replication goes on throughout and the replica keeps the
//! last good definition.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::site::*;
use vmreplica_common::wire::{DefinitionHash, Message, ReverseTarget, PROTOCOL_VERSION};
use vmreplica_vm::VmDefinition;

const LIMIT: Duration = Duration::from_secs(120);

/// A definition of VM `name` with disk `sys` and `mem` MiB.
fn definition(name: &str, program: &str, mem: u32) -> String {
    format!(
        "version = 1\nname = \"{name}\"\ndisks = [\"sys\"]\nqemu = [\"{program}\", \"-m\", \
         \"{mem}\", \"-drive\", \"file=${{disk:sys}},format=raw,if=virtio\", \"-qmp\", \
         \"unix:${{qmp}},server=on,wait=off\", \"${{net}}\"]\nnet = [\"-nic\", \"none\"]\n"
    )
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "waited for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The definition state the replica's state file records.
fn recorded(store: &Path) -> serde_json::Value {
    let path = store.join("vm1/state.json");
    // `definition.toml` is written before the state that names it (the first state a new
    // replica saves): under load a test saw the one without the other.
    wait_until("the replica's state", || path.exists());
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["state"]["definition"].clone()
}

/// Connects as the primary (its certificate), says hello for vm1, sends `def` with `hash`,
/// and returns the welcome's definition hash and the applier's answer.
fn send_definition(
    site: &Site,
    hash: DefinitionHash,
    def: &str,
) -> (Option<DefinitionHash>, Option<String>) {
    let definition = Message::Definition {
        hash,
        definition: def.to_string(),
        reverse: None,
    };
    let answers = site.talk_as_primary(PROTOCOL_VERSION, &[definition]);
    let held = match &answers[0] {
        Message::Welcome { definition, .. } => *definition,
        other => panic!("{other:?}"),
    };
    let answer = match &answers[1] {
        Message::DefinitionStored { hash: h, error } => {
            assert_eq!(*h, hash);
            error.clone()
        }
        other => panic!("{other:?}"),
    };
    (held, answer)
}

#[test]
fn the_vm_definition_travels_with_the_disks_and_bad_ones_never_stop_replication() {
    let (dir, site, img, tracker) = small_site(2);
    let def_path = dir.path().join("vm1.vm.toml");
    std::fs::write(&def_path, definition("vm1", "qemu-system-x86_64", 512)).unwrap();
    let config = site.config_with(
        &tracker,
        "300ms",
        "definition = \"vm1.vm.toml\"\n[reverse]\nreplica = \"192.0.2.5:7443\"\nserver_name = \"primary-1-applier\"\n",
    );
    let _applier = site.applier();
    let _shipper = site.shipper(&config, &[]);
    let stored = site.store.join("vm1/definition.toml");
    wait_until("the definition on the replica", || stored.exists());
    let want = VmDefinition::load(&def_path).unwrap().to_toml();
    assert_eq!(std::fs::read_to_string(&stored).unwrap(), want);
    let reverse = ReverseTarget {
        replica: "192.0.2.5:7443".into(),
        server_name: "primary-1-applier".into(),
    };
    let rec = recorded(&site.store);
    assert_eq!(
        rec["hash"].as_str().unwrap(),
        DefinitionHash::of(&want, Some(&reverse)).to_string()
    );
    assert_eq!(rec["reverse"]["server_name"], "primary-1-applier");
    wait_log(&site, "shipper", "the replica's answer", LIMIT, |l| {
        l.contains("the replica holds the VM definition")
    });

    // Edited on the primary: on the replica with the next cycle, without a restart.
    std::fs::write(&def_path, definition("vm1", "qemu-system-x86_64", 768)).unwrap();
    wait_until("the edited definition", || {
        std::fs::read_to_string(&stored).is_ok_and(|t| t.contains("\"768\""))
    });

    // Broken on the primary (another VM's): said in the shipper's log, not sent; cycles go
    // on and the replica keeps the last good one.
    std::fs::write(&def_path, definition("vm2", "qemu-system-x86_64", 1024)).unwrap();
    wait_log(
        &site,
        "shipper",
        "the refusal of vm2's definition",
        LIMIT,
        |l| l.contains("it defines VM \"vm2\""),
    );
    let n = site.applied();
    site.wait_cycles(n, 3, LIMIT);
    assert!(std::fs::read_to_string(&stored)
        .unwrap()
        .contains("\"768\""));

    // A hostile primary sends definitions the replica refuses: a program that is not QEMU,
    // a hash that is not the text's. Clear answers; the good one stays.
    let held = DefinitionHash::parse(recorded(&site.store)["hash"].as_str().unwrap()).unwrap();
    let bad = definition("vm1", "/bin/sh", 512);
    let (welcome, answer) = send_definition(&site, DefinitionHash::of(&bad, None), &bad);
    assert_eq!(welcome, Some(held), "the welcome names the definition held");
    let e = answer.expect("refused");
    assert!(
        e.contains("is not QEMU") && e.contains("definition.toml"),
        "{e}"
    );
    let good = definition("vm1", "qemu-system-x86_64", 2048);
    let (_, answer) = send_definition(&site, DefinitionHash([9; 16]), &good);
    assert!(answer.expect("refused").contains("does not match its hash"));
    assert!(std::fs::read_to_string(&stored)
        .unwrap()
        .contains("\"768\""));
    assert_eq!(
        DefinitionHash::parse(recorded(&site.store)["hash"].as_str().unwrap()).unwrap(),
        held
    );
    assert!(site
        .log("applier")
        .contains("refused the VM definition the primary sent"));

    // Fixed on the primary: it lands; replication went on throughout.
    std::fs::write(&def_path, definition("vm1", "qemu-system-x86_64", 4096)).unwrap();
    wait_until("the fixed definition", || {
        std::fs::read_to_string(&stored).is_ok_and(|t| t.contains("\"4096\""))
    });
    let n = site.applied();
    site.wait_cycles(n, 2, LIMIT);
    site.assert_equal(&config, &img);
}

/// A definition named in the configuration after the shipper started reaches the replica on
/// a reload (SIGHUP), without a restart; so does a changed `[reverse]`. (The shipper kept
/// reading the file it was started with.)
#[test]
fn a_reloaded_configuration_ships_the_definition_it_names() {
    let (dir, site, img, tracker) = small_site(2);
    let def_path = dir.path().join("vm1.vm.toml");
    std::fs::write(&def_path, definition("vm1", "qemu-system-x86_64", 512)).unwrap();
    let config = site.config_with(&tracker, "300ms", "");
    let _applier = site.applier();
    let shipper = site.shipper(&config, &[]);
    site.wait_cycles(0, 2, LIMIT);
    let stored = site.store.join("vm1/definition.toml");
    assert!(!stored.exists());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "definition = \"vm1.vm.toml\"\n[reverse]\nreplica = \"192.0.2.5:7443\"\nserver_name = \"a\"\n",
    );
    std::fs::write(&config, &text).unwrap();
    // SAFETY: kill(2) on the pid of our own, running child.
    unsafe { libc::kill(shipper.0.id() as i32, libc::SIGHUP) };
    wait_until("the definition after a reload", || stored.exists());
    assert_eq!(recorded(&site.store)["reverse"]["server_name"], "a");
    std::fs::write(
        &config,
        text.replace("server_name = \"a\"", "server_name = \"b\""),
    )
    .unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(shipper.0.id() as i32, libc::SIGHUP) };
    wait_until("the new reverse target", || {
        recorded(&site.store)["reverse"]["server_name"] == "b"
    });
    let n = site.applied();
    site.wait_cycles(n, 2, LIMIT);
    site.assert_equal(&config, &img);
}
