//! The gateway's config.toml for a row, from the row's name
//! (`backend[/threading][/batchN]`): identical for every row but what the
//! name sets.

use std::net::SocketAddr;
use std::path::Path;

use backends::{Backend, Named, Threading};

use crate::tls::Certificates;

/// A gateway row's settings, from its name: `backend[/threading][/batchN]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTarget<'a> {
    pub backend: &'a str,
    /// `None`: the gateway's default (per-core), so that a bare backend
    /// measures what ships.
    pub threading: Option<&'a str>,
    /// `upstream.batch_max`; `None` leaves the default (1).
    pub batch_max: Option<usize>,
}

impl<'a> GatewayTarget<'a> {
    pub fn parse(target: &'a str) -> Result<Self, String> {
        let wrong = || {
            format!(
                "`{target}` is not {}, optionally with /{}, then optionally /batchN \
                 (N of 2 or more)",
                Backend::NAMES.join(" or "),
                Threading::NAMES.join(" or /"),
            )
        };
        let mut parts = target.split('/');
        let backend = parts.next().filter(|b| Backend::from_name(b).is_some());
        let backend = backend.ok_or_else(wrong)?;
        let mut parsed = Self {
            backend,
            threading: None,
            batch_max: None,
        };
        for part in parts {
            if let Some(n) = part.strip_prefix("batch") {
                let n: usize = n.parse().map_err(|_| wrong())?;
                if n < 2 || parsed.batch_max.is_some() {
                    return Err(wrong());
                }
                parsed.batch_max = Some(n);
            } else if Threading::from_name(part).is_some()
                && parsed.threading.is_none()
                && parsed.batch_max.is_none()
            {
                parsed.threading = Some(part);
            } else {
                return Err(wrong());
            }
        }
        Ok(parsed)
    }
}

/// The config.toml for `target` (see [`GatewayTarget`]), with the
/// certificate and key of `tls` on the public listener. The upstream stays
/// plain http: TLS is measured where clients meet the server.
pub(super) fn gateway_config(
    target: &str,
    workers: usize,
    counter: SocketAddr,
    tls: Option<&Certificates>,
) -> Result<String, String> {
    let parsed = GatewayTarget::parse(target).unwrap_or(GatewayTarget {
        backend: target,
        threading: None,
        batch_max: None,
    });
    let backend = parsed.backend;
    let threading = parsed
        .threading
        .map(|t| format!("threading = \"{t}\"\n"))
        .unwrap_or_default();
    let batch = parsed
        .batch_max
        .map(|n| format!("batch_max = {n}\n"))
        .unwrap_or_default();
    let tls = match tls {
        Some(files) => format!(
            "tls_cert = {}\ntls_key = {}\n",
            toml_string(&files.chain)?,
            toml_string(&files.key)?
        ),
        None => String::new(),
    };
    Ok(format!(
        "# Written by the bench; identical for every target but `backend`, `threading` \
         and `batch_max`.\n\
         [runtime]\nbackend = \"{backend}\"\nworkers = {workers}\n{threading}\n\
         [server]\nlisten = \"127.0.0.1:0\"\n{tls}\n\
         [upstream]\nurl = \"http://{counter}/counter\"\n{batch}\n\
         [log]\nlevel = \"info\"\n"
    ))
}

/// `path` as a TOML basic string; TOML text is UTF-8, so a path that is
/// not cannot be written into the config.
fn toml_string(path: &Path) -> Result<String, String> {
    let text = path
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8, cannot go in a TOML file", path.display()))?;
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    Ok(quoted)
}

#[cfg(test)]
mod tests {
    use super::{GatewayTarget, gateway_config, toml_string};
    use backends::Named;
    use gateway::config::{Backend, Config, Threading};
    use std::path::Path;

    fn parsed(target: &str) -> Config {
        let counter = "127.0.0.1:3001".parse().unwrap();
        let text = gateway_config(target, 4, counter, None).unwrap();
        Config::parse(Path::new("bench.toml"), &text).unwrap()
    }

    /// Needs the gateway's `server.tls_cert` and `server.tls_key`.
    #[test]
    fn a_tls_row_names_the_certificate_and_key_and_parses() {
        let dir = std::env::temp_dir().join(format!("bench-config-test-{}", std::process::id()));
        let files = crate::tls::generate(&dir).unwrap();
        let counter = "127.0.0.1:3001".parse().unwrap();
        let text = gateway_config("tokio/batch8", 4, counter, Some(&files)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let chain = toml_string(&files.chain).unwrap();
        let key = toml_string(&files.key).unwrap();
        let server = text.split("[server]").nth(1).unwrap();
        let server = server.split("\n[").next().unwrap();
        assert!(server.contains(&format!("tls_cert = {chain}\n")), "{text}");
        assert!(server.contains(&format!("tls_key = {key}\n")), "{text}");
        let config = Config::parse(Path::new("bench.toml"), &text);
        assert!(config.is_ok(), "{text}\n{:?}", config.err());
        assert_eq!(config.unwrap().upstream.batch_max, 8);
    }

    #[test]
    fn paths_are_quoted_for_toml() {
        assert_eq!(
            toml_string(Path::new("/a b/c.pem")).unwrap(),
            r#""/a b/c.pem""#
        );
        assert_eq!(toml_string(Path::new(r#"/a"\b"#)).unwrap(), r#""/a\"\\b""#);
        assert_eq!(toml_string(Path::new("/a\tb")).unwrap(), r#""/a\u0009b""#);
    }

    #[test]
    fn a_bare_backend_runs_the_gateways_default_threading() {
        for &backend in Backend::ALL {
            let config = parsed(backend.name());
            assert_eq!(config.runtime.backend, backend);
            assert_eq!(config.runtime.workers, 4);
            assert_eq!(
                config.runtime.threading,
                Config::default().runtime.threading
            );
        }
    }

    #[test]
    fn a_named_threading_is_written_into_the_config() {
        assert_eq!(parsed("tokio/shared").runtime.threading, Threading::Shared);
        assert_eq!(
            parsed("tokio/per-core").runtime.threading,
            Threading::PerCore
        );
    }

    #[test]
    fn a_batch_row_sets_batch_max_and_nothing_else() {
        // The last backend, so that a row other than the default's is read.
        let last = Backend::ALL[Backend::ALL.len() - 1].name();
        let config = parsed(&format!("{last}/shared/batch64"));
        assert_eq!(config.upstream.batch_max, 64);
        assert_eq!(config.runtime.threading, Threading::Shared);
        assert_eq!(parsed("tokio/batch8").upstream.batch_max, 8);
        assert_eq!(parsed("tokio").upstream.batch_max, 1);
        let unknown_part = format!("{last}/x");
        for bad in [
            "nginx",
            "tokio/batch1",
            "tokio/batch",
            "tokio/batch8/shared",
            &unknown_part,
        ] {
            assert!(GatewayTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
