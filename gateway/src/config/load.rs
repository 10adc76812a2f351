//! Loading a configuration: finding the file ([`locate`]), reading it
//! ([`read_source`]), parsing it with errors that point at the line
//! ([`Config::parse`]), and checking what the types cannot (ranges, the
//! upstream URL, listeners on one port, the counter's store).

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::error::{line_column, span_of};
use super::{
    Config, ConfigError, Escaped, HEADER_BYTES, HTTP2_CONNECTION_WINDOW, HTTP2_STREAM_WINDOW,
    HTTP2_STREAMS, MAX_CONFIG_BYTES, MAX_CONNECTIONS, MAX_WORKERS, UpstreamTarget,
};
use crate::batch_protocol::MAX_VISITS_PER_POST;

/// The longest timeout a configuration may set, in milliseconds: a day.
const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;

/// Reads the configuration file at `path`.
///
/// Only a regular file of at most [`MAX_CONFIG_BYTES`] is read: a FIFO
/// would block the start for ever, and `/dev/zero` fill memory.
pub(super) fn read_source(path: &Path) -> Result<String, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if !metadata.is_file() {
        return Err(read_error(std::io::Error::other("not a regular file")));
    }
    let mut source = String::new();
    std::fs::File::open(path)
        .and_then(|file| {
            std::io::Read::read_to_string(&mut file.take(MAX_CONFIG_BYTES + 1), &mut source)
        })
        .map_err(read_error)?;
    if source.len() as u64 > MAX_CONFIG_BYTES {
        return Err(read_error(std::io::Error::other(format!(
            "larger than {MAX_CONFIG_BYTES} bytes"
        ))));
    }
    Ok(source)
}

impl Config {
    /// Parses and validates configuration text; `path` is only used in errors.
    pub fn parse(path: &Path, source: &str) -> Result<Self, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, key: String, message: String| {
            invalid_at(path, source, span, key, message)
        };
        let deserializer = toml::Deserializer::parse(source)
            .map_err(|e| invalid(e.span(), "(syntax)".to_owned(), e.message().to_owned()))?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let span = e.inner().span().or_else(|| span_of(source, &key));
            invalid(span, key, e.inner().message().to_owned())
        })?;
        config
            .validate()
            .map_err(|(key, message)| invalid(span_of(source, key), key.to_owned(), message))?;
        Ok(config)
    }

    /// Checks what the types cannot: ranges, the upstream URL, the TLS
    /// keys in pairs, the listeners apart, the counter's store and the log
    /// level.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        self.check_timeouts_and_caps()?;
        self.check_sizes()?;
        self.check_upstream()?;
        self.check_tls_pairs()?;
        self.check_listeners_apart()?;
        if let Some(counter) = &self.counter {
            counter.check()?;
        }
        self.check_log_level()
    }

    /// Timeouts and connection caps: none 0, a timeout at most a day, a
    /// cap at most [`MAX_CONNECTIONS`].
    fn check_timeouts_and_caps(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            ("server.idle_timeout_ms", self.server.idle_timeout_ms),
            (
                "server.shutdown_timeout_ms",
                self.server.shutdown_timeout_ms,
            ),
            ("server.max_connections", self.server.max_connections as u64),
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            ),
            (
                "upstream.request_timeout_ms",
                self.upstream.request_timeout_ms,
            ),
            (
                "upstream.max_connections",
                self.upstream.max_connections as u64,
            ),
            (
                "upstream.pool_idle_timeout_ms",
                self.upstream.pool_idle_timeout_ms,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((key, "expected a value greater than 0".to_owned()));
            }
            // A deadline is a clock reading plus the timeout: keep the sum
            // far from where it would overflow.
            if key.ends_with("_ms") && value > MAX_TIMEOUT_MS {
                return Err((
                    key,
                    format!("expected at most {MAX_TIMEOUT_MS} (a day), got {value}"),
                ));
            }
        }
        for (key, value) in [
            ("server.max_connections", self.server.max_connections),
            ("upstream.max_connections", self.upstream.max_connections),
        ] {
            if value > MAX_CONNECTIONS {
                return Err((
                    key,
                    format!("expected at most {MAX_CONNECTIONS}, got {value}"),
                ));
            }
        }
        Ok(())
    }

    /// The worker count, the batch size, the header limit and the HTTP/2
    /// limits, each in its range.
    fn check_sizes(&self) -> Result<(), (&'static str, String)> {
        if self.runtime.workers > MAX_WORKERS {
            return Err((
                "runtime.workers",
                format!(
                    "expected at most {MAX_WORKERS} (0 = one per CPU), got {}",
                    self.runtime.workers
                ),
            ));
        }
        let batch_max = self.upstream.batch_max as u64;
        if !(1..=MAX_VISITS_PER_POST).contains(&batch_max) {
            return Err((
                "upstream.batch_max",
                format!("expected 1 (a POST per visit) to {MAX_VISITS_PER_POST}, got {batch_max}"),
            ));
        }
        let server = &self.server;
        for (key, value, range) in [
            (
                "server.http2_max_streams",
                server.http2_max_streams,
                HTTP2_STREAMS,
            ),
            (
                "server.http2_stream_window_bytes",
                server.http2_stream_window_bytes,
                HTTP2_STREAM_WINDOW,
            ),
            (
                "server.http2_connection_window_bytes",
                server.http2_connection_window_bytes,
                HTTP2_CONNECTION_WINDOW,
            ),
        ] {
            if !range.contains(&value) {
                return Err((
                    key,
                    format!("expected {} to {}, got {value}", range.start(), range.end()),
                ));
            }
        }
        if !HEADER_BYTES.contains(&self.server.max_header_bytes) {
            return Err((
                "server.max_header_bytes",
                format!(
                    "expected {} to {}, got {}",
                    HEADER_BYTES.start(),
                    HEADER_BYTES.end(),
                    self.server.max_header_bytes
                ),
            ));
        }
        Ok(())
    }

    /// `upstream.url` usable, and verifiable when https; `upstream.tls_ca`
    /// only with https.
    fn check_upstream(&self) -> Result<(), (&'static str, String)> {
        let upstream = UpstreamTarget::parse(&self.upstream.url)
            .map_err(|m| ("upstream.url", m.to_string()))?;
        if upstream.tls && rustls::pki_types::ServerName::try_from(upstream.host.as_str()).is_err()
        {
            return Err((
                "upstream.url",
                format!(
                    "`{}` cannot be checked against a certificate: not a valid DNS name or IP address",
                    Escaped(&upstream.host)
                ),
            ));
        }
        if self.upstream.tls_ca.is_some() && !upstream.tls {
            return Err((
                "upstream.tls_ca",
                "is only used with an https:// upstream.url".to_owned(),
            ));
        }
        Ok(())
    }

    /// `server.tls_cert` and `server.tls_key` both given, or neither.
    fn check_tls_pairs(&self) -> Result<(), (&'static str, String)> {
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) => Err((
                "server.tls_cert",
                "needs server.tls_key, the certificate's private key".to_owned(),
            )),
            (None, Some(_)) => Err((
                "server.tls_key",
                "needs server.tls_cert, the key's certificate".to_owned(),
            )),
            _ => Ok(()),
        }
    }

    fn check_log_level(&self) -> Result<(), (&'static str, String)> {
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err((
                "log.level",
                format!(
                    "`{}` is not a log level or filter (expected e.g. error, warn, info, debug, trace)",
                    Escaped(&self.log.level)
                ),
            ));
        }
        Ok(())
    }

    /// Two listeners on one port (the same address, or one the other's
    /// wildcard covers) would fail at bind with "address in use": a
    /// configuration error, told as one before anything starts.
    fn check_listeners_apart(&self) -> Result<(), (&'static str, String)> {
        let listeners = [
            ("server.listen", Some(self.server.listen)),
            ("counter.listen", self.counter.as_ref().map(|c| c.listen)),
            ("admin.listen", self.admin.as_ref().map(|a| a.listen)),
        ];
        let set: Vec<_> = listeners
            .iter()
            .filter_map(|&(key, addr)| Some((key, addr?)))
            .collect();
        for (i, &(key, addr)) in set.iter().enumerate() {
            if let Some((other, _)) = set[..i].iter().find(|(_, a)| overlap(*a, addr)) {
                return Err((
                    key,
                    format!("{addr} overlaps {other}; each listener needs a port of its own"),
                ));
            }
        }
        Ok(())
    }
}

/// The error for `key`, whose value is at `span` in `source`.
pub(super) fn invalid_at(
    path: &Path,
    source: &str,
    span: Option<std::ops::Range<usize>>,
    key: String,
    message: String,
) -> ConfigError {
    let (line, column) = span.map_or((1, 1), |s| line_column(source, s.start));
    ConfigError::Invalid {
        path: path.to_owned(),
        line,
        column,
        key,
        message,
    }
}

/// Whether sockets bound to `a` and `b` would take the same port: port 0
/// (any free one) never does; a wildcard covers its family, and the IPv6
/// one (dual-stack by default on Linux) IPv4's too.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    // `[::ffff:127.0.0.1]` is 127.0.0.1.
    let canonical = |addr: SocketAddr| SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let (a, b) = (canonical(a), canonical(b));
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// Where the configuration is read from: `--config`, else
/// `$GATEWAY_CONFIG`, else `./config.toml`; the reason is for error messages.
pub fn locate(cli: Option<PathBuf>) -> (PathBuf, String) {
    if let Some(path) = cli {
        return (path, "it was given with --config".to_owned());
    }
    if let Some(path) = std::env::var_os("GATEWAY_CONFIG").filter(|p| !p.is_empty()) {
        return (PathBuf::from(path), "$GATEWAY_CONFIG names it".to_owned());
    }
    (
        PathBuf::from("config.toml"),
        "neither --config nor $GATEWAY_CONFIG was given, so ./config.toml is the default"
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, StoreKind, Threading};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    /// The same configuration, as text to compare (the sections have no
    /// common equality).
    fn read(text: &str) -> String {
        let mut config = parse(text).unwrap();
        // A path left out means the default file: compare where the count
        // goes.
        if let Some(counter) = &mut config.counter {
            counter.path = Some(counter.state_path(Path::new("/state")));
        }
        format!("{config:?}")
    }

    /// The defaults are written three times: in the `Default`s, in the
    /// README's table and in the shipped config.toml; the last two must
    /// say what the first does.
    #[test]
    fn the_readme_and_the_shipped_config_state_the_defaults() {
        let readme = include_str!("../../../README.md");
        let mut stated = 0;
        for row in readme.lines().filter(|line| line.starts_with("| `")) {
            let mut cells = row.trim_start_matches("| ").split(" | ");
            let (Some(key), Some(default)) = (cells.next(), cells.next()) else {
                continue;
            };
            // "none", "section absent: off": nothing to write.
            let Some(value) = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')) else {
                continue;
            };
            let Some((section, name)) = key.trim_matches('`').split_once('.') else {
                continue;
            };
            assert_eq!(
                read(&format!("[{section}]\n{name} = {value}\n")),
                read(&format!("[{section}]\n")),
                "the README's default for {key}, {value}, is not the default"
            );
            stated += 1;
        }
        assert!(
            stated >= 20,
            "only {stated} defaults found in the README's table"
        );

        // The shipped file turns the admin listener and the counter on,
        // with their defaults, and sets nothing else.
        let shipped = include_str!("../../../config.toml");
        assert_eq!(read(shipped), read("[admin]\n[counter]\n"));
    }

    #[test]
    fn the_counter_keeps_its_count_in_a_file_unless_told_memory() {
        let counter = parse("[counter]\n").unwrap().counter.unwrap();
        assert_eq!(counter.store, StoreKind::File);
        let base = Path::new("/var/lib/gateway");
        assert_eq!(counter.state_path(base), base.join("counter.state"));
        let counter = parse("[counter]\npath = \"/srv/count\"\n")
            .unwrap()
            .counter
            .unwrap();
        assert_eq!(counter.state_path(base), Path::new("/srv/count"));
        let counter = parse("[counter]\nstore = \"memory\"\n")
            .unwrap()
            .counter
            .unwrap();
        assert_eq!(counter.store, StoreKind::Memory);
        let err = parse("[counter]\nstore = \"memory\"\npath = \"c\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:3:8: counter.path"), "{err}");
        let err = parse("[counter]\nstore = \"sqlite\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:2:9: counter.store"), "{err}");
        assert!(err.contains("`file`") && err.contains("`memory`"), "{err}");
        let err = parse("[counter]\npath = \"\"\n").unwrap_err().to_string();
        assert!(
            err.contains("counter.path") && err.contains("empty"),
            "{err}"
        );
    }

    #[test]
    fn the_postgres_store_needs_a_url_and_nothing_else_takes_one() {
        let counter = parse(
            "[counter]\nstore = \"postgres\"\npostgres_url = \"postgres://gateway@db.example/gateway\"\n",
        )
        .unwrap()
        .counter
        .unwrap();
        assert_eq!(counter.store, StoreKind::Postgres);
        let cases = [
            (
                "[counter]\nstore = \"postgres\"\n",
                "counter.store",
                "needs counter.postgres_url",
            ),
            (
                "[counter]\npostgres_url = \"postgres://h/db\"\n",
                "counter.postgres_url",
                "only for store = \"postgres\"",
            ),
            (
                "[counter]\nstore = \"postgres\"\npostgres_url = \"postgres://h:99999/db\"\n",
                "counter.postgres_url",
                "invalid",
            ),
            (
                "[counter]\nstore = \"postgres\"\npostgres_url = \"postgres://h/db?sslmode=verify-ca\"\n",
                "counter.postgres_url",
                "sslmode=verify-ca needs sslrootcert=FILE",
            ),
            (
                "[counter]\nstore = \"postgres\"\npostgres_url = \"postgres://h/db\"\npath = \"c\"\n",
                "counter.path",
                "only for store = \"file\"",
            ),
        ];
        for (text, key, why) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.runtime.backend, Backend::Tokio);
        assert_eq!(config.server.max_header_bytes, 16384);
        assert!(config.counter.is_none());
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:3:1: server"), "{err}");
        assert!(err.contains("unknown field `lisen`"), "{err}");
    }

    #[test]
    fn bad_backend_lists_valid_ones() {
        let err = parse("[runtime]\nbackend = \"glommio\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:2:11: runtime.backend"), "{err}");
        assert!(err.contains("`tokio`") && err.contains("`smol`"), "{err}");
    }

    #[test]
    fn threading_is_shared_or_per_core() {
        assert_eq!(parse("").unwrap().runtime.threading, Threading::PerCore);
        let config = parse("[runtime]\nthreading = \"shared\"\n").unwrap();
        assert_eq!(config.runtime.threading, Threading::Shared);
        let err = parse("[runtime]\nthreading = \"numa\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.toml:2:13: runtime.threading"),
            "{err}"
        );
        assert!(
            err.contains("`shared`") && err.contains("`per-core`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_key() {
        let err = parse("[runtime]\nworkers = \"four\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:2:11: runtime.workers"), "{err}");
    }

    #[test]
    fn values_are_checked() {
        let err = parse("[server]\nmax_header_bytes = 100\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.toml:2:20: server.max_header_bytes"),
            "{err}"
        );
        let err = parse("[server]\nmax_header_bytes = 1048577\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected 8192 to 1048576, got 1048577"),
            "{err}"
        );
        assert!(parse("[server]\nmax_header_bytes = 1048576\n").is_ok());
        assert!(parse("[upstream]\nurl = \"https://example.com/\"\n").is_ok());
        // The URL parser takes it; a certificate could not name it.
        let err = parse("[upstream]\nurl = \"https://-a.example/counter\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.toml:2:7: upstream.url") && err.contains("-a.example"),
            "{err}"
        );
        let err = parse("[upstream]\ntls_ca = \"ca.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.toml:2:10: upstream.tls_ca") && err.contains("https://"),
            "{err}"
        );
        let err = parse("[server]\ntls_cert = \"c.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.toml:2:12: server.tls_cert") && err.contains("tls_key"),
            "{err}"
        );
        let err = parse("[server]\ntls_key = \"k.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:2:11: server.tls_key"), "{err}");
        let err = parse("[upstream]\nrequest_timeout_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream.request_timeout_ms"), "{err}");
        for bad in ["0", "1048577"] {
            let err = parse(&format!("[upstream]\nbatch_max = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("test.toml:2:13: upstream.batch_max") && err.contains(bad),
                "{err}"
            );
        }
        assert_eq!(
            parse("[upstream]\nbatch_max = 64\n")
                .unwrap()
                .upstream
                .batch_max,
            64
        );
    }

    #[test]
    fn listeners_on_one_port_are_refused() {
        let err = parse("[server]\nlisten = \"127.0.0.1:9000\"\n[admin]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("admin.listen") && err.contains("overlaps server.listen"),
            "{err}"
        );
        // A wildcard takes the port on every address of its family.
        let err = parse("[counter]\nlisten = \"127.0.0.1:3000\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:2:10: counter.listen"), "{err}");
        let err = parse("[server]\nlisten = \"[::]:8080\"\n[admin]\nlisten = \"127.0.0.1:8080\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.listen"), "{err}");
        let err = parse("[admin]\nlisten = \"[::ffff:0.0.0.0]:3000\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.listen"), "{err}");
        // Ports apart, port 0, or two families' own addresses are fine.
        assert!(parse("[admin]\nlisten = \"0.0.0.0:9000\"\n[counter]\n").is_ok());
        assert!(
            parse("[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n")
                .is_ok()
        );
        assert!(
            parse("[server]\nlisten = \"0.0.0.0:80\"\n[admin]\nlisten = \"[::1]:80\"\n").is_ok()
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("[server\n").unwrap_err().to_string();
        assert!(err.starts_with("test.toml:1:"), "{err}");
    }

    #[test]
    fn workers_and_connection_caps_are_bounded() {
        let err = parse("[runtime]\nworkers = 1025\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:2:11: runtime.workers"), "{err}");
        assert!(err.contains("at most 1024"), "{err}");
        let err = parse("[runtime]\nworkers = 9223372036854775807\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("runtime.workers"), "{err}");
        assert_eq!(
            parse("[runtime]\nworkers = 1024\n")
                .unwrap()
                .runtime
                .worker_count(),
            1024
        );
        let automatic = parse("").unwrap().runtime.worker_count();
        assert!((1..=MAX_WORKERS).contains(&automatic));
        for key in ["server", "upstream"] {
            let err = parse(&format!(
                "[{key}]\nmax_connections = 18446744073709551615\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with(&format!("test.toml:2:19: {key}.max_connections")),
                "{err}"
            );
            assert!(err.contains("at most 2147483648"), "{err}");
            assert!(parse(&format!("[{key}]\nmax_connections = 2147483648\n")).is_ok());
        }
    }
}
