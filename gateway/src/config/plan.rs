//! The configuration resolved into what the daemon runs: [`Plan`]. Where
//! [`Config`] is the file's data, a plan adds what is read or worked out
//! from it once: the file it came from, the folder a relative state file
//! goes in, the certificates and keys the TLS keys name, the upstream URL
//! parsed, the worker count and each upstream pool's share of the
//! connection cap. A reload builds a new plan and compares it with the
//! running one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::span_of;
use super::load::{invalid_at, read_source};
use super::{Config, ConfigError, Escaped, StoreKind, Threading, UpstreamTarget};
use crate::tls;

/// A configuration and what was resolved from it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: Config,
    /// The file this was read from, which a reload reads again; empty for
    /// a configuration given in memory or on the command line.
    pub path: PathBuf,
    /// What a relative `counter.path` is taken from: `$STATE_DIRECTORY`
    /// when systemd sets it, else the configuration file's folder (the
    /// working directory without a file).
    pub state_base: PathBuf,
    /// The certificates and keys the TLS keys name.
    pub tls: TlsMaterial,
    /// `upstream.url`, parsed.
    pub upstream: UpstreamTarget,
    /// Worker threads to start ([`super::RuntimeConfig::worker_count`]).
    pub workers: usize,
    /// Services each listener spreads its connections over: one per
    /// worker per core, else one for all.
    pub shards: usize,
    /// The upstream pools' shares of `upstream.max_connections`: one pool,
    /// or one per worker (fewer under a cap below the worker count).
    pub pool_shares: Vec<usize>,
}

/// What the TLS keys' files hold, read and checked with the configuration
/// so that a bad file stops a start (or a reload) as any bad key does.
#[derive(Debug, Clone, Default)]
pub struct TlsMaterial {
    /// `server.tls_cert` with `server.tls_key`, checked to match.
    pub server: Option<Arc<rustls::sign::CertifiedKey>>,
    /// For an https upstream: `upstream.tls_ca`'s certificates, or the
    /// system's roots.
    pub upstream_roots: Option<rustls::RootCertStore>,
}

/// The file a configuration was read from and its text, which errors
/// point into.
struct Origin<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Plan {
    /// Reads, validates and resolves the configuration at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_source(path)?;
        let config = Config::parse(path, &text)?;
        Self::resolve(config, Some(Origin { path, text: &text }), None)
    }

    /// The plan of this one's file as it reads now, for a reload. The
    /// upstream's roots are kept when the `[upstream]` section is
    /// unchanged: a reload does not apply them, re-reading the system's
    /// would only slow it, and a certificate renewal should not fail on
    /// them.
    pub fn load_again(&self) -> Result<Self, ConfigError> {
        let text = read_source(&self.path)?;
        let config = Config::parse(&self.path, &text)?;
        let origin = Origin {
            path: &self.path,
            text: &text,
        };
        Self::resolve(config, Some(origin), Some(self))
    }

    /// The plan of a configuration given in memory: a relative path in it
    /// is taken from the working directory, and there is no file to reload.
    pub fn from_config(config: Config) -> Result<Self, ConfigError> {
        Self::resolve(config, None, None)
    }

    /// Resolves `config`, read from `origin` if from a file; `running` is
    /// the plan a reload replaces.
    fn resolve(
        config: Config,
        origin: Option<Origin>,
        running: Option<&Plan>,
    ) -> Result<Self, ConfigError> {
        let path = origin
            .as_ref()
            .map_or_else(PathBuf::new, |o| o.path.to_owned());
        // Without a file, systemd's state folder is not looked at either.
        let state_base = match origin {
            Some(_) => state_base(&path),
            None => PathBuf::new(),
        };
        let invalid = |key: &'static str, message: String| {
            let (path, text) = origin
                .as_ref()
                .map_or((Path::new(""), ""), |o| (o.path, o.text));
            invalid_at(path, text, span_of(text, key), key.to_owned(), message)
        };
        // Validation parsed the URL too, to check it; this parse is the one
        // every pool keeps.
        let upstream = UpstreamTarget::parse(&config.upstream.url)
            .map_err(|m| invalid("upstream.url", m.to_string()))?;
        let folder = path.parent().unwrap_or(Path::new(""));
        let tls = read_tls_files(&config, &upstream, folder, running)
            .map_err(|(key, message)| invalid(key, message))?;
        let workers = config.runtime.worker_count();
        let shards = match config.runtime.threading {
            Threading::Shared => 1,
            Threading::PerCore => workers,
        };
        Ok(Self {
            state_base,
            pool_shares: pool_shares(config.upstream.max_connections, shards),
            config,
            path,
            tls,
            upstream,
            workers,
            shards,
        })
    }

    /// Resolves the upstream's name: every pool dials the addresses found
    /// here, and looks again only after a connect fails.
    pub fn upstream_addresses(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.upstream.resolve()
    }

    /// A one-line summary, printed by `gateway --check`.
    pub fn summary(&self) -> String {
        let config = &self.config;
        let mut line = format!(
            "backend={} workers={} threading={} listen={} upstream={}",
            config.runtime.backend.name(),
            self.workers,
            config.runtime.threading.name(),
            config.server.listen,
            Escaped(&config.upstream.url),
        );
        if let Some(cert) = &config.server.tls_cert {
            line.push_str(&format!(" https cert={}", Escaped(cert.display())));
        }
        let server = &config.server;
        if server.http2 {
            line.push_str(&format!(
                " http2 max_streams={} stream_window={} connection_window={} max_header_list={}",
                server.http2_max_streams,
                server.http2_stream_window_bytes,
                server.http2_connection_window_bytes,
                server.max_header_bytes,
            ));
        } else {
            line.push_str(" http2=off");
        }
        if let Some(counter) = &config.counter {
            line.push_str(&format!(" counter={}", counter.listen));
            match counter.store {
                StoreKind::File => line.push_str(&format!(
                    " store=file:{}",
                    Escaped(counter.state_path(&self.state_base).display())
                )),
                StoreKind::Memory => line.push_str(" store=memory"),
                StoreKind::Postgres => {
                    let target = counter
                        .postgres_url
                        .as_deref()
                        .and_then(|url| crate::store::postgres::parse_url(url).ok())
                        .map_or_else(String::new, |c| crate::store::postgres::describe(&c));
                    line.push_str(&format!(" store={}", Escaped(&target)));
                }
            }
        }
        if let Some(admin) = &config.admin {
            line.push_str(&format!(" admin={}", admin.listen));
        }
        line
    }
}

/// Reads the certificates and keys the TLS keys name; a relative path is
/// taken from `folder`, the configuration file's. The upstream's roots are
/// `running`'s when its `[upstream]` is the same.
fn read_tls_files(
    config: &Config,
    upstream: &UpstreamTarget,
    folder: &Path,
    running: Option<&Plan>,
) -> Result<TlsMaterial, (&'static str, String)> {
    let server = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(tls::certified_key(&folder.join(cert), &folder.join(key))?),
        _ => None,
    };
    let unchanged = running.filter(|r| r.config.upstream == config.upstream);
    let upstream_roots = if let Some(running) = unchanged {
        running.tls.upstream_roots.clone()
    } else if upstream.tls {
        let ca = config.upstream.tls_ca.as_ref().map(|ca| folder.join(ca));
        let key = if ca.is_some() {
            "upstream.tls_ca"
        } else {
            "upstream.url"
        };
        Some(tls::roots(ca.as_deref()).map_err(|e| (key, e.to_string()))?)
    } else {
        None
    };
    Ok(TlsMaterial {
        server,
        upstream_roots,
    })
}

/// Where a relative `counter.path` goes for the configuration at
/// `config_path`: systemd's `StateDirectory=` (`$STATE_DIRECTORY`, the
/// first if it lists several), else the configuration file's folder.
fn state_base(config_path: &Path) -> PathBuf {
    let directories = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty());
    if let Some(first) = directories.and_then(|d| std::env::split_paths(&d).next()) {
        return first;
    }
    config_path.parent().map(Path::to_owned).unwrap_or_default()
}

/// Splits `max_connections` over up to `shards` pools, so that together
/// they never exceed it: a cap below the worker count gives fewer pools
/// than workers (workers share them), never a pool of zero or one over.
fn pool_shares(max_connections: usize, shards: usize) -> Vec<usize> {
    let pools = shards.min(max_connections).max(1);
    (0..pools)
        .map(|pool| max_connections / pools + usize::from(pool < max_connections % pools))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Plan {
        let config = Config::parse(Path::new("test.toml"), text).unwrap();
        Plan::from_config(config).unwrap()
    }

    #[test]
    fn summary_escapes_the_url() {
        let summary = plan("[upstream]\nurl = \"http://h/\\u202Eabc\"\n").summary();
        assert!(
            summary.contains("upstream=http://h/\\u{202e}abc"),
            "{summary}"
        );
    }

    #[test]
    fn the_plan_parses_the_upstream_once_and_shares_its_cap() {
        let plan = plan(
            "[runtime]\nworkers = 4\nthreading = \"per-core\"\n\
             [upstream]\nurl = \"http://127.0.0.1:3001/c\"\nmax_connections = 10\n",
        );
        assert_eq!((plan.upstream.port, plan.upstream.tls), (3001, false));
        assert_eq!((plan.workers, plan.shards), (4, 4));
        assert_eq!(plan.pool_shares, [3, 3, 2, 2]);
        assert!(plan.tls.server.is_none() && plan.tls.upstream_roots.is_none());
        assert!(plan.path.as_os_str().is_empty());
        let shared = super::tests::plan("[runtime]\nworkers = 4\nthreading = \"shared\"\n");
        assert_eq!((shared.shards, shared.pool_shares.len()), (1, 1));
    }

    #[test]
    fn a_certificate_that_cannot_be_read_names_its_key() {
        let config = Config::parse(
            Path::new("test.toml"),
            "[server]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
        )
        .unwrap();
        let err = Plan::from_config(config).unwrap_err().to_string();
        assert!(err.contains("server.tls_cert"), "{err}");
    }

    #[test]
    fn pool_shares_add_up_to_the_cap_and_none_is_empty() {
        assert_eq!(pool_shares(256, 1), [256]);
        assert_eq!(pool_shares(256, 16), [16; 16]);
        assert_eq!(pool_shares(10, 4), [3, 3, 2, 2]);
        assert_eq!(pool_shares(2, 16), [1, 1]);
        assert_eq!(pool_shares(1, 2), [1]);
        for cap in 1..40 {
            for workers in 1..20 {
                let shares = pool_shares(cap, workers);
                assert_eq!(shares.iter().sum::<usize>(), cap);
                assert!(shares.iter().all(|&share| share > 0));
                assert!(shares.len() <= workers);
            }
        }
    }
}
