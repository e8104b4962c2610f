//! `vmreplica vm ...`: check a VM definition by rendering it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Subcommand;
use vmreplica_vm::{Instance, Network, VmDefinition, DEFAULT_RUN_ROOT};

#[derive(Subcommand)]
pub enum VmOp {
    /// Print the QEMU command line (or libvirt domain XML) a VM definition gives, with each
    /// disk on the NBD URI given: what failover would start.
    Render {
        /// The VM definition (TOML).
        definition: PathBuf,
        /// A disk's NBD URI, as NAME=URI (e.g. sys=nbd+unix:///sys?socket=/var/lib/vmreplica/vm1/nbd.sock). Repeatable; one per disk.
        #[arg(long = "disk", value_name = "NAME=URI")]
        disks: Vec<String>,
        /// Use the isolated test network (`test_net`) instead of the production one.
        #[arg(long)]
        test_net: bool,
        /// Print the libvirt domain XML instead of the QEMU command line.
        #[arg(long)]
        libvirt: bool,
        /// Run directory whose sockets and console log the placeholders name (default:
        /// /run/vmreplica/vm/NAME).
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
}

pub fn run(op: VmOp) -> Result<()> {
    match op {
        VmOp::Render {
            definition,
            disks,
            test_net,
            libvirt,
            run_dir,
        } => {
            let def = VmDefinition::load(&definition)?;
            let mut uris = BTreeMap::new();
            for d in &disks {
                let Some((name, uri)) = d.split_once('=') else {
                    bail!("--disk {d:?}: expected NAME=URI");
                };
                if uris.insert(name.to_string(), uri.to_string()).is_some() {
                    bail!("--disk {name} is given twice");
                }
            }
            let dir = run_dir.unwrap_or_else(|| Path::new(DEFAULT_RUN_ROOT).join(def.name()));
            let network = if test_net {
                Network::Test
            } else {
                Network::Production
            };
            let input = Instance::new(dir).render_input(uris, network);
            let text = if libvirt {
                def.render_libvirt(&input)?
            } else {
                shell_line(&def.render_qemu(&input)?) + "\n"
            };
            // A closed pipe (`| head`) is an error to report, not a panic.
            std::io::stdout().lock().write_all(text.as_bytes())?;
            Ok(())
        }
    }
}

/// Quotes one argument for a POSIX shell.
fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:=,@%+-".contains(c));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// The command line, shell-quoted, one option per line.
fn shell_line(argv: &[String]) -> String {
    let mut s = String::new();
    for (i, a) in argv.iter().enumerate() {
        if i > 0 {
            s.push_str(if a.starts_with('-') { " \\\n    " } else { " " });
        }
        s.push_str(&shell_quote(a));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_a_shell() {
        assert_eq!(
            shell_quote("file=nbd+unix:///sys?socket=/x"),
            "'file=nbd+unix:///sys?socket=/x'"
        );
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(
            shell_line(&["qemu".into(), "-m".into(), "1G".into(), "-S".into()]),
            "qemu \\\n    -m 1G \\\n    -S"
        );
    }
}
