//! Lineage ids: which history of a VM's disks a tracker generation or a replica cycle belongs
//! to.
//!
//! A lineage is 128 random bits, written as 32 lowercase hex characters. The shipper creates
//! one for a VM's first initial copy and sets it in the tracker before the initial freeze; the
//! replica records it when that cycle commits. Generation (tracker) and cycle (replica) numbers
//! only mean something within one lineage: every cycle on the wire carries `(lineage, cycle)`,
//! and a mismatch is a refusal with a message, never a guess. Failover (later) starts a new
//! lineage whose parent is `(old lineage, point)`.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Lineage(pub [u8; 16]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a lineage id (32 lowercase hex characters)")]
pub struct BadLineage(pub String);

impl Lineage {
    /// A fresh lineage: 128 bits from the operating system's random source.
    pub fn random() -> Lineage {
        Lineage(rand::random())
    }

    pub fn parse(s: &str) -> Result<Lineage, BadLineage> {
        let bad = || BadLineage(s.chars().take(64).collect());
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Lineage(out))
    }
}

impl fmt::Display for Lineage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Lineage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lineage({self})")
    }
}

impl TryFrom<String> for Lineage {
    type Error = BadLineage;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Lineage::parse(&s)
    }
}

impl From<Lineage> for String {
    fn from(l: Lineage) -> String {
        l.to_string()
    }
}

/// `lineage` as people read it in messages: the id, or "none".
pub fn show(lineage: Option<Lineage>) -> String {
    lineage.map_or_else(|| "none".to_string(), |l| l.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lineages_print_parse_and_refuse_anything_else() {
        let l = Lineage::random();
        let s = l.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(Lineage::parse(&s), Ok(l));
        assert_ne!(Lineage::random(), l);
        let json = serde_json::to_string(&Some(l)).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(
            serde_json::from_str::<Option<Lineage>>(&json).unwrap(),
            Some(l)
        );
        for bad in [
            "",
            "abc",
            &s.to_uppercase(),
            &format!("{s}0"),
            &s.replace(&s[..1], "g"),
        ] {
            assert!(Lineage::parse(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Lineage>("\"xyz\"").is_err());
        assert_eq!(show(None), "none");
    }
}
