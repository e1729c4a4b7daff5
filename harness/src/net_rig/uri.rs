//! NBD URIs as libnbd, qemu and nbdkit write them (the NBD URI specification):
//! `nbd://HOST[:PORT][/EXPORT]`, `nbds://...` (TLS), `nbd+unix:///EXPORT?socket=PATH` and
//! `nbds+unix://...`. The query may name `tls-certificates=DIR`, a directory with `ca-cert.pem`
//! (and, to present one, `client-cert.pem` and `client-key.pem`): libnbd's convention, so the
//! same directory serves nbdinfo and this client.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    /// A host name or address, and a port.
    Tcp {
        /// `localhost`, `127.0.0.1`, `::1` (without brackets).
        host: String,
        /// The port.
        port: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Where.
    pub addr: NbdAddr,
    /// The export name (empty: the default export).
    pub export: String,
    /// Whether the scheme asks for TLS (`nbds`).
    pub tls: bool,
    /// `tls-certificates=DIR`, if given.
    pub tls_certificates: Option<PathBuf>,
}

/// Why a URI was not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad NBD URI {uri:?}: {why} (expected nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH)"
)]
pub struct UriError {
    /// The URI.
    pub uri: String,
    /// What is wrong.
    pub why: String,
}

/// Decodes `%XX` escapes (export names and paths may carry them).
fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl FromStr for NbdUri {
    type Err = UriError;
    fn from_str(uri: &str) -> Result<NbdUri, UriError> {
        let err = |why: &str| UriError {
            uri: uri.to_string(),
            why: why.to_string(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| err("no scheme"))?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(err("the scheme must be nbd, nbds, nbd+unix or nbds+unix")),
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let export = unescape(path).ok_or_else(|| err("bad %-escape in the export name"))?;
        let mut socket = None;
        let mut tls_certificates = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = unescape(v).ok_or_else(|| err("bad %-escape in the query"))?;
            match k {
                "socket" => socket = Some(PathBuf::from(v)),
                "tls-certificates" => tls_certificates = Some(PathBuf::from(v)),
                // Other libnbd parameters (tls-psk-file, tls-username, ...) are not supported.
                _ => return Err(err(&format!("unsupported query parameter {k:?}"))),
            }
        }
        let addr = if unix {
            if !authority.is_empty() {
                return Err(err(
                    "a Unix socket URI has no host (nbd+unix:///NAME?socket=PATH)",
                ));
            }
            NbdAddr::Unix(socket.ok_or_else(|| err("no socket=PATH"))?)
        } else {
            if socket.is_some() {
                return Err(err("socket= needs the nbd+unix scheme"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (host, after) = v6.split_once(']').ok_or_else(|| err("unclosed ["))?;
                (host, after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                }
            };
            if host.is_empty() {
                return Err(err("no host"));
            }
            let port = match port {
                Some(p) => p.parse().map_err(|_| err("bad port"))?,
                None => DEFAULT_PORT,
            };
            NbdAddr::Tcp {
                host: host.to_string(),
                port,
            }
        };
        Ok(NbdUri {
            addr,
            export,
            tls,
            tls_certificates,
        })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "nbds" } else { "nbd" };
        let mut query = Vec::new();
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "{s}://[{host}]:{port}/{}", self.export)?
            }
            NbdAddr::Tcp { host, port } => write!(f, "{s}://{host}:{port}/{}", self.export)?,
            NbdAddr::Unix(p) => {
                write!(f, "{s}+unix:///{}", self.export)?;
                query.push(format!("socket={}", p.display()));
            }
        }
        if let Some(d) = &self.tls_certificates {
            query.push(format!("tls-certificates={}", d.display()));
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_in_use() {
        let u: NbdUri = "nbd://127.0.0.1:10810/disk".parse().unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!((u.export.as_str(), u.tls), ("disk", false));
        let u: NbdUri = "nbds://[::1]/".parse().unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        assert!(u.tls && u.export.is_empty());
        let u: NbdUri = "nbd+unix:///a%20b?socket=/tmp/s.sock".parse().unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "a b");
        let u: NbdUri = "nbds+unix:///?socket=/s&tls-certificates=/pki"
            .parse()
            .unwrap();
        assert_eq!(u.tls_certificates, Some("/pki".into()));
        assert_eq!(
            u.to_string(),
            "nbds+unix:///?socket=/s&tls-certificates=/pki"
        );
        for bad in [
            "http://x/",
            "nbd://",
            "nbd://host:port/",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://h/?socket=/s",
            "nbd://h/?tls-psk-file=x",
            "nbd://h/%zz",
        ] {
            assert!(bad.parse::<NbdUri>().is_err(), "{bad}");
        }
    }
}
