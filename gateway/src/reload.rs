//! SIGHUP: the configuration file read again, and what can change in a
//! running process applied in place: the public listener's certificate
//! and key (certbot-style renewal) and the log level. What needs a
//! restart (a listener, the backend, the workers…) is logged as such and
//! left as it runs. A file that no longer loads (a bad key, a certificate
//! that does not match it) changes nothing: the gateway keeps serving as
//! it was, and says so. No connection is touched either way. A
//! certificate out of its validity period is served, with a warning, at
//! start and on each reload that reads it.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{Config, Escaped, Plan};
use crate::logging::LogLevel;
use crate::tls::{self, ServerTls};

/// What a reload compares against and acts on.
pub struct Reloader {
    /// The plan in effect: as started, with the reloaded parts updated.
    running: Plan,
    server_tls: Option<&'static ServerTls>,
    log: LogLevel,
}

impl Reloader {
    /// Made once the daemon serves, which is when the certificate it
    /// started with is warned about if it is out of date.
    pub fn new(running: Plan, server_tls: Option<&'static ServerTls>, log: LogLevel) -> Self {
        if server_tls.is_some() {
            warn_if_out_of_date(&running);
        }
        Self {
            running,
            server_tls,
            log,
        }
    }

    /// Reads the configuration file again and applies what it can.
    pub fn reload(&mut self) {
        if self.running.path.as_os_str().is_empty() {
            tracing::warn!(
                "reload: this process was configured on its command line; nothing to read again"
            );
            return;
        }
        let new = match self.running.load_again() {
            Ok(new) => new,
            Err(error) => {
                tracing::error!(
                    "reload failed, nothing changed (the certificate in use stays): {error}"
                );
                return;
            }
        };
        let mut applied = Vec::new();
        if let (Some(tls), Some(certificate)) = (self.server_tls, &new.tls.server) {
            tls.replace_certificate(certificate.clone());
            warn_if_out_of_date(&new);
            let (running, server) = (&mut self.running.config.server, &new.config.server);
            running.tls_cert = server.tls_cert.clone();
            running.tls_key = server.tls_key.clone();
            self.running.tls.server = Some(certificate.clone());
            applied.push("server.tls_cert and server.tls_key (new connections)");
        }
        let level = &new.config.log.level;
        if *level != self.running.config.log.level {
            match self.log.set(level) {
                Ok(()) => {
                    self.running.config.log.level = level.clone();
                    applied.push("log.level");
                }
                Err(why) => tracing::warn!("reload: log.level not applied: {why}"),
            }
        }
        let restart = needs_restart(&self.running, &new);
        if restart.is_empty() {
            tracing::info!(applied = %applied.join(", "), "reloaded");
        } else {
            tracing::warn!(
                applied = %applied.join(", "),
                needs_restart = %restart.join(", "),
                "reloaded; the changes in needs_restart take a restart to apply"
            );
        }
    }
}

/// Warns when the certificate `plan` serves is outside its validity
/// period: rustls serves it without a word, and clients refuse it, so
/// the log is where an operator learns why.
fn warn_if_out_of_date(plan: &Plan) {
    if let Some(warning) = certificate_out_of_date(plan) {
        tracing::warn!("{warning}");
    }
}

/// What to tell an operator when the certificate `plan` serves is
/// outside its validity period: its file and the date passed or to come.
/// `gateway --check` prints it too.
pub fn certificate_out_of_date(plan: &Plan) -> Option<String> {
    let (Some(certificate), Some(file)) = (&plan.tls.server, &plan.config.server.tls_cert) else {
        return None;
    };
    // A clock before 1970 is no clock to judge a certificate by.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    let tls::OutOfDate {
        expired,
        not_before,
        not_after,
    } = tls::out_of_date(certificate, now.as_secs() as i64)?;
    // Relative to the configuration file's folder, as it was read.
    let file = plan.path.parent().unwrap_or(Path::new("")).join(file);
    let file = Escaped(file.display());
    Some(if expired {
        format!(
            "server.tls_cert: the certificate has expired; clients that verify it refuse it (file {file}, not_after {not_after})"
        )
    } else {
        format!(
            "server.tls_cert: the certificate is not valid yet; clients that verify it refuse it until not_before (file {file}, not_before {not_before}, not_after {not_after})"
        )
    })
}

/// The sections (or keys) of `new` that differ from `running` in what a
/// reload does not apply.
fn needs_restart(running: &Plan, new: &Plan) -> Vec<&'static str> {
    let (running, new) = (&running.config, &new.config);
    let without_tls = |c: &Config| {
        let mut server = c.server.clone();
        (server.tls_cert, server.tls_key) = (None, None);
        server
    };
    [
        (
            "server.tls_cert (turning HTTPS on or off)",
            running.server.tls_cert.is_some() != new.server.tls_cert.is_some(),
        ),
        ("server", without_tls(running) != without_tls(new)),
        ("log.access", running.log.access != new.log.access),
        ("runtime", running.runtime != new.runtime),
        ("upstream", running.upstream != new.upstream),
        ("responses", running.responses != new.responses),
        ("admin", running.admin != new.admin),
        ("counter", running.counter != new.counter),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}
