//! Logging to stderr, at a level a reload can change: `log.level`, unless
//! `RUST_LOG` overrides it for the life of the process.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Changes the level of the logging [`init`] set up.
pub struct LogLevel {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    /// `RUST_LOG` was set: it keeps deciding, whatever `log.level` says.
    overridden: bool,
}

/// Logs to stderr at `level` (a level or an `EnvFilter` directive list),
/// or at what `RUST_LOG` says. Under journald (`JOURNAL_STREAM` set) lines
/// carry no timestamp: it adds its own.
pub fn init(level: &str) -> LogLevel {
    let from_env = EnvFilter::try_from_default_env().ok();
    let overridden = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let format = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if std::env::var_os("JOURNAL_STREAM").is_some() {
        registry.with(format.without_time()).try_init()
    } else {
        registry.with(format).try_init()
    };
    LogLevel {
        // Another subscriber was there first (a test's): leave it alone.
        handle: installed.is_ok().then_some(handle),
        overridden,
    }
}

impl LogLevel {
    /// No logging to change: for a daemon run without [`init`].
    pub fn none() -> Self {
        Self {
            handle: None,
            overridden: false,
        }
    }

    /// Logs at `level` from now on; says why not when it cannot.
    pub fn set(&self, level: &str) -> Result<(), LevelNotSet> {
        if self.overridden {
            return Err(LevelNotSet::Overridden);
        }
        let Some(handle) = &self.handle else {
            return Err(LevelNotSet::Unmanaged);
        };
        let filter = EnvFilter::try_new(level)?;
        Ok(handle.reload(filter)?)
    }
}

/// Why [`LogLevel::set`] left the level as it was.
#[derive(Debug, thiserror::Error)]
pub enum LevelNotSet {
    #[error("RUST_LOG is set, and decides the log level")]
    Overridden,
    #[error("this process does not manage its logging")]
    Unmanaged,
    /// Not a level or a directive list `EnvFilter` understands.
    #[error(transparent)]
    Invalid(#[from] tracing_subscriber::filter::ParseError),
    /// The subscriber the level belongs to is gone.
    #[error(transparent)]
    Reload(#[from] reload::Error),
}
