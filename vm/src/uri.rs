//! NBD URIs as QEMU takes them (`-drive file=URI`), checked before they reach a command line,
//! and turned into libvirt `<source>` elements.
//!
//! `nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://...`, `nbds://...` and `nbds+tcp://...` (TLS),
//! `nbd+unix:///EXPORT?socket=PATH` and `nbds+unix:///EXPORT?socket=PATH`.

use crate::template::xml_escape;

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix { socket: String },
    Tcp { host: String, port: u16 },
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// `nbds`: the client must use TLS (QEMU needs `tls-creds` on the drive).
    pub tls: bool,
    pub export: String,
    pub endpoint: Endpoint,
}

/// The IANA port of NBD, QEMU's default.
pub const NBD_PORT: u16 = 10809;

impl NbdUri {
    /// Parses `uri`; the error says what is wrong with it.
    pub fn parse(uri: &str) -> Result<NbdUri, String> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| "not a URI (expected nbd://, nbds://, nbd+unix://...)".to_string())?;
        let (tls, unix) = match scheme {
            "nbd" | "nbd+tcp" => (false, false),
            "nbds" | "nbds+tcp" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => {
                return Err(format!(
                    "unknown scheme {scheme:?} (nbd, nbds, nbd+unix, nbds+unix, nbd+tcp, nbds+tcp)"
                ))
            }
        };
        let (authority, path_query) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_query, None),
        };
        let export = path.strip_prefix('/').unwrap_or(path).to_string();
        if unix {
            if !authority.is_empty() {
                return Err(format!(
                    "a unix-socket URI has no host ({authority:?}): write {scheme}:///EXPORT?socket=PATH"
                ));
            }
            let socket = query
                .and_then(|q| q.strip_prefix("socket="))
                .filter(|s| !s.is_empty() && !s.contains('&'))
                .ok_or_else(|| {
                    format!("needs exactly one query parameter socket=PATH: {scheme}:///EXPORT?socket=PATH")
                })?;
            return Ok(NbdUri {
                tls,
                export,
                endpoint: Endpoint::Unix {
                    socket: socket.to_string(),
                },
            });
        }
        if query.is_some() {
            return Err("a TCP NBD URI takes no query parameters".into());
        }
        let (host, port) = split_host_port(authority)?;
        Ok(NbdUri {
            tls,
            export,
            endpoint: Endpoint::Tcp { host, port },
        })
    }

    /// The libvirt `<source>` element of a network disk using this export.
    pub fn libvirt_source(&self) -> String {
        let tls = if self.tls { " tls='yes'" } else { "" };
        let host = match &self.endpoint {
            Endpoint::Unix { socket } => {
                format!("<host transport='unix' socket='{}'/>", xml_escape(socket))
            }
            Endpoint::Tcp { host, port } => {
                format!("<host name='{}' port='{port}'/>", xml_escape(host))
            }
        };
        format!(
            "<source protocol='nbd' name='{}'{tls}>{host}</source>",
            xml_escape(&self.export)
        )
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    if authority.is_empty() {
        return Err("no host (nbd://HOST[:PORT]/EXPORT)".into());
    }
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in {authority:?}"))?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("junk after ']' in {authority:?}"))?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.contains('@') {
        return Err(format!("bad host in {authority:?}"));
    }
    let port = match port {
        None => NBD_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("bad port {p:?}"))?,
    };
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_uris_qemu_takes() {
        let u = NbdUri::parse("nbd+unix:///sys?socket=/var/lib/vmreplica/vm1/nbd.sock").unwrap();
        assert_eq!(
            u,
            NbdUri {
                tls: false,
                export: "sys".into(),
                endpoint: Endpoint::Unix {
                    socket: "/var/lib/vmreplica/vm1/nbd.sock".into()
                }
            }
        );
        assert_eq!(
            u.libvirt_source(),
            "<source protocol='nbd' name='sys'><host transport='unix' socket='/var/lib/vmreplica/vm1/nbd.sock'/></source>"
        );
        let u = NbdUri::parse("nbds://replica-1.example:10900/data").unwrap();
        assert!(u.tls);
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "replica-1.example".into(),
                port: 10900
            }
        );
        assert_eq!(
            u.libvirt_source(),
            "<source protocol='nbd' name='data' tls='yes'><host name='replica-1.example' port='10900'/></source>"
        );
        let u = NbdUri::parse("nbd://[2001:db8::1]/d").unwrap();
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "2001:db8::1".into(),
                port: NBD_PORT
            }
        );
        assert_eq!(NbdUri::parse("nbd://h").unwrap().export, "");
        assert!(NbdUri::parse("nbds+unix:///d?socket=/s").unwrap().tls);
    }

    #[test]
    fn refuses_what_qemu_would_refuse() {
        for bad in [
            "/var/lib/x.img",
            "http://h/d",
            "nbd+unix:///d",
            "nbd+unix:///d?socket=",
            "nbd+unix://host/d?socket=/s",
            "nbd+unix:///d?socket=/s&x=1",
            "nbd:///d",
            "nbd://h:0/d",
            "nbd://h:port/d",
            "nbd://h/d?socket=/s",
            "nbd://[::1/d",
            "nbd://u@h/d",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad} was accepted");
        }
    }
}
