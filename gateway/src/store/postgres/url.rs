//! The `postgres_url` setting: libpq's connection string (a URL or
//! `key=value` pairs), parsed and checked as the configuration checks it,
//! and named in logs without its password. The client crate reads most
//! of it; what it does not know (the `sslmode`s past `require`,
//! `sslrootcert`, `passfile`) is taken out first and read here, with
//! libpq's meaning.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;
use postgres::Config;
use postgres::config::Host;

/// libpq's `sslmode`: whether TLS is tried, insisted on, and what of
/// the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Without TLS first; with it where the server refuses the first.
    Allow,
    /// With TLS where the server offers it; without it where it does not
    /// or where the TLS connection fails. libpq's default.
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS, and a certificate signed by a trusted root.
    VerifyCa,
    /// TLS, and a certificate signed by a trusted root for the host
    /// connected to.
    VerifyFull,
}

impl SslMode {
    const NAMES: [(&str, SslMode); 6] = [
        ("disable", Self::Disable),
        ("allow", Self::Allow),
        ("prefer", Self::Prefer),
        ("require", Self::Require),
        ("verify-ca", Self::VerifyCa),
        ("verify-full", Self::VerifyFull),
    ];

    fn parse(value: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, mode)| *mode)
    }

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, mode)| *mode == self)
            .map_or("?", |(name, _)| name)
    }
}

/// What the server's certificate is verified against: `sslrootcert`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// None given: the system's roots where a mode verifies.
    Absent,
    /// The CA certificates in this file.
    File(PathBuf),
    /// `sslrootcert=system`: the system's roots.
    System,
}

/// A database to connect to: the client's configuration, and what it
/// does not hold.
#[derive(Clone, Debug)]
pub struct Database {
    /// Everything but the TLS and the password file; its `ssl_mode` is
    /// set for each attempt (see `connection.rs`).
    pub config: Config,
    pub ssl_mode: SslMode,
    pub root_cert: RootCert,
    /// The URL's `passfile`, if it names one.
    pub passfile: Option<PathBuf>,
}

/// Why a `postgres_url` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not a URL (or key=value string) the client reads, as it says.
    #[error("{0}")]
    Unreadable(#[from] postgres::Error),
    #[error("sslmode={0:?}: expected disable, allow, prefer, require, verify-ca or verify-full")]
    UnknownSslMode(String),
    /// libpq's rule: the system's roots would verify any public
    /// certificate, so its name must be checked too.
    #[error(
        "sslrootcert=system needs sslmode=verify-full (a weaker mode, here {0}, would accept any certificate a public CA signed)"
    )]
    SystemRootsNeedVerifyFull(&'static str),
    /// Checking the chain alone against the system's roots would let any
    /// certificate a public CA signed, for any name, through.
    #[error(
        "sslmode=verify-ca needs sslrootcert=FILE, the CA that signs the database's certificate (the system's roots would accept any certificate a public CA signed, for any name; or use sslmode=verify-full)"
    )]
    VerifyCaNeedsRootCert,
    #[error("sslrootcert: expected a file name, got an empty one")]
    EmptyRootCert,
    #[error("{0}")]
    Hosts(String),
    #[error("an unterminated quoted value (a ' with no closing ')")]
    UnterminatedQuote,
    #[error("{0}: not UTF-8 once its %-escapes are decoded")]
    NotUtf8(&'static str),
    #[error("passfile: expected a file name, got an empty one")]
    EmptyPassfile,
}

/// The parameters taken out before the client reads the rest.
const OURS: [&str; 3] = ["sslmode", "sslrootcert", "passfile"];

/// `postgres_url` parsed, as the configuration checks it: an error says why.
pub fn parse_url(url: &str) -> Result<Database, UrlError> {
    let (rest, ours) = take_parameters(url)?;
    let mut config: Config = rest.parse()?;
    let value = |key: &str| {
        ours.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let ssl_mode = match value("sslmode") {
        None => SslMode::Prefer,
        Some(name) => SslMode::parse(name).ok_or_else(|| UrlError::UnknownSslMode(name.into()))?,
    };
    let root_cert = match value("sslrootcert") {
        None => RootCert::Absent,
        Some("") => return Err(UrlError::EmptyRootCert),
        Some("system") => RootCert::System,
        Some(path) => RootCert::File(PathBuf::from(path)),
    };
    if root_cert == RootCert::System && ssl_mode != SslMode::VerifyFull {
        return Err(UrlError::SystemRootsNeedVerifyFull(ssl_mode.name()));
    }
    if ssl_mode == SslMode::VerifyCa && root_cert == RootCert::Absent {
        return Err(UrlError::VerifyCaNeedsRootCert);
    }
    check_hosts(&config)?;
    let passfile = match value("passfile") {
        None => None,
        Some("") => return Err(UrlError::EmptyPassfile),
        Some(path) => Some(PathBuf::from(path)),
    };
    // Hosts are tried here one at a time (see `connection.rs`); the
    // client's own TLS setting is made for each.
    config.ssl_mode(postgres::config::SslMode::Disable);
    Ok(Database {
        config,
        ssl_mode,
        root_cert,
        passfile,
    })
}

/// The client checks these itself where it connects to the hosts; here
/// each host is connected to alone, so the checks are made here, as
/// libpq makes them.
fn check_hosts(config: &Config) -> Result<(), UrlError> {
    let (hosts, addrs, ports) = (
        config.get_hosts().len(),
        config.get_hostaddrs().len(),
        config.get_ports().len(),
    );
    if hosts > 0 && addrs > 0 && hosts != addrs {
        return Err(UrlError::Hosts(format!(
            "{hosts} hosts and {addrs} hostaddrs: expected as many of each"
        )));
    }
    let targets = hosts.max(addrs);
    if ports > 1 && ports != targets {
        return Err(UrlError::Hosts(format!(
            "{ports} ports for {targets} hosts: expected one port, or one for each host"
        )));
    }
    Ok(())
}

type Taken = (String, Vec<(String, String)>);

/// `url` without [`OURS`], and their values (unescaped), in order.
fn take_parameters(url: &str) -> Result<Taken, UrlError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        take_from_query(url)
    } else {
        take_from_pairs(url)
    }
}

/// From a URL's query: `?key=value&…`, percent-encoded.
fn take_from_query(url: &str) -> Result<Taken, UrlError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let decode = |text: &str, what| {
        percent_decode_str(text)
            .decode_utf8()
            .map(|decoded| decoded.into_owned())
            .map_err(|_| UrlError::NotUtf8(what))
    };
    let (mut kept, mut ours) = (Vec::new(), Vec::new());
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key, "a parameter's name")?;
        if let Some(name) = OURS.iter().find(|name| **name == key) {
            ours.push((key, decode(value, name)?));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, ours))
}

/// From libpq's `key=value` pairs: separated by spaces, a value quoted
/// with `'` where it holds spaces, `\` escaping the next character.
/// Text that is not such pairs is left to the client, whose error says
/// what is wrong with it.
fn take_from_pairs(text: &str) -> Result<Taken, UrlError> {
    let (mut rest, mut ours) = (String::new(), Vec::new());
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            rest.push_str(&text[start..]);
            break;
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut closed = !quoted;
        while let Some((_, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '\'' if quoted => {
                    closed = true;
                    break;
                }
                c if c.is_whitespace() && !quoted => break,
                c => value.push(c),
            }
        }
        if !closed {
            return Err(UrlError::UnterminatedQuote);
        }
        let end = chars.peek().map_or(text.len(), |(i, _)| *i);
        if OURS.contains(&key.as_str()) {
            ours.push((key, value));
        } else {
            rest.push_str(&text[start..end]);
            rest.push(' ');
        }
    }
    Ok((rest, ours))
}

/// One of a configuration's hosts: what to connect to, and the name
/// its certificate and its password file line are for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
}

impl Target {
    /// Whether this is a Unix socket, over which libpq never uses TLS.
    pub fn is_unix(&self) -> bool {
        matches!(self.host, Host::Unix(_)) && self.hostaddr.is_none()
    }

    /// The host as libpq names it (a socket folder as its path).
    pub fn host_name(&self) -> String {
        match (&self.host, self.hostaddr) {
            (Host::Tcp(name), _) => name.clone(),
            (Host::Unix(path), None) => path.display().to_string(),
            (Host::Unix(_), Some(addr)) => addr.to_string(),
        }
    }
}

/// The hosts of `config`, in its order, as the client pairs hosts,
/// `hostaddr`s and ports.
pub fn targets(config: &Config) -> Vec<Target> {
    let (hosts, addrs, ports) = (
        config.get_hosts(),
        config.get_hostaddrs(),
        config.get_ports(),
    );
    (0..hosts.len().max(addrs.len()))
        .map(|i| {
            let hostaddr = addrs.get(i).copied();
            let host = match (hosts.get(i), hostaddr) {
                (Some(host), _) => host.clone(),
                (None, Some(addr)) => Host::Tcp(addr.to_string()),
                (None, None) => Host::Tcp(String::new()),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            Target {
                host,
                hostaddr,
                port,
            }
        })
        .collect()
}

/// `config` with `target` as its one host: every other setting copied
/// (the test below fails where one is not).
pub fn for_target(config: &Config, target: &Target) -> Config {
    let mut one = Config::new();
    if let Some(user) = config.get_user() {
        one.user(user);
    }
    if let Some(password) = config.get_password() {
        one.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        one.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        one.options(options);
    }
    if let Some(name) = config.get_application_name() {
        one.application_name(name);
    }
    one.ssl_mode(config.get_ssl_mode())
        .ssl_negotiation(config.get_ssl_negotiation());
    match &target.host {
        Host::Tcp(name) => one.host(name),
        Host::Unix(path) => one.host_path(path),
    };
    if let Some(addr) = target.hostaddr {
        one.hostaddr(addr);
    }
    one.port(target.port);
    if let Some(timeout) = config.get_connect_timeout() {
        one.connect_timeout(*timeout);
    }
    if let Some(timeout) = config.get_tcp_user_timeout() {
        one.tcp_user_timeout(*timeout);
    }
    one.keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle());
    if let Some(interval) = config.get_keepalives_interval() {
        one.keepalives_interval(interval);
    }
    if let Some(retries) = config.get_keepalives_retries() {
        one.keepalives_retries(retries);
    }
    one.target_session_attrs(config.get_target_session_attrs())
        .channel_binding(config.get_channel_binding())
        .load_balance_hosts(config.get_load_balance_hosts());
    one
}

/// The database a configuration names, as a URL without its password
/// (a Unix socket folder as it is), with its `sslmode` where not libpq's
/// default.
pub fn describe(database: &Database) -> String {
    let config = &database.config;
    let mut line = String::from("postgres://");
    if let Some(user) = config.get_user() {
        let _ = write!(line, "{user}@");
    }
    for (i, target) in targets(config).iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        let _ = write!(line, "{}:{}", target.host_name(), target.port);
    }
    if let Some(dbname) = config.get_dbname() {
        let _ = write!(line, "/{dbname}");
    }
    if database.ssl_mode != SslMode::Prefer {
        let _ = write!(line, "?sslmode={}", database.ssl_mode.name());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_described_without_their_password() {
        let database = parse_url("postgres://gateway:secret@db.example:6543/visits").unwrap();
        assert_eq!(
            describe(&database),
            "postgres://gateway@db.example:6543/visits"
        );
        let database = parse_url("postgres://gateway@%2Frun%2Fpostgresql/gateway").unwrap();
        assert_eq!(
            describe(&database),
            "postgres://gateway@/run/postgresql:5432/gateway"
        );
        assert!(parse_url("postgres://h:99999/db").is_err());
        assert!(parse_url("postgres://h/db?nonsense=1").is_err());
    }

    #[test]
    fn libpq_parameters_are_read_from_either_form() {
        let database = parse_url(
            "postgres://gateway@db/visits?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&passfile=/run/pass",
        )
        .unwrap();
        assert_eq!(database.ssl_mode, SslMode::VerifyFull);
        assert_eq!(
            database.root_cert,
            RootCert::File(PathBuf::from("/etc/ca.pem"))
        );
        assert_eq!(database.passfile, Some(PathBuf::from("/run/pass")));
        assert_eq!(database.config.get_application_name(), Some("x"));
        assert_eq!(
            describe(&database),
            "postgres://gateway@db:5432/visits?sslmode=verify-full"
        );

        let database = parse_url(
            "host=db user=gateway sslmode = 'verify-ca' sslrootcert='/etc/my ca.pem' passfile=/run/a\\ b dbname=visits",
        )
        .unwrap();
        assert_eq!(database.ssl_mode, SslMode::VerifyCa);
        assert_eq!(
            database.root_cert,
            RootCert::File(PathBuf::from("/etc/my ca.pem"))
        );
        assert_eq!(database.passfile, Some(PathBuf::from("/run/a b")));
        assert_eq!(database.config.get_dbname(), Some("visits"));

        let database = parse_url("postgres://db/visits").unwrap();
        assert_eq!(
            (database.ssl_mode, database.root_cert, database.passfile),
            (SslMode::Prefer, RootCert::Absent, None)
        );
    }

    #[test]
    fn bad_libpq_parameters_are_named() {
        let error = |url| parse_url(url).unwrap_err().to_string();
        assert!(error("postgres://db/x?sslmode=verify").contains("sslmode=\"verify\""));
        assert!(
            error("postgres://db/x?sslmode=require&sslrootcert=system").contains("verify-full")
        );
        assert!(error("host=db sslrootcert=''").contains("sslrootcert"));
        assert!(error("postgres://db/x?passfile=").contains("passfile"));
        assert!(parse_url("postgres://db/x?sslmode=verify-full&sslrootcert=system").is_ok());
        assert!(error("postgres://db/x?sslmode=verify-ca").contains("sslrootcert=FILE"));
        assert!(parse_url("postgres://db/x?sslmode=verify-ca&sslrootcert=/ca.pem").is_ok());
        assert!(parse_url("postgres://db/x?sslmode=verify-full").is_ok());
        assert!(error("host=db sslrootcert='/ca.pem").contains("unterminated"));
        assert!(error("postgres://db/x?sslrootcert=%FF").contains("UTF-8"));
        assert!(error("host=a,b hostaddr=10.0.0.1").contains("2 hosts and 1 hostaddrs"));
        assert!(error("host=a,b,c port=1,2").contains("2 ports for 3 hosts"));
        assert!(parse_url("host=a,b,c port=1").is_ok());
    }

    #[test]
    fn each_host_is_a_target_with_every_other_setting() {
        let settings = "user=u password=p dbname=d options=-cx application_name=a \
             sslnegotiation=direct connect_timeout=3 tcp_user_timeout=4 keepalives=0 \
             keepalives_idle=9 keepalives_interval=2 keepalives_retries=7 \
             target_session_attrs=read-write channel_binding=require load_balance_hosts=random";
        let config: Config = format!("host=a,/run/pg port=1,2 {settings}")
            .parse()
            .unwrap();
        let hosts = targets(&config);
        assert_eq!(
            hosts,
            [
                Target {
                    host: Host::Tcp("a".into()),
                    hostaddr: None,
                    port: 1
                },
                Target {
                    host: Host::Unix("/run/pg".into()),
                    hostaddr: None,
                    port: 2
                },
            ]
        );
        assert!(!hosts[0].is_unix() && hosts[1].is_unix());
        let alone: Config = format!("host=/run/pg port=2 {settings}").parse().unwrap();
        let one = for_target(&config, &hosts[1]);
        assert_eq!(format!("{one:?}"), format!("{alone:?}"));
        // What the client's Debug leaves out.
        assert_eq!(one.get_password(), Some(&b"p"[..]));
        assert_eq!(one.get_ssl_negotiation(), alone.get_ssl_negotiation());
    }
}
