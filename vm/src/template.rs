//! `${...}` placeholders in a VM definition's templates (QEMU arguments, libvirt XML).
//!
//! `${name}`, `${disk:NAME}`, `${disk_source:NAME}` (XML only), `${qmp}`, `${qga}`,
//! `${console}` and `${net}`; `$$` is a literal `$`. Any other `$` is an error, so a typo
//! never reaches QEMU as literal text.

use std::fmt;

/// One placeholder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placeholder {
    /// The VM's name.
    Name,
    /// The NBD URI of a disk.
    Disk(String),
    /// A libvirt `<source .../>` element for a disk (XML templates only).
    DiskSource(String),
    /// The QMP socket path.
    Qmp,
    /// The guest-agent socket path.
    Qga,
    /// The serial console log path.
    Console,
    /// The network: production or isolated test network.
    Net,
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placeholder::Name => write!(f, "${{name}}"),
            Placeholder::Disk(d) => write!(f, "${{disk:{d}}}"),
            Placeholder::DiskSource(d) => write!(f, "${{disk_source:{d}}}"),
            Placeholder::Qmp => write!(f, "${{qmp}}"),
            Placeholder::Qga => write!(f, "${{qga}}"),
            Placeholder::Console => write!(f, "${{console}}"),
            Placeholder::Net => write!(f, "${{net}}"),
        }
    }
}

/// A template string split into literal text and placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Var(Placeholder),
}

/// Why a template string does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown placeholder ${{{0}}} (known: ${{name}}, ${{disk:NAME}}, ${{disk_source:NAME}}, ${{qmp}}, ${{qga}}, ${{console}}, ${{net}})")]
    Unknown(String),
    #[error("unterminated placeholder starting at {0:?}")]
    Unterminated(String),
    #[error("a '$' not starting a placeholder at {0:?} (write a literal '$' as '$$')")]
    LoneDollar(String),
}

fn placeholder(inner: &str) -> Result<Placeholder, TemplateError> {
    let named = |prefix: &str| {
        inner
            .strip_prefix(prefix)
            .filter(|d| vmreplica_common::validate_name(d).is_ok())
            .map(str::to_string)
    };
    Ok(match inner {
        "name" => Placeholder::Name,
        "qmp" => Placeholder::Qmp,
        "qga" => Placeholder::Qga,
        "console" => Placeholder::Console,
        "net" => Placeholder::Net,
        _ => {
            if let Some(d) = named("disk:") {
                Placeholder::Disk(d)
            } else if let Some(d) = named("disk_source:") {
                Placeholder::DiskSource(d)
            } else {
                return Err(TemplateError::Unknown(inner.to_string()));
            }
        }
    })
}

/// Splits `s` into text and placeholders.
pub fn parse(s: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        text.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            text.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let Some(end) = r.find('}') else {
                return Err(TemplateError::Unterminated(snippet(&rest[i..])));
            };
            if !text.is_empty() {
                out.push(Piece::Text(std::mem::take(&mut text)));
            }
            out.push(Piece::Var(placeholder(&r[..end])?));
            rest = &r[end + 1..];
        } else {
            return Err(TemplateError::LoneDollar(snippet(&rest[i..])));
        }
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

fn snippet(s: &str) -> String {
    s.chars().take(30).collect()
}

/// Escapes text for an XML attribute or element.
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_text_and_placeholders() {
        assert_eq!(
            parse("file=${disk:sys},format=raw").unwrap(),
            vec![
                Piece::Text("file=".into()),
                Piece::Var(Placeholder::Disk("sys".into())),
                Piece::Text(",format=raw".into()),
            ]
        );
        assert_eq!(parse("${net}").unwrap(), vec![Piece::Var(Placeholder::Net)]);
        assert_eq!(
            parse("cost $$5 ${qmp}${qga}").unwrap(),
            vec![
                Piece::Text("cost $5 ".into()),
                Piece::Var(Placeholder::Qmp),
                Piece::Var(Placeholder::Qga),
            ]
        );
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(
            parse("{\"json\": 1}").unwrap(),
            vec![Piece::Text("{\"json\": 1}".into())]
        );
    }

    #[test]
    fn refuses_unknown_unterminated_and_lone_dollars() {
        assert_eq!(
            parse("a ${qmpp} b"),
            Err(TemplateError::Unknown("qmpp".into()))
        );
        assert_eq!(
            parse("${disk:}"),
            Err(TemplateError::Unknown("disk:".into()))
        );
        assert_eq!(
            parse("${disk:../x}"),
            Err(TemplateError::Unknown("disk:../x".into()))
        );
        assert!(matches!(
            parse("x ${qmp"),
            Err(TemplateError::Unterminated(_))
        ));
        assert!(matches!(
            parse("price $5"),
            Err(TemplateError::LoneDollar(_))
        ));
        assert!(matches!(parse("end $"), Err(TemplateError::LoneDollar(_))));
        let msg = parse("${foo}").unwrap_err().to_string();
        assert!(
            msg.contains("${foo}") && msg.contains("${disk:NAME}"),
            "{msg}"
        );
    }

    #[test]
    fn escapes_xml() {
        assert_eq!(
            xml_escape("a&b<'c'>\"d\""),
            "a&amp;b&lt;&apos;c&apos;&gt;&quot;d&quot;"
        );
    }
}
