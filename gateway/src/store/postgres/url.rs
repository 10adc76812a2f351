//! The `postgres_url` setting: parsed and checked as the configuration
//! checks it, and named in logs without its password.

use std::fmt::Write as _;

use postgres::Config;
use postgres::config::Host;

/// Why a `postgres_url` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not a URL (or key=value string) the client reads, as it says.
    #[error("{0}")]
    Unreadable(#[from] postgres::Error),
    /// `sslmode=require`, which this client cannot honour.
    #[error(
        "sslmode=require: TLS to PostgreSQL is not supported yet (use a Unix socket, or sslmode=disable on a trusted network)"
    )]
    TlsRequired,
}

/// `postgres_url` parsed, as the configuration checks it: an error says why.
pub fn parse_url(url: &str) -> Result<Config, UrlError> {
    let config: Config = url.parse()?;
    if config.get_ssl_mode() == postgres::config::SslMode::Require {
        return Err(UrlError::TlsRequired);
    }
    Ok(config)
}

/// The database a configuration names, as a URL without its password
/// (a Unix socket folder as it is).
pub fn describe(config: &Config) -> String {
    let mut line = String::from("postgres://");
    if let Some(user) = config.get_user() {
        let _ = write!(line, "{user}@");
    }
    for (i, host) in config.get_hosts().iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        match host {
            Host::Tcp(name) => line.push_str(name),
            Host::Unix(path) => line.push_str(&path.display().to_string()),
        }
        if let Some(port) = config.get_ports().get(i).or(config.get_ports().first()) {
            let _ = write!(line, ":{port}");
        }
    }
    if let Some(dbname) = config.get_dbname() {
        let _ = write!(line, "/{dbname}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_described_without_their_password() {
        let config = parse_url("postgres://gateway:secret@db.example:6543/visits").unwrap();
        assert_eq!(
            describe(&config),
            "postgres://gateway@db.example:6543/visits"
        );
        let config = parse_url("postgres://gateway@%2Frun%2Fpostgresql/gateway").unwrap();
        assert_eq!(
            describe(&config),
            "postgres://gateway@/run/postgresql:5432/gateway"
        );
        assert!(
            parse_url("postgres://h/db?sslmode=require")
                .unwrap_err()
                .to_string()
                .contains("TLS")
        );
        assert!(parse_url("postgres://h:99999/db").is_err());
        assert!(parse_url("postgres://h/db?nonsense=1").is_err());
    }
}
