//! The configuration file: its shape, its defaults, and errors that point
//! at the offending line.
//!
//! Every key has a default (README, "Configuration"), so an empty file is valid. Unknown
//! keys are errors. A [`ConfigError`] names the file, the line and column,
//! the key and what was expected; `serde_path_to_error` supplies the key
//! path and toml's span-preserving parser the position.
//!
//! This module holds the types and their defaults: the file's data, and
//! nothing read from elsewhere. `load` reads a file and checks what the
//! types cannot, `error` tells what is wrong and where, `upstream_url`
//! splits `upstream.url` into what a connection needs, and `plan` resolves
//! a configuration into what the daemon runs: the files its TLS keys name,
//! the upstream parsed, the pools' shares.

mod error;
mod load;
mod plan;
mod upstream_url;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use self::error::{ConfigError, Escaped};
pub use self::load::locate;
pub use self::plan::{Plan, TlsMaterial};
pub use self::upstream_url::UpstreamTarget;
/// `runtime.backend` and `runtime.threading`: chosen by name from the
/// backends crate's lists.
pub use backends::{Backend, Named, Threading};

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
}

/// The largest configuration file read (a real one is a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The most worker threads `runtime.workers` (and `gateway counter
/// --workers`) may ask for. More would not run faster on any host this
/// serves, and a count without a bound reaches what the OS or memory
/// refuses at start, where it should be a configuration error.
pub const MAX_WORKERS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    #[serde(deserialize_with = "by_name")]
    pub backend: Backend,
    /// Worker threads, at most [`MAX_WORKERS`]; 0 means one per CPU this
    /// process may run on.
    pub workers: usize,
    #[serde(deserialize_with = "by_name")]
    pub threading: Threading,
}

/// Reads a choice made by name (`backend = "smol"`); an unknown name is
/// refused listing the known ones, as serde's own enums are.
fn by_name<'de, D: serde::Deserializer<'de>, T: Named>(deserializer: D) -> Result<T, D::Error> {
    let name = String::deserialize(deserializer)?;
    T::from_name(&name).ok_or_else(|| serde::de::Error::unknown_variant(&name, T::NAMES))
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
/// is also what each connection may buffer of a request head, times
/// `server.max_connections`, and hyper sets no ceiling of its own, so the
/// bound here is what keeps a large value from letting a client hold
/// that much memory without ever being answered 431. The top is Go's
/// `net/http` default.
pub const HEADER_BYTES: std::ops::RangeInclusive<usize> = 8192..=1 << 20;

/// What `server.http2_max_streams` may be: each open stream may hold a
/// visit, so a client with many could hold much of the upstream pool.
/// nginx allows 128 by default; the ceiling is nginx's too, and a stream
/// is at least one upstream connection's worth of waiting.
pub const HTTP2_STREAMS: std::ops::RangeInclusive<u32> = 1..=1024;

/// What `server.http2_stream_window_bytes` may be: a visitor's request
/// has no body, so a window is only how much of an unwanted one a client
/// may send ahead on each stream. HTTP/2 caps windows at 2^31 - 1.
pub const HTTP2_STREAM_WINDOW: std::ops::RangeInclusive<u32> = 1024..=(1 << 24);

/// What `server.http2_connection_window_bytes` may be: at least the
/// protocol's initial 65,535 (a server can only widen it).
pub const HTTP2_CONNECTION_WINDOW: std::ops::RangeInclusive<u32> = 65_535..=(1 << 24);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub header_read_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_header_bytes: usize,
    pub shutdown_timeout_ms: u64,
    /// HTTP/2 beside HTTP/1.1: offered by ALPN with HTTPS, and with prior
    /// knowledge (h2c) on a plain listener.
    pub http2: bool,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_streams: u32,
    /// How much request body a client may send ahead on one stream.
    pub http2_stream_window_bytes: u32,
    /// How much request body a client may send ahead on one connection,
    /// all its streams together.
    pub http2_connection_window_bytes: u32,
    /// PEM certificate chain (leaf first): the listener speaks HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`'s leaf.
    pub tls_key: Option<PathBuf>,
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
            http2: true,
            http2_max_streams: 128,
            http2_stream_window_bytes: 16384,
            http2_connection_window_bytes: 65_535,
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    pub url: String,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub max_connections: usize,
    pub pool_idle_timeout_ms: u64,
    /// The most visits one POST carries; 1 sends a POST per visit.
    pub batch_max: usize,
    /// PEM CA certificates an https upstream is verified against, instead
    /// of the system's roots.
    pub tls_ca: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:3001/counter".to_owned(),
            connect_timeout_ms: 1000,
            request_timeout_ms: 2000,
            max_connections: 1024,
            pool_idle_timeout_ms: 30000,
            batch_max: 1,
            tls_ca: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

/// Milliseconds from the config as a [`Duration`].
pub fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}
