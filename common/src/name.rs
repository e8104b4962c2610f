//! Validation of disk and VM names.
//!
//! Names arrive from command lines, NBD clients and (later) remote peers, and end up in file
//! names, so they are restricted to a conservative character set with a bounded length.

use thiserror::Error;

/// Longest accepted disk or VM name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name {name:?} is longer than {max} bytes")]
    TooLong { name: String, max: usize },
    #[error(
        "name {name:?} contains {ch:?}: only ASCII letters, digits, '-', '_' and '.' are allowed"
    )]
    BadChar { name: String, ch: char },
    #[error("name {name:?} must not start with '.' or '-'")]
    BadStart { name: String },
}

/// Checks that `name` is usable as a disk or VM name (and therefore as a file name component).
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            name: name.chars().take(MAX_NAME_LEN).collect(),
            max: MAX_NAME_LEN,
        });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(NameError::BadChar {
            name: name.to_string(),
            ch,
        });
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(NameError::BadStart {
            name: name.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["disk0", "vm-01.root", "A_b"] {
            assert_eq!(validate_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn rejects_path_escapes_and_junk() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert!(matches!(
            validate_name("../etc"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            validate_name("a/b"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            validate_name(".."),
            Err(NameError::BadStart { .. })
        ));
        assert!(matches!(
            validate_name("-rf"),
            Err(NameError::BadStart { .. })
        ));
        assert!(matches!(
            validate_name("a\0b"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            validate_name(&"x".repeat(MAX_NAME_LEN + 1)),
            Err(NameError::TooLong { .. })
        ));
        assert_eq!(validate_name(&"x".repeat(MAX_NAME_LEN)), Ok(()));
    }
}
