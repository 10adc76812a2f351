//! libpq's password file (`~/.pgpass`): the password for a connection
//! whose URL gives none, found as `psql` finds it, so that one file serves
//! the gateway and the operator's own tools alike.
//!
//! Each line is `hostname:port:database:username:password`; the first line
//! whose four fields match the connection gives its password. Unlike libpq,
//! which warns on stderr and carries on without the file, a file that is
//! not a plain file, that its group or others may access, or that cannot
//! be read is an error: a daemon's stderr is seldom read, and a password
//! that is silently not sent reads as a wrong one.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::escaped::Escaped;

/// Socket directories that libpq builds use as their default
/// (`DEFAULT_PGSOCKET_DIR`: Debian's is `/var/run/postgresql`, upstream's
/// `/tmp`): a connection through one of them is to this machine, which the
/// file names `localhost`.
const DEFAULT_SOCKET_DIRECTORIES: [&str; 3] = ["/var/run/postgresql", "/run/postgresql", "/tmp"];

/// Why the password file cannot be used. The messages name the file and
/// never quote its contents, so no password reaches a log.
#[derive(Debug, thiserror::Error)]
pub(super) enum PassfileError {
    /// Opening or reading it failed, other than by its absence.
    #[error(
        "cannot read password file \"{}\": {}",
        Escaped(path.display()),
        Escaped(source)
    )]
    Unreadable { path: PathBuf, source: io::Error },
    /// A directory, a device, a FIFO or a socket.
    #[error("password file \"{}\" is not a plain file", Escaped(path.display()))]
    NotPlainFile { path: PathBuf },
    /// Its group or others have some access to it.
    #[error(
        "password file \"{}\" has group or world access (mode {mode:04o}); permissions should be u=rw (0600) or less",
        Escaped(path.display())
    )]
    Insecure { path: PathBuf, mode: u32 },
    /// Not UTF-8 text, from this line (counted from 1) on.
    #[error(
        "password file \"{}\" is not UTF-8 text (line {line})",
        Escaped(path.display())
    )]
    NotUtf8 { path: PathBuf, line: usize },
}

/// The password file to read, as libpq picks it: the URL's `passfile=`,
/// else `PGPASSFILE`, else `.pgpass` in the home directory. An empty value
/// counts as none given; `None` when no home is known either.
pub(super) fn locate(
    url_passfile: Option<&str>,
    env_pgpassfile: Option<OsString>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    url_passfile
        .filter(|passfile| !passfile.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env_pgpassfile
                .filter(|passfile| !passfile.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            home.filter(|home| !home.as_os_str().is_empty())
                .map(|home| home.join(".pgpass"))
        })
}

/// [`locate`] with `PGPASSFILE` and `HOME` taken from this process's
/// environment.
pub(super) fn locate_from_environment(url_passfile: Option<&str>) -> Option<PathBuf> {
    locate(
        url_passfile,
        std::env::var_os("PGPASSFILE"),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// The password that the file at `path` gives a connection, from its first
/// matching line: the text after the line's fourth unescaped `:`, up to the
/// next unescaped `:` or the end of the line, with its escapes undone.
///
/// `host` is what the connection goes to: a host name or IP address, or a
/// Unix socket directory (an absolute path). An empty host, or a default
/// socket directory (`/var/run/postgresql`, `/run/postgresql`, `/tmp`), is
/// looked up as `localhost`; any other directory as written. `database` is
/// the one asked for (the user's name when the URL names none, as the
/// server takes it).
///
/// `Ok(None)` when the file does not exist, when no line matches, when
/// `database` or `user` is empty (as libpq, which never looks those up),
/// and when the matching line's password is empty: libpq takes an empty
/// password for none, and does not go on to later lines.
pub(super) fn lookup(
    path: &Path,
    host: &str,
    port: u16,
    database: &str,
    user: &str,
) -> Result<Option<String>, PassfileError> {
    if database.is_empty() || user.is_empty() {
        return Ok(None);
    }
    let Some(contents) = read_private_file(path)? else {
        return Ok(None);
    };
    let host = if host.is_empty() || DEFAULT_SOCKET_DIRECTORIES.contains(&host) {
        "localhost"
    } else {
        host
    };
    let port = port.to_string();
    let password = find_password(&contents, [host, &port, database, user]);
    Ok(password.filter(|password| !password.is_empty()))
}

/// The file's text, or `None` when it does not exist. It is checked through
/// the handle that is read, so that it cannot be swapped in between.
fn read_private_file(path: &Path) -> Result<Option<String>, PassfileError> {
    let unreadable = |source| PassfileError::Unreadable {
        path: path.to_owned(),
        source,
    };
    // Non-blocking, so that a FIFO put there cannot hold the connection
    // forever before it is refused; it changes nothing for a plain file.
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let mut file = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(descriptor) => File::from(descriptor),
        Err(errno) if errno == rustix::io::Errno::NOENT => return Ok(None),
        Err(errno) => return Err(unreadable(errno.into())),
    };
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(PassfileError::NotPlainFile {
            path: path.to_owned(),
        });
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PassfileError::Insecure {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(unreadable)?;
    match String::from_utf8(bytes) {
        Ok(contents) => Ok(Some(contents)),
        Err(error) => {
            let valid = &error.as_bytes()[..error.utf8_error().valid_up_to()];
            let line = valid.iter().filter(|&&byte| byte == b'\n').count() + 1;
            Err(PassfileError::NotUtf8 {
                path: path.to_owned(),
                line,
            })
        }
    }
}

/// The password of the first line whose host, port, database and user
/// fields match `wanted`, as written in the file (unescaped).
fn find_password(contents: &str, wanted: [&str; 4]) -> Option<String> {
    contents
        .split('\n')
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .find_map(|line| password_if_matching(line, wanted))
}

/// The line's password when its first four fields match `wanted`; `None`
/// when one does not, or when the line has fewer than five fields.
fn password_if_matching(line: &str, wanted: [&str; 4]) -> Option<String> {
    let mut rest = line;
    for value in wanted {
        let (field, after) = split_field(rest);
        if !field.matches(value) {
            return None;
        }
        rest = after?;
    }
    // As libpq, the password ends at an unescaped `:`, if there is one.
    Some(split_field(rest).0.text)
}

/// One field of a line.
struct Field<'a> {
    /// As written, escapes included.
    written: &'a str,
    /// With each `\` taken away and the character after it kept as it is.
    text: String,
}

impl Field<'_> {
    /// Whether the field matches `value`: a bare `*` matches anything (`\*`
    /// is a star), any other field its text only.
    fn matches(&self, value: &str) -> bool {
        self.written == "*" || self.text == value
    }
}

/// The line's first field, and the rest of the line after the unescaped
/// `:` that ends it (`None` when the line ends first).
fn split_field(line: &str) -> (Field<'_>, Option<&str>) {
    let mut text = String::new();
    let mut chars = line.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            // A `\` at the very end escapes nothing, and stays, as in libpq.
            '\\' => text.push(chars.next().map_or('\\', |(_, escaped)| escaped)),
            ':' => {
                let field = Field {
                    written: &line[..at],
                    text,
                };
                return (field, Some(&line[at + 1..]));
            }
            _ => text.push(c),
        }
    }
    (
        Field {
            written: line,
            text,
        },
        None,
    )
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write as _;

    use super::*;

    /// A password file holding `contents`, with permissions `mode`.
    fn passfile(contents: &[u8], mode: u32) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(contents).unwrap();
        fs::set_permissions(file.path(), fs::Permissions::from_mode(mode)).unwrap();
        file
    }

    /// The password a private file holding `contents` gives the connection.
    fn password(
        contents: &str,
        host: &str,
        port: u16,
        database: &str,
        user: &str,
    ) -> Option<String> {
        let file = passfile(contents.as_bytes(), 0o600);
        lookup(file.path(), host, port, database, user).unwrap()
    }

    fn some(password: &str) -> Option<String> {
        Some(password.to_owned())
    }

    #[test]
    fn a_bare_star_matches_anything_and_an_escaped_one_only_a_star() {
        let file = "db.example:5432:visits:gateway:exact\n\
                    *:6543:*:*:any-database-any-user\n\
                    \\*:*:*:*:star-host\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            password(file, "db.example", 5432, "visits", "gateway"),
            some("exact")
        );
        assert_eq!(
            password(file, "db.example", 5432, "other", "gateway"),
            some("fallback")
        );
        assert_eq!(
            password(file, "elsewhere", 6543, "x", "y"),
            some("any-database-any-user")
        );
        assert_eq!(password(file, "*", 1, "x", "y"), some("star-host"));
        assert_eq!(password("**:*:*:*:p\n", "db", 1, "x", "y"), None);
        assert_eq!(password("*x:*:*:*:p\n", "db", 1, "x", "y"), None);
    }

    #[test]
    fn a_backslash_escapes_a_colon_or_a_backslash_in_any_field() {
        let file = "fe80\\:\\:1:5432:visits:do\\\\main:pa\\:ss\\\\word\n";
        assert_eq!(
            password(file, "fe80::1", 5432, "visits", "do\\main"),
            some("pa:ss\\word")
        );
        assert_eq!(password(file, "fe80", 5432, "visits", "do\\main"), None);
        assert_eq!(
            password("h:1:d:u:tail\\\n", "h", 1, "d", "u"),
            some("tail\\")
        );
    }

    #[test]
    fn the_password_ends_at_an_unescaped_colon() {
        assert_eq!(
            password("h:1:d:u:pass:extra\n", "h", 1, "d", "u"),
            some("pass")
        );
    }

    #[test]
    fn the_first_matching_line_wins() {
        let file = "h:1:d:u:first\nh:1:d:u:second\n*:*:*:*:wildcard\n";
        assert_eq!(password(file, "h", 1, "d", "u"), some("first"));
        let file = "*:*:*:*:wildcard\nh:1:d:u:specific\n";
        assert_eq!(password(file, "h", 1, "d", "u"), some("wildcard"));
    }

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let file = "# hostname:port:database:username:password\n\
                    #h:1:d:u:commented\n\
                    \n\
                    h:1:d:u:real\n";
        assert_eq!(password(file, "#h", 1, "d", "u"), None);
        assert_eq!(password(file, "h", 1, "d", "u"), some("real"));
    }

    #[test]
    fn crlf_line_ends_are_not_part_of_the_password() {
        let file = "# written on Windows\r\nh:1:d:u:secret\r\nh:2:d:u:last\r";
        assert_eq!(password(file, "h", 1, "d", "u"), some("secret"));
        assert_eq!(password(file, "h", 2, "d", "u"), some("last"));
    }

    #[test]
    fn lines_with_fewer_than_five_fields_are_skipped() {
        let file = "h:1:d\nh:1:d:u\nh:1:d:u:complete\n";
        assert_eq!(password(file, "h", 1, "d", "u"), some("complete"));
        assert_eq!(password("h:1:d:u\n", "h", 1, "d", "u"), None);
    }

    #[test]
    fn an_empty_password_is_none_and_ends_the_search() {
        assert_eq!(
            password("h:1:d:u:\nh:1:d:u:later\n", "h", 1, "d", "u"),
            None
        );
    }

    #[test]
    fn ports_and_names_must_match_exactly() {
        let file = "h:5432:d:u:p\n";
        assert_eq!(password(file, "h", 5432, "d", "u"), some("p"));
        assert_eq!(password(file, "h", 5433, "d", "u"), None);
        assert_eq!(password("h:05432:d:u:p\n", "h", 5432, "d", "u"), None);
        assert_eq!(password(file, "H", 5432, "d", "u"), None);
        assert_eq!(password(file, "h", 5432, "db", "u"), None);
        assert_eq!(password(file, "h", 5432, "d", "user"), None);
    }

    #[test]
    fn no_lookup_without_a_database_or_user() {
        let file = "*:*:*:*:p\n";
        assert_eq!(password(file, "h", 1, "d", "u"), some("p"));
        assert_eq!(password(file, "h", 1, "", "u"), None);
        assert_eq!(password(file, "h", 1, "d", ""), None);
    }

    #[test]
    fn default_socket_directories_are_localhost_and_others_only_themselves() {
        let file = "localhost:5432:d:u:local\n/srv/pg:5432:d:u:srv\n";
        for host in [
            "",
            "/var/run/postgresql",
            "/run/postgresql",
            "/tmp",
            "localhost",
        ] {
            assert_eq!(
                password(file, host, 5432, "d", "u"),
                some("local"),
                "{host:?}"
            );
        }
        assert_eq!(password(file, "/srv/pg", 5432, "d", "u"), some("srv"));
        assert_eq!(password(file, "/srv/other", 5432, "d", "u"), None);
        assert_eq!(password(file, "/run/postgresql/", 5432, "d", "u"), None);
        assert_eq!(password("/tmp:5432:d:u:p\n", "/tmp", 5432, "d", "u"), None);
    }

    #[test]
    fn a_missing_file_gives_no_password() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join(".pgpass");
        assert_eq!(lookup(&path, "h", 1, "d", "u").unwrap(), None);
    }

    #[test]
    fn a_file_others_may_access_is_refused_with_its_mode() {
        for (mode, shown) in [(0o644, "0644"), (0o620, "0620"), (0o601, "0601")] {
            let file = passfile(b"*:*:*:*:secret\n", mode);
            let error = lookup(file.path(), "h", 1, "d", "u").unwrap_err();
            assert!(matches!(error, PassfileError::Insecure { .. }), "{error:?}");
            let message = error.to_string();
            assert!(message.contains(shown), "{message}");
            assert!(
                message.contains(&file.path().display().to_string()),
                "{message}"
            );
            assert!(
                message.contains("permissions should be u=rw (0600) or less"),
                "{message}"
            );
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn a_file_only_its_owner_may_read_is_used() {
        for mode in [0o600, 0o400] {
            let file = passfile(b"*:*:*:*:secret\n", mode);
            assert_eq!(
                lookup(file.path(), "h", 1, "d", "u").unwrap(),
                some("secret")
            );
        }
    }

    #[test]
    fn a_directory_is_refused() {
        let folder = tempfile::tempdir().unwrap();
        fs::set_permissions(folder.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let error = lookup(folder.path(), "h", 1, "d", "u").unwrap_err();
        assert!(
            matches!(error, PassfileError::NotPlainFile { .. }),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .contains(&folder.path().display().to_string())
        );
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("fifo");
        let fifo = rustix::fs::FileType::Fifo;
        rustix::fs::mknodat(rustix::fs::CWD, &path, fifo, Mode::from(0o600), 0).unwrap();
        let (answer, answered) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            answer.send(lookup(&path, "h", 1, "d", "u").map_err(|e| e.to_string()))
        });
        let refusal = answered.recv_timeout(std::time::Duration::from_secs(10));
        assert!(refusal.unwrap().unwrap_err().contains("not a plain file"));
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_without_quoting_it() {
        let file = passfile(b"# first\nh:1:d:u:secret\xff\n", 0o600);
        let error = lookup(file.path(), "h", 1, "d", "u").unwrap_err();
        assert!(
            matches!(error, PassfileError::NotUtf8 { line: 2, .. }),
            "{error:?}"
        );
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn the_url_comes_first_then_pgpassfile_then_the_home_directory() {
        let env = || Some(OsString::from("/env/pgpass"));
        let home = || Some(PathBuf::from("/home/gateway"));
        assert_eq!(
            locate(Some("/url/pgpass"), env(), home()),
            Some(PathBuf::from("/url/pgpass"))
        );
        assert_eq!(
            locate(None, env(), home()),
            Some(PathBuf::from("/env/pgpass"))
        );
        assert_eq!(
            locate(Some(""), env(), home()),
            Some(PathBuf::from("/env/pgpass"))
        );
        assert_eq!(
            locate(None, None, home()),
            Some(PathBuf::from("/home/gateway/.pgpass"))
        );
        assert_eq!(
            locate(Some(""), Some(OsString::new()), home()),
            Some(PathBuf::from("/home/gateway/.pgpass"))
        );
        assert_eq!(locate(None, None, None), None);
        assert_eq!(locate(None, None, Some(PathBuf::new())), None);
    }
}
