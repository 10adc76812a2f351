//! Errors in a configuration file, told on one line with the file, line,
//! column and key: [`ConfigError`], the [`Escaped`] text it shows, and
//! finding the line and column of a key in the file's text.

use std::path::PathBuf;

pub use crate::escaped::Escaped;

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

/// 1-based line and column of a byte offset.
pub(super) fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The span of the value at a dotted key path (`server.listen`), or of the
/// nearest table on that path that the file has.
pub(super) fn span_of(source: &str, key: &str) -> Option<std::ops::Range<usize>> {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
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
}
