//! What travels with a VM's disks besides their blocks: its definition (how to start it on the
//! replica site: `VmDefinition::to_toml()` of the `vm` crate, as text) and where the primary
//! site's own applier listens (for reverse replication after a failover). Both are identified
//! by one [`DefinitionHash`]: the shipper sends them when the replica's hash (in `Welcome`)
//! differs from its own.

use std::fmt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

/// Longest definition text accepted (bytes of TOML; a libvirt domain XML inlined fits easily).
pub const MAX_DEFINITION: u32 = 1 << 20;

/// Where the primary site's own applier listens: the replica site ships to it after a
/// failover (reverse replication).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReverseTarget {
    /// `HOST:PORT` of the primary site's applier.
    pub replica: String,
    /// The name in that applier's certificate.
    pub server_name: String,
}

/// xxh3-128 of a definition's text and its reverse target, as sent (32 lowercase hex
/// characters in state files and messages).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DefinitionHash(pub [u8; 16]);

impl DefinitionHash {
    /// The hash of `definition` with `reverse`, over a length-prefixed encoding (so no two
    /// different pairs can be spelt alike).
    pub fn of(definition: &str, reverse: Option<&ReverseTarget>) -> DefinitionHash {
        let mut h = Xxh3::new();
        h.update(b"vmreplica-definition\0");
        h.update(&(definition.len() as u64).to_be_bytes());
        h.update(definition.as_bytes());
        match reverse {
            None => h.update(&[0]),
            Some(r) => {
                h.update(&[1]);
                for s in [&r.replica, &r.server_name] {
                    h.update(&(s.len() as u64).to_be_bytes());
                    h.update(s.as_bytes());
                }
            }
        }
        DefinitionHash(h.digest128().to_be_bytes())
    }

    pub fn parse(s: &str) -> Result<DefinitionHash, String> {
        let bad = || format!("{s:?} is not a definition hash (32 lowercase hex characters)");
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(DefinitionHash(out))
    }
}

impl fmt::Display for DefinitionHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DefinitionHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DefinitionHash({self})")
    }
}

impl TryFrom<String> for DefinitionHash {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        DefinitionHash::parse(&s)
    }
}

impl From<DefinitionHash> for String {
    fn from(h: DefinitionHash) -> String {
        h.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_tell_definitions_and_targets_apart_and_print_as_hex() {
        let r = ReverseTarget {
            replica: "192.0.2.1:7443".into(),
            server_name: "replica-2".into(),
        };
        let a = DefinitionHash::of("x", None);
        assert_eq!(a, DefinitionHash::of("x", None));
        assert_ne!(a, DefinitionHash::of("y", None));
        assert_ne!(a, DefinitionHash::of("x", Some(&r)));
        let swapped = ReverseTarget {
            replica: "192.0.2.1:7443replica-2".into(),
            server_name: String::new(),
        };
        assert_ne!(
            DefinitionHash::of("x", Some(&r)),
            DefinitionHash::of("x", Some(&swapped))
        );
        assert_eq!(DefinitionHash::parse(&a.to_string()), Ok(a));
        assert!(DefinitionHash::parse("XYZ").is_err());
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<DefinitionHash>(&json).unwrap(), a);
    }
}
