//! The configuration file: its shape, its defaults, and errors that point
//! at the offending line.
//!
//! Every key has a default (README, "Configuration"), so an empty file is valid. Unknown
//! keys are errors. A [`ConfigError`] names the file, the line and column,
//! the key and what was expected; `serde_path_to_error` supplies the key
//! path and toml's span-preserving parser the position.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration, as read from `config.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub runtime: RuntimeConfig,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub responses: ResponsesConfig,
    pub admin: Option<AdminConfig>,
    pub counter: Option<CounterConfig>,
    pub log: LogConfig,
    /// What a relative `counter.path` is taken from: `$STATE_DIRECTORY`
    /// when systemd sets it, else the configuration file's folder (set by
    /// [`Config::load`]; the working directory otherwise).
    #[serde(skip)]
    pub state_base: PathBuf,
}

/// Which async runtime runs the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Tokio,
    Smol,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tokio => "tokio",
            Backend::Smol => "smol",
        }
    }
}

/// How the worker threads share the work (`runtime.threading`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Threading {
    /// One scheduler for all workers; connections move to idle workers.
    Shared,
    /// One scheduler and upstream pool per worker; new connections are
    /// handed to the workers in turn and stay on theirs. The default: it
    /// served more than shared on four and eight cores (bench/README.md).
    #[default]
    PerCore,
}

impl Threading {
    pub fn name(self) -> &'static str {
        match self {
            Threading::Shared => "shared",
            Threading::PerCore => "per-core",
        }
    }
}

impl From<Threading> for backends::Threading {
    fn from(threading: Threading) -> Self {
        match threading {
            Threading::Shared => backends::Threading::Shared,
            Threading::PerCore => backends::Threading::PerCore,
        }
    }
}

/// The largest configuration file read (a real one is a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The most worker threads `runtime.workers` (and `gateway counter
/// --workers`) may ask for. More would not run faster on any host this
/// serves, and far more failed at start: `usize::MAX` overflowed a vector
/// (a panic), 100,000 had the OS refuse threads.
pub const MAX_WORKERS: usize = 1024;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub backend: Backend,
    /// Worker threads, at most [`MAX_WORKERS`]; 0 means one per CPU this
    /// process may run on.
    pub workers: usize,
    pub threading: Threading,
}

impl RuntimeConfig {
    /// The number of worker threads to start: never more than
    /// [`MAX_WORKERS`], also when counted from the CPUs.
    pub fn worker_count(&self) -> usize {
        let workers = match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        workers.min(MAX_WORKERS)
    }
}

/// The most connections `server.max_connections` and
/// `upstream.max_connections` may allow: no Linux process can hold more
/// descriptors (`fs.nr_open` tops out just below 2^31), so a larger cap
/// only means "none", and the descriptor count the start-up check adds up
/// from them would overflow.
pub const MAX_CONNECTIONS: usize = 1 << 31;

/// What `server.max_header_bytes` may be. hyper needs at least 8 KiB. It
/// is also what each connection may buffer of a request head, and hyper
/// sets no ceiling of its own: a huge value took 32 MiB heads (each
/// connection, times `server.max_connections`) and never answered 431.
/// 1 MiB is Go's `net/http` default, 64 times the default here.
pub const HEADER_BYTES: std::ops::RangeInclusive<usize> = 8192..=1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub header_read_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_header_bytes: usize,
    pub shutdown_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3000)),
            max_connections: 65536,
            header_read_timeout_ms: 5000,
            idle_timeout_ms: 60000,
            max_header_bytes: 16384,
            shutdown_timeout_ms: 10000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    pub url: String,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub max_connections: usize,
    pub pool_idle_timeout_ms: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:3001/counter".to_owned(),
            connect_timeout_ms: 1000,
            request_timeout_ms: 2000,
            max_connections: 1024,
            pool_idle_timeout_ms: 30000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponsesConfig {
    pub welcome: String,
    pub error: String,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        Self {
            welcome: "Welcome to my site!".to_owned(),
            error: "Error registering your visit".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CounterConfig {
    pub listen: SocketAddr,
    pub store: StoreKind,
    /// The state file of `store = "file"`; see [`CounterConfig::state_path`].
    pub path: Option<PathBuf>,
    /// The database of `store = "postgres"`: a `postgres://` URL (or
    /// libpq's `key=value` form).
    pub postgres_url: Option<String>,
}

impl Default for CounterConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3001)),
            store: StoreKind::File,
            path: None,
            postgres_url: None,
        }
    }
}

/// The state file's name when `counter.path` is not given.
pub const DEFAULT_STATE_FILE: &str = "counter.state";

impl CounterConfig {
    /// Whether the store's keys fit the store: a wrong one is named.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.path.is_some() && self.store != StoreKind::File {
            return Err((
                "counter.path",
                "a state file is only for store = \"file\"; remove it, or set store = \"file\""
                    .to_owned(),
            ));
        }
        if let Some(path) = &self.path
            && path.as_os_str().is_empty()
        {
            return Err((
                "counter.path",
                "expected a file name, got an empty path".to_owned(),
            ));
        }
        match (&self.postgres_url, self.store) {
            (Some(url), StoreKind::Postgres) => crate::store::postgres::parse_url(url)
                .map(drop)
                .map_err(|why| ("counter.postgres_url", Escaped(&why).to_string())),
            (None, StoreKind::Postgres) => Err((
                "counter.store",
                "store = \"postgres\" needs counter.postgres_url (e.g. \"postgres://gateway@127.0.0.1/gateway\")".to_owned(),
            )),
            (Some(_), _) => Err((
                "counter.postgres_url",
                "a database is only for store = \"postgres\"; remove it, or set store = \"postgres\"".to_owned(),
            )),
            (None, _) => Ok(()),
        }
    }

    /// The state file of the file store: `counter.path`, else
    /// [`DEFAULT_STATE_FILE`]; a relative one is taken from `base`.
    pub fn state_path(&self, base: &Path) -> PathBuf {
        let path = self
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_FILE));
        base.join(path)
    }
}

/// Where the built-in counter keeps its count (`counter.store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A file on this machine, synced before each answer (the default).
    #[default]
    File,
    /// Memory only: lost at every restart. For benchmarks and tests.
    Memory,
    /// A PostgreSQL database, committed before each answer: one count for
    /// every counter pointed at it.
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            access: false,
        }
    }
}

/// A configuration that cannot be used, with where and why.
///
/// Displayed on one line, whatever the file holds: the path, key and
/// message (which quotes values from the file, as toml's and serde's do)
/// are [`Escaped`], so a value with a newline cannot forge a second line
/// in the journal.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "configuration file not found: {} (looked there because {reason})",
        Escaped(path.display())
    )]
    NotFound { path: PathBuf, reason: String },
    #[error(
        "cannot read configuration file {}: {}",
        Escaped(path.display()),
        Escaped(source)
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}:{line}:{column}: {}: {}",
        Escaped(path.display()),
        Escaped(key),
        Escaped(message)
    )]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
}

/// Shows text with its control characters escaped (`\n`, `\u{1b}`), and
/// the invisible ones that break or reorder a line (U+2028, U+2029, the
/// bidirectional overrides): what a configuration file says is printed on
/// one line, as written, and non-ASCII text stays readable.
pub struct Escaped<T>(pub T);

impl<T: std::fmt::Display> std::fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.to_string().chars() {
            if needs_escape(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// The upstream URL, split into what a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// `host[:port]` for the `host` header, as the URL parser normalises
    /// it: lowercase, an international name in punycode, no `:80`.
    pub authority: String,
    /// The host to resolve or connect to: an IPv6 address without its
    /// brackets.
    pub host: String,
    pub port: u16,
    /// Path and query, for the request line.
    pub path_and_query: String,
}

impl UpstreamTarget {
    /// Parses an `http://` URL (WHATWG rules, servo's `url` crate).
    ///
    /// Refused: another scheme, an empty host, a port past 65535 or 0,
    /// credentials, a fragment, and anything the parser would have had to
    /// repair (a tab or newline it would drop, a space it would encode,
    /// `http:/host`): the URL the gateway uses is the one written.
    pub fn parse(text: &str) -> Result<Self, String> {
        let shown = Escaped(text);
        let repaired = std::cell::Cell::new(None);
        let record = |violation| {
            if repaired.get().is_none() {
                repaired.set(Some(violation));
            }
        };
        let url = url::Url::options()
            .syntax_violation_callback(Some(&record))
            .parse(text)
            .map_err(|e| format!("`{shown}` is not a valid URL ({e})"))?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(format!(
                    "`{shown}`: https upstreams are not supported yet; use an http:// URL"
                ));
            }
            _ => return Err(format!("`{shown}`: expected an http:// URL")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "`{shown}`: credentials in the URL are not supported"
            ));
        }
        if url.fragment().is_some() {
            return Err(format!(
                "`{shown}`: a fragment (#...) is never sent to a server; remove it"
            ));
        }
        if let Some(violation) = repaired.get() {
            return Err(format!(
                "`{shown}`: {violation}; write the URL as it is to be sent (percent-encode spaces and the like)"
            ));
        }
        let (Some(host), Some(name)) = (url.host(), url.host_str()) else {
            return Err(format!("`{shown}`: the URL has no host"));
        };
        let port = url.port_or_known_default().unwrap_or(80);
        if port == 0 {
            return Err(format!("`{shown}`: port 0 cannot be connected to"));
        }
        let host = match host {
            url::Host::Ipv6(address) => address.to_string(),
            _ => name.to_owned(),
        };
        let authority = match url.port() {
            Some(port) => format!("{name}:{port}"),
            None => name.to_owned(),
        };
        let path_and_query = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        Ok(Self {
            authority,
            host,
            port,
            path_and_query,
        })
    }
}

impl Config {
    /// Reads and validates the configuration at `path`.
    ///
    /// Only a regular file of at most [`MAX_CONFIG_BYTES`] is read: a FIFO
    /// would block the start for ever, and `/dev/zero` fill memory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
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
        let mut config = Self::parse(path, &source)?;
        config.state_base = state_base(path);
        Ok(config)
    }

    /// Parses and validates configuration text; `path` is only used in errors.
    pub fn parse(path: &Path, source: &str) -> Result<Self, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, key: String, message: String| {
            let (line, column) = span.map_or((1, 1), |s| line_column(source, s.start));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                key,
                message,
            }
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

    /// Checks what the types cannot: ranges and the upstream URL.
    fn validate(&self) -> Result<(), (&'static str, String)> {
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
        }
        if self.runtime.workers > MAX_WORKERS {
            return Err((
                "runtime.workers",
                format!(
                    "expected at most {MAX_WORKERS} (0 = one per CPU), got {}",
                    self.runtime.workers
                ),
            ));
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
        UpstreamTarget::parse(&self.upstream.url).map_err(|m| ("upstream.url", m))?;
        self.check_listeners_apart()?;
        if let Some(counter) = &self.counter {
            counter.check()?;
        }
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

    /// A one-line summary, printed by `gateway --check`.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "backend={} workers={} threading={} listen={} upstream={}",
            self.runtime.backend.name(),
            self.runtime.worker_count(),
            self.runtime.threading.name(),
            self.server.listen,
            Escaped(&self.upstream.url),
        );
        if let Some(counter) = &self.counter {
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
        if let Some(admin) = &self.admin {
            line.push_str(&format!(" admin={}", admin.listen));
        }
        line
    }
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

/// Milliseconds from the config as a [`Duration`].
pub fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

/// 1-based line and column of a byte offset.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
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

/// The span of the value at a dotted key path (`server.listen`), or of the
/// nearest table on that path that the file has.
fn span_of(source: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let document = toml::de::DeTable::parse(source).ok()?;
    let mut table = document.get_ref();
    let mut found = None;
    for part in key.split('.') {
        let (k, v) = table.get_key_value(part)?;
        found = Some(k.span());
        match v.get_ref() {
            toml::de::DeValue::Table(inner) => table = inner,
            _ => return Some(v.span()),
        }
    }
    found
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

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
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
                "[counter]\nstore = \"postgres\"\npostgres_url = \"postgres://h/db?sslmode=require\"\n",
                "counter.postgres_url",
                "TLS",
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
        let err = parse("[upstream]\nurl = \"https://example.com/\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("upstream.url") && err.contains("https"),
            "{err}"
        );
        let err = parse("[upstream]\nrequest_timeout_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream.request_timeout_ms"), "{err}");
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
    fn upstream_target() {
        let t = UpstreamTarget::parse("http://localhost:8080/count?x=1").unwrap();
        assert_eq!(t.authority, "localhost:8080");
        assert_eq!(t.host, "localhost");
        assert_eq!(t.port, 8080);
        assert_eq!(t.path_and_query, "/count?x=1");
        let t = UpstreamTarget::parse("http://[::1]/").unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.authority, "[::1]");
        assert_eq!(t.port, 80);
        // The host header gets the normalised name: no default port,
        // lowercase, punycode; an empty path is `/`.
        let t = UpstreamTarget::parse("http://Bücher.Example:80?q=1").unwrap();
        assert_eq!(t.authority, "xn--bcher-kva.example");
        assert_eq!(t.host, "xn--bcher-kva.example");
        assert_eq!(t.port, 80);
        assert_eq!(t.path_and_query, "/?q=1");
        let t = UpstreamTarget::parse("http://[::1]:3001/counter").unwrap();
        assert_eq!((t.authority.as_str(), t.port), ("[::1]:3001", 3001));
    }

    #[test]
    fn upstream_urls_that_cannot_be_used_are_refused() {
        for (url, why) in [
            ("http://127.0.0.1:99999/counter", "invalid port number"),
            ("http://127.0.0.1:65536/", "invalid port number"),
            ("http://h:0/", "port 0"),
            ("http://:80/", "empty host"),
            ("http:///counter", "expected //"),
            ("http:/h/counter", "expected //"),
            ("http://user:secret@h/", "credentials"),
            ("http://user@h/", "credentials"),
            ("http://h/counter#top", "fragment"),
            ("https://h/", "https upstreams are not supported"),
            ("ftp://h/", "expected an http:// URL"),
            ("h:3001/counter", "expected an http:// URL"),
            ("/counter", "not a valid URL"),
            ("http://h/a b", "non-URL code point"),
            ("http://h/a\\b", "backslash"),
            ("http://h/a\tb", "tabs or newlines"),
            (" http://h/", "leading or trailing"),
        ] {
            let err = UpstreamTarget::parse(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
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

    #[test]
    fn errors_are_one_line_whatever_the_file_holds() {
        for (text, shown) in [
            (
                "[upstream]\nurl = \"http://h/a\\r\\nINFO forged\"\n",
                "http://h/a\\r\\nINFO forged",
            ),
            (
                "[runtime]\nbackend = \"x\\ny\\u001b[2J\"\n",
                "`x\\ny\\u{1b}[2J`",
            ),
            ("[server]\n\"a\\rb\" = 1\n", "`a\\rb`"),
            ("[log]\nlevel = \"x=loud\\u2028\"\n", "`x=loud\\u{2028}`"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(!err.contains(['\n', '\r', '\u{1b}', '\u{2028}']), "{err:?}");
            assert!(err.contains(shown), "{err}");
        }
        let err = ConfigError::NotFound {
            path: PathBuf::from("/etc/a\nb.toml"),
            reason: "test".to_owned(),
        };
        assert!(err.to_string().contains("/etc/a\\nb.toml"), "{err}");
        let err = Config::parse(Path::new("x\r.toml"), "[server\n").unwrap_err();
        assert!(err.to_string().starts_with("x\\r.toml:1:"), "{err}");
        // Non-ASCII text stays readable.
        let err = parse("[runtime]\nbackend = \"tökiö\"\n").unwrap_err();
        assert!(err.to_string().contains("`tökiö`"), "{err}");
    }

    #[test]
    fn summary_escapes_the_url() {
        let config = parse("[upstream]\nurl = \"http://h/\\u202Eabc\"\n").unwrap();
        let summary = config.summary();
        assert!(
            summary.contains("upstream=http://h/\\u{202e}abc"),
            "{summary}"
        );
    }
}
