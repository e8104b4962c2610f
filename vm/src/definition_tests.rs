use super::*;

const DEF: &str = r#"
version = 1
name = "vm1"
disks = ["sys", "data"]
qemu = [
  "qemu-system-x86_64", "-name", "${name}", "-m", "1024",
  "-drive", "file=${disk:sys},format=raw,if=virtio,cache=none",
  "-drive", "file=${disk:data},format=raw,if=virtio",
  "-qmp", "unix:${qmp},server=on,wait=off",
  "-chardev", "socket,id=qga0,path=${qga},server=on,wait=off",
  "-serial", "file:${console}",
  "${net}",
  "-object", '{"qom-type":"iothread","id":"io1"}',
  "-cost", "$$0",
]
net = ["-nic", "bridge,br=br0,model=virtio-net-pci"]
"#;

fn path() -> &'static Path {
    Path::new("/etc/vmreplica/vm1.toml")
}

fn input(network: Network) -> RenderInput {
    RenderInput {
        disks: [
            (
                "sys",
                "nbd+unix:///sys?socket=/var/lib/vmreplica/vm1/nbd.sock",
            ),
            ("data", "nbds://primary.example:10809/data"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect(),
        qmp: "/run/vmreplica/vm1/qmp.sock".into(),
        qga: "/run/vmreplica/vm1/qga.sock".into(),
        console: "/run/vmreplica/vm1/console.log".into(),
        network,
    }
}

fn err(text: &str) -> String {
    VmDefinition::parse(text, path()).unwrap_err().to_string()
}

#[test]
fn renders_disks_sockets_and_either_network() {
    let d = VmDefinition::parse(DEF, path()).unwrap();
    assert_eq!(d.name(), "vm1");
    assert_eq!(d.disks(), ["sys", "data"]);
    let argv = d.render_qemu(&input(Network::Production)).unwrap();
    let line = argv.join(" ");
    assert!(line.starts_with("qemu-system-x86_64 -name vm1 -m 1024 -drive file=nbd+unix:///sys?socket=/var/lib/vmreplica/vm1/nbd.sock,format=raw"), "{line}");
    assert!(line.contains("-drive file=nbds://primary.example:10809/data,format=raw"));
    assert!(line.contains("-qmp unix:/run/vmreplica/vm1/qmp.sock,server=on,wait=off"));
    assert!(line.contains("path=/run/vmreplica/vm1/qga.sock,"));
    assert!(line.contains("-serial file:/run/vmreplica/vm1/console.log -nic bridge,br=br0,model=virtio-net-pci -object"));
    assert!(argv.contains(&r#"{"qom-type":"iothread","id":"io1"}"#.to_string()));
    assert_eq!(argv.last().unwrap(), "$0");

    let test = d.render_qemu(&input(Network::Test)).unwrap();
    let line = test.join(" ");
    assert!(line.contains("console.log -nic none -object"), "{line}");
    assert!(!line.contains("br0"));
}

#[test]
fn render_refuses_missing_unknown_and_bad_disks() {
    let d = VmDefinition::parse(DEF, path()).unwrap();
    let mut i = input(Network::Production);
    i.disks.remove("data");
    let e = d.render_qemu(&i).unwrap_err().to_string();
    assert!(
        e.contains("/etc/vmreplica/vm1.toml")
            && e.contains("\"data\"")
            && e.contains("${disk:data}")
            && e.contains("qemu[8]"),
        "{e}"
    );

    let mut i = input(Network::Production);
    i.disks.insert("swap".into(), "nbd://h/swap".into());
    let e = d.render_qemu(&i).unwrap_err().to_string();
    assert!(e.contains("\"swap\"") && e.contains("sys, data"), "{e}");

    let mut i = input(Network::Production);
    i.disks.insert("sys".into(), "/images/sys.raw".into());
    let e = d.render_qemu(&i).unwrap_err().to_string();
    assert!(
        e.contains("not an NBD URI") && e.contains("/images/sys.raw"),
        "{e}"
    );

    let mut i = input(Network::Production);
    i.qmp = "/run/a,b/qmp.sock".into();
    let e = d.render_qemu(&i).unwrap_err().to_string();
    assert!(e.contains("','"), "{e}");
}

#[test]
fn load_refuses_unknown_placeholders_naming_file_and_argument() {
    let e = err(&DEF.replace("${qga}", "${guest_agent}"));
    assert!(
        e.contains("/etc/vmreplica/vm1.toml")
            && e.contains("${guest_agent}")
            && e.contains("qemu[12]"),
        "{e}"
    );
    let e = err(&DEF.replace("$$0", "$0"));
    assert!(e.contains("'$$'"), "{e}");
    let e = err(&DEF.replace("${disk:data}", "${disk:dta}"));
    assert!(e.contains("\"dta\"") && e.contains("not in disks"), "{e}");
    let e = err(&DEF.replace("\"sys\", \"data\"", "\"sys\", \"data\", \"swap\""));
    assert!(e.contains("never uses disk \"swap\""), "{e}");
}

#[test]
fn load_refuses_what_would_break_isolation_or_the_launcher() {
    for (from, to, want) in [
        ("\"${net}\",", "", "exactly once"),
        ("\"${net}\",", "\"${net}\", \"${net}\",", "exactly once"),
        ("\"${net}\",", "\"x${net}\",", "whole argument"),
        (
            "\"-m\", \"1024\"",
            "\"-netdev\", \"user,id=n\"",
            "belong in `net`",
        ),
        ("\"-m\", \"1024\"", "\"--nic\", \"user\"", "belong in `net`"),
        ("\"-m\", \"1024\"", "\"-pidfile\", \"/x\"", "launcher"),
        ("\"-m\", \"1024\"", "\"-daemonize\", \"-m\"", "launcher"),
        (
            "unix:${qmp},server=on,wait=off",
            "tcp:127.0.0.1:4444",
            "no ${qmp}",
        ),
        ("version = 1", "version = 2", "version 2 is not supported"),
        ("version = 1", "", "no version"),
        ("name = \"vm1\"", "name = \"../vm1\"", "name"),
        ("\"sys\", \"data\"", "\"sys\", \"sys\"", "twice"),
        ("\"sys\", \"data\"", "", "disks is empty"),
        ("net = [", "colour = 1\nnet = [", "colour"),
        ("file=${disk:sys}", "file=${disk_source:sys}", "libvirt XML"),
    ] {
        let text = DEF.replacen(from, to, 1);
        assert_ne!(text, DEF, "{from} not in the definition");
        let e = err(&text);
        assert!(
            e.contains(want) && e.contains("vm1.toml"),
            "{from} -> {to}: {e}"
        );
    }
    // The network lists take the launcher's options neither.
    let e = err(&DEF.replace("net = [\"-nic\"", "net = [\"-daemonize\", \"-nic\""));
    assert!(e.contains("net[0]"), "{e}");
}

const XML: &str = "<domain type='kvm'>\n  <name>${name}</name>\n  <devices>\n    <disk type='network' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n      ${disk_source:sys}\n      <target dev='vda' bus='virtio'/>\n    </disk>\n    <disk type='network' device='disk'>\n      ${disk_source:data}\n      <target dev='vdb' bus='virtio'/>\n    </disk>\n    <serial type='file'><source path='${console}'/></serial>\n    ${net}\n  </devices>\n</domain>\n";

#[test]
fn renders_libvirt_xml_from_a_template_file_and_inlines_it_for_shipping() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vm1.xml"), XML).unwrap();
    let def = format!(
        "{DEF}\n[libvirt]\ntemplate = \"vm1.xml\"\nnet = \"<interface type='bridge'><source bridge='br0'/></interface>\"\n"
    );
    let p = dir.path().join("vm1.toml");
    std::fs::write(&p, &def).unwrap();
    let d = VmDefinition::load(&p).unwrap();
    let xml = d.render_libvirt(&input(Network::Production)).unwrap();
    assert!(xml.contains("<name>vm1</name>"));
    assert!(xml.contains("<source protocol='nbd' name='sys'><host transport='unix' socket='/var/lib/vmreplica/vm1/nbd.sock'/></source>"), "{xml}");
    assert!(xml.contains("<source protocol='nbd' name='data' tls='yes'><host name='primary.example' port='10809'/></source>"));
    assert!(xml.contains("<interface type='bridge'><source bridge='br0'/></interface>"));
    let test = d.render_libvirt(&input(Network::Test)).unwrap();
    assert!(!test.contains("<interface"), "{test}");

    // Self-contained: the template travels inside, and renders the same elsewhere.
    let shipped = d.to_toml();
    assert!(!shipped.contains("template"), "{shipped}");
    let again = VmDefinition::parse(&shipped, Path::new("/elsewhere/vm1.toml")).unwrap();
    assert_eq!(
        again.render_libvirt(&input(Network::Production)).unwrap(),
        xml
    );
    assert_eq!(
        again.render_qemu(&input(Network::Test)).unwrap(),
        d.render_qemu(&input(Network::Test)).unwrap()
    );

    // XML values are escaped.
    let mut i = input(Network::Production);
    i.console = "/run/a&b/console.log".into();
    assert!(d
        .render_libvirt(&i)
        .unwrap()
        .contains("/run/a&amp;b/console.log"));
}

#[test]
fn libvirt_template_is_checked_like_the_command_line() {
    let with = |xml: &str, extra: &str| {
        format!(
            "{DEF}\n[libvirt]\nxml = '''{xml}'''\nnet = \"<interface type='network'/>\"\n{extra}"
        )
    };
    assert!(VmDefinition::parse(&with(XML, ""), path()).is_ok());
    let e = err(&with(
        &XML.replace("${net}", "<interface type='user'/>"),
        "",
    ));
    assert!(e.contains("<interface>"), "{e}");
    let e = err(&with(&XML.replace("${disk_source:data}", ""), ""));
    assert!(e.contains("never uses disk \"data\""), "{e}");
    let e = err(&with(&XML.replace("${name}", "${nam}"), ""));
    assert!(e.contains("${nam}") && e.contains("libvirt xml"), "{e}");
    let e = err(&format!("{DEF}\n[libvirt]\nnet = \"\"\n"));
    assert!(e.contains("template"), "{e}");
    let e = err(&format!(
        "{DEF}\n[libvirt]\ntemplate = \"missing.xml\"\nnet = \"\"\n"
    ));
    assert!(e.contains("/etc/vmreplica/missing.xml"), "{e}");
    let d = VmDefinition::parse(DEF, path()).unwrap();
    let e = d
        .render_libvirt(&input(Network::Test))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no [libvirt] section"), "{e}");
}

#[test]
fn a_missing_file_is_named() {
    let e = VmDefinition::load(Path::new("/nonexistent/vm9.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/vm9.toml"), "{e}");
}
