//! A VM definition: how to start a protected VM on whichever site holds its disks.
//!
//! ```toml
//! version = 1
//! name = "vm1"
//! disks = ["sys", "data"]            # the tracker's export names, as the guest sees them
//! # QEMU's command line, one list element per argument (no shell). Placeholders:
//! #   ${disk:NAME}  the disk's NBD URI         ${qmp}      the QMP socket path
//! #   ${qga}        the guest-agent socket     ${console}  the serial console log
//! #   ${name}       the VM's name              ${net}      the network (a whole argument)
//! #   $$            a literal '$'
//! qemu = [
//!   "qemu-system-x86_64", "-name", "${name}", "-machine", "q35,accel=kvm", "-m", "4096",
//!   "-drive", "file=${disk:sys},format=raw,if=virtio,cache=none",
//!   "-drive", "file=${disk:data},format=raw,if=virtio,cache=none",
//!   "-qmp", "unix:${qmp},server=on,wait=off",
//!   "-chardev", "socket,id=qga0,path=${qga},server=on,wait=off",
//!   "-device", "virtio-serial-pci",
//!   "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
//!   "-serial", "file:${console}", "-display", "none",
//!   "${net}",
//! ]
//! net = ["-nic", "bridge,br=br0,model=virtio-net-pci,mac=52:54:00:00:00:01"]
//! test_net = ["-nic", "none"]        # the isolated network of test failovers (this default)
//!
//! [libvirt]                          # optional: a domain XML with the same placeholders,
//! template = "vm1.xml"               # plus ${disk_source:NAME} (a <source> element);
//! net = "<interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>"
//! test_net = ""                      # or xml = '''...''' inline instead of template
//! ```
//!
//! Network arguments (`-nic`, `-netdev`, `-net`; `<interface>` in XML) belong in `net` only,
//! so that a test failover can always start the VM isolated. `-pidfile` and `-daemonize`
//! belong to the launcher.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::template::{self, xml_escape, Piece, Placeholder, TemplateError};
use crate::uri::NbdUri;

/// The format version this code reads and writes.
pub const DEFINITION_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("VM definition {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM definition {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("VM definition {path}: {field}: {source}")]
    Template {
        path: PathBuf,
        field: String,
        source: TemplateError,
    },
    #[error("VM definition {path}: no NBD URI given for disk {disk:?} ({placeholder} in {field}); give one for each of its disks ({declared})")]
    MissingDisk {
        path: PathBuf,
        disk: String,
        placeholder: String,
        field: String,
        declared: String,
    },
    #[error("VM definition {path}: a URI was given for disk {disk:?}, which the definition does not declare (its disks: {declared})")]
    UnknownDisk {
        path: PathBuf,
        disk: String,
        declared: String,
    },
    #[error("VM definition {path}: disk {disk:?}: {uri:?} is not an NBD URI: {reason}")]
    BadUri {
        path: PathBuf,
        disk: String,
        uri: String,
        reason: String,
    },
    #[error("VM definition {path}: has no [libvirt] section, so there is no domain XML to render")]
    NoLibvirt { path: PathBuf },
}

/// Which network the VM is started on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// `net`: the VM's production network.
    Production,
    /// `test_net`: the isolated network of a test failover.
    Test,
}

/// The values placeholders are replaced with.
#[derive(Clone, Debug)]
pub struct RenderInput {
    /// Disk name → NBD URI (`nbd+unix:///NAME?socket=PATH`, `nbds://HOST:PORT/NAME`, ...).
    pub disks: BTreeMap<String, String>,
    pub qmp: PathBuf,
    pub qga: PathBuf,
    pub console: PathBuf,
    pub network: Network,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLibvirt {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    template: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    xml: Option<String>,
    net: String,
    #[serde(default)]
    test_net: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    version: Option<u32>,
    name: String,
    disks: Vec<String>,
    qemu: Vec<String>,
    net: Vec<String>,
    #[serde(default = "default_test_net")]
    test_net: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    libvirt: Option<RawLibvirt>,
}

fn default_test_net() -> Vec<String> {
    vec!["-nic".into(), "none".into()]
}

/// A parsed libvirt domain XML template.
#[derive(Clone, Debug)]
struct Libvirt {
    xml: Vec<Piece>,
    net: String,
    test_net: String,
}

/// A checked VM definition.
#[derive(Clone, Debug)]
pub struct VmDefinition {
    path: PathBuf,
    raw: Raw,
    qemu: Vec<Vec<Piece>>,
    net: Vec<Vec<Piece>>,
    test_net: Vec<Vec<Piece>>,
    libvirt: Option<Libvirt>,
}

/// QEMU options the launcher owns.
const LAUNCHER_FLAGS: &[&str] = &["pidfile", "daemonize"];
/// QEMU options that attach the VM to a network.
const NET_FLAGS: &[&str] = &["nic", "netdev", "net"];

fn flag(arg: &str) -> Option<&str> {
    let a = arg.strip_prefix('-')?;
    Some(a.strip_prefix('-').unwrap_or(a))
}

impl VmDefinition {
    /// Reads and checks a definition file.
    pub fn load(path: &Path) -> Result<VmDefinition, DefinitionError> {
        let text = std::fs::read_to_string(path).map_err(|source| DefinitionError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Checks a definition's text; `path` names it in messages and anchors a relative
    /// libvirt template path.
    pub fn parse(text: &str, path: &Path) -> Result<VmDefinition, DefinitionError> {
        let bad = |reason: String| DefinitionError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let tpl = |field: String, s: &str| {
            template::parse(s).map_err(|source| DefinitionError::Template {
                path: path.to_path_buf(),
                field,
                source,
            })
        };
        let mut raw: Raw = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        match raw.version {
            Some(DEFINITION_VERSION) => {}
            Some(v) => {
                return Err(bad(format!(
                "version {v} is not supported (this vmreplica reads version {DEFINITION_VERSION})"
            )))
            }
            None => {
                return Err(bad(format!(
                    "no version: add version = {DEFINITION_VERSION}"
                )))
            }
        }
        vmreplica_common::validate_name(&raw.name).map_err(|e| bad(format!("name: {e}")))?;
        if raw.disks.is_empty() {
            return Err(bad(
                "disks is empty: list the VM's disks (the tracker's export names)".into(),
            ));
        }
        let mut declared = BTreeSet::new();
        for d in &raw.disks {
            vmreplica_common::validate_name(d).map_err(|e| bad(format!("disks: {e}")))?;
            if !declared.insert(d.clone()) {
                return Err(bad(format!("disks: {d:?} is listed twice")));
            }
        }
        if raw.qemu.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(bad(
                "qemu: the first element must be the QEMU program".into()
            ));
        }

        let mut qemu = Vec::new();
        let mut used = BTreeSet::new();
        let (mut qmp, mut net_at) = (false, Vec::new());
        for (i, a) in raw.qemu.iter().enumerate() {
            let field = format!("qemu[{i}] {a:?}");
            if let Some(f) = flag(a) {
                if LAUNCHER_FLAGS.contains(&f) {
                    return Err(bad(format!(
                        "{field}: the launcher sets -{f} itself; remove it"
                    )));
                }
                if NET_FLAGS.contains(&f) {
                    return Err(bad(format!(
                        "{field}: network options belong in `net` (and \"${{net}}\" in qemu), so that a test failover can start the VM isolated"
                    )));
                }
            }
            let pieces = tpl(field.clone(), a)?;
            for p in &pieces {
                match p {
                    Piece::Var(Placeholder::Net) if pieces.len() == 1 => net_at.push(i),
                    Piece::Var(Placeholder::Net) => {
                        return Err(bad(format!("{field}: ${{net}} must be a whole argument")))
                    }
                    Piece::Var(Placeholder::DiskSource(_)) => {
                        return Err(bad(format!(
                            "{field}: ${{disk_source:...}} is for libvirt XML; use ${{disk:NAME}} in qemu"
                        )))
                    }
                    Piece::Var(Placeholder::Disk(d)) => {
                        used.insert(d.clone());
                    }
                    Piece::Var(Placeholder::Qmp) => qmp = true,
                    _ => {}
                }
            }
            qemu.push(pieces);
        }
        if !qmp {
            return Err(bad(
                "qemu: no ${qmp} (e.g. \"-qmp\", \"unix:${qmp},server=on,wait=off\"): vmreplica stops and watches the VM through QMP".into(),
            ));
        }
        if net_at.len() != 1 {
            return Err(bad(format!(
                "qemu: \"${{net}}\" must appear exactly once as a whole argument (found {})",
                net_at.len()
            )));
        }
        check_disks(&declared, &used, "qemu").map_err(bad)?;

        let mut nets = Vec::new();
        for (key, list) in [("net", &raw.net), ("test_net", &raw.test_net)] {
            let mut parsed = Vec::new();
            for (i, a) in list.iter().enumerate() {
                let field = format!("{key}[{i}] {a:?}");
                if flag(a).is_some_and(|f| LAUNCHER_FLAGS.contains(&f)) {
                    return Err(bad(format!("{field}: the launcher sets this itself")));
                }
                let pieces = tpl(field.clone(), a)?;
                if pieces.iter().any(|p| {
                    matches!(
                        p,
                        Piece::Var(
                            Placeholder::Net | Placeholder::Disk(_) | Placeholder::DiskSource(_)
                        )
                    )
                }) {
                    return Err(bad(format!(
                        "{field}: no ${{net}} or disk placeholders here"
                    )));
                }
                parsed.push(pieces);
            }
            nets.push(parsed);
        }
        let test_net = nets.pop().unwrap_or_default();
        let net = nets.pop().unwrap_or_default();

        let libvirt = match &mut raw.libvirt {
            None => None,
            Some(l) => {
                let (xml, origin) = match (&l.template, &l.xml) {
                    (Some(t), None) => {
                        let full = if t.is_absolute() {
                            t.clone()
                        } else {
                            path.parent().unwrap_or(Path::new(".")).join(t)
                        };
                        let xml = std::fs::read_to_string(&full).map_err(|e| {
                            bad(format!("libvirt template {}: {e}", full.display()))
                        })?;
                        (xml, format!("libvirt template {}", full.display()))
                    }
                    (None, Some(x)) => (x.clone(), "libvirt xml".to_string()),
                    _ => {
                        return Err(bad(
                            "[libvirt]: give either template = \"FILE\" or xml = '''...'''".into(),
                        ))
                    }
                };
                let pieces = tpl(origin.clone(), &xml)?;
                let mut used = BTreeSet::new();
                let mut nets = 0;
                for p in &pieces {
                    match p {
                        Piece::Var(Placeholder::Disk(d) | Placeholder::DiskSource(d)) => {
                            used.insert(d.clone());
                        }
                        Piece::Var(Placeholder::Net) => nets += 1,
                        Piece::Text(t) if t.contains("<interface") => {
                            return Err(bad(format!(
                                "{origin}: <interface> elements belong in [libvirt] net, so that a test failover can start the VM isolated"
                            )))
                        }
                        _ => {}
                    }
                }
                if nets != 1 {
                    return Err(bad(format!(
                        "{origin}: ${{net}} must appear exactly once (found {nets})"
                    )));
                }
                check_disks(&declared, &used, &origin).map_err(bad)?;
                for (k, v) in [("net", &l.net), ("test_net", &l.test_net)] {
                    if v.contains('$') {
                        return Err(bad(format!("[libvirt] {k}: no placeholders here")));
                    }
                }
                // Keep the text itself, so that to_toml() is self-contained.
                l.xml = Some(xml);
                l.template = None;
                Some(Libvirt {
                    xml: pieces,
                    net: l.net.clone(),
                    test_net: l.test_net.clone(),
                })
            }
        };
        Ok(VmDefinition {
            path: path.to_path_buf(),
            raw,
            qemu,
            net,
            test_net,
            libvirt,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.raw.name
    }

    /// The VM's disks (export names), in the order the definition lists them.
    pub fn disks(&self) -> &[String] {
        &self.raw.disks
    }

    /// The file this definition came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a libvirt domain XML template is part of the definition.
    pub fn has_libvirt(&self) -> bool {
        self.libvirt.is_some()
    }

    /// The definition as one self-contained TOML text (a libvirt template file inlined), to
    /// ship to the other site; `parse` reads it back.
    pub fn to_toml(&self) -> String {
        let mut raw = self.raw.clone();
        raw.version = Some(DEFINITION_VERSION);
        toml::to_string(&raw).expect("a checked definition serializes")
    }

    fn check_input(&self, input: &RenderInput) -> Result<(), DefinitionError> {
        for (disk, uri) in &input.disks {
            if !self.raw.disks.contains(disk) {
                return Err(DefinitionError::UnknownDisk {
                    path: self.path.clone(),
                    disk: disk.clone(),
                    declared: self.raw.disks.join(", "),
                });
            }
            NbdUri::parse(uri).map_err(|reason| DefinitionError::BadUri {
                path: self.path.clone(),
                disk: disk.clone(),
                uri: uri.clone(),
                reason,
            })?;
        }
        Ok(())
    }

    fn value(
        &self,
        p: &Placeholder,
        input: &RenderInput,
        field: &str,
    ) -> Result<String, DefinitionError> {
        let path_str = |what: &str, p: &Path| {
            p.to_str()
                .map(str::to_string)
                .ok_or_else(|| DefinitionError::Invalid {
                    path: self.path.clone(),
                    reason: format!("the {what} path {} is not UTF-8", p.display()),
                })
        };
        let uri = |d: &String| {
            input
                .disks
                .get(d)
                .ok_or_else(|| DefinitionError::MissingDisk {
                    path: self.path.clone(),
                    disk: d.clone(),
                    placeholder: p.to_string(),
                    field: field.to_string(),
                    declared: self.raw.disks.join(", "),
                })
        };
        Ok(match p {
            Placeholder::Name => self.raw.name.clone(),
            Placeholder::Disk(d) => uri(d)?.clone(),
            Placeholder::DiskSource(d) => NbdUri::parse(uri(d)?)
                .map(|u| u.libvirt_source())
                .unwrap_or_default(),
            Placeholder::Qmp => path_str("QMP socket", &input.qmp)?,
            Placeholder::Qga => path_str("guest-agent socket", &input.qga)?,
            Placeholder::Console => path_str("console log", &input.console)?,
            Placeholder::Net => unreachable!("${{net}} is expanded by the caller"),
        })
    }

    fn render_arg(
        &self,
        pieces: &[Piece],
        input: &RenderInput,
        field: &str,
    ) -> Result<String, DefinitionError> {
        let mut s = String::new();
        for p in pieces {
            match p {
                Piece::Text(t) => s.push_str(t),
                Piece::Var(v) => {
                    let val = self.value(v, input, field)?;
                    if matches!(
                        v,
                        Placeholder::Qmp | Placeholder::Qga | Placeholder::Console
                    ) && val.contains(',')
                    {
                        return Err(DefinitionError::Invalid {
                            path: self.path.clone(),
                            reason: format!(
                                "{field}: the path {val:?} contains ',', which splits a QEMU option; use a run directory without ','"
                            ),
                        });
                    }
                    s.push_str(&val);
                }
            }
        }
        Ok(s)
    }

    /// The QEMU command line (program first) for `input`.
    pub fn render_qemu(&self, input: &RenderInput) -> Result<Vec<String>, DefinitionError> {
        self.check_input(input)?;
        let net = match input.network {
            Network::Production => (&self.net, "net"),
            Network::Test => (&self.test_net, "test_net"),
        };
        let mut argv = Vec::new();
        for (i, pieces) in self.qemu.iter().enumerate() {
            if let [Piece::Var(Placeholder::Net)] = pieces.as_slice() {
                for (j, n) in net.0.iter().enumerate() {
                    argv.push(self.render_arg(n, input, &format!("{}[{j}]", net.1))?);
                }
            } else {
                argv.push(self.render_arg(pieces, input, &format!("qemu[{i}]"))?);
            }
        }
        Ok(argv)
    }

    /// The libvirt domain XML for `input`.
    pub fn render_libvirt(&self, input: &RenderInput) -> Result<String, DefinitionError> {
        let l = self
            .libvirt
            .as_ref()
            .ok_or_else(|| DefinitionError::NoLibvirt {
                path: self.path.clone(),
            })?;
        self.check_input(input)?;
        let mut s = String::new();
        for p in &l.xml {
            match p {
                Piece::Text(t) => s.push_str(t),
                Piece::Var(Placeholder::Net) => s.push_str(match input.network {
                    Network::Production => &l.net,
                    Network::Test => &l.test_net,
                }),
                Piece::Var(v @ Placeholder::DiskSource(_)) => {
                    s.push_str(&self.value(v, input, "libvirt XML")?)
                }
                Piece::Var(v) => s.push_str(&xml_escape(&self.value(v, input, "libvirt XML")?)),
            }
        }
        Ok(s)
    }
}

fn check_disks(
    declared: &BTreeSet<String>,
    used: &BTreeSet<String>,
    what: &str,
) -> Result<(), String> {
    if let Some(d) = used.difference(declared).next() {
        return Err(format!(
            "{what} uses disk {d:?}, which is not in disks ({})",
            join(declared)
        ));
    }
    if let Some(d) = declared.difference(used).next() {
        return Err(format!(
            "{what} never uses disk {d:?} (add ${{disk:{d}}}, or remove it from disks)"
        ));
    }
    Ok(())
}

fn join(s: &BTreeSet<String>) -> String {
    s.iter().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
#[path = "definition_tests.rs"]
mod tests;
