//! nginx, the outside yardstick: found on the PATH, given a config from
//! `bench/nginx.conf`, and started pinned beside the gateway's CPUs.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{Running, pinned};
use crate::layout::CpuList;
use crate::tls::Certificates;

/// `path` as an nginx quoted string. nginx would take a `$` in
/// `ssl_certificate` for a variable (and then load the file at every
/// handshake), so such a path is refused rather than measured.
fn nginx_string(path: &Path) -> Result<String, String> {
    let text = path
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8, cannot go in nginx.conf", path.display()))?;
    if text.contains('$') || text.chars().any(char::is_control) {
        return Err(format!(
            "{text}: nginx.conf cannot name a path with `$` or control characters in it; \
             choose another --out"
        ));
    }
    Ok(format!(
        "\"{}\"",
        text.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// Whether an `nginx` binary is on the PATH (or at `$NGINX`).
pub fn nginx_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NGINX") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
            .map(|dir| dir.join("nginx"))
            .find(|path| path.is_file())
    })
}

/// nginx with one worker per gateway worker, proxying to the counter with
/// an upstream keep-alive pool: the outside yardstick. With `tls`, it
/// serves HTTPS, TLS 1.3 only, on the gateway's certificate and key; with
/// `http2`, HTTP/2 (h2 by ALPN over TLS, else h2c with prior knowledge).
pub fn start_nginx(
    binary: &Path,
    cpus: &CpuList,
    workers: usize,
    counter: SocketAddr,
    out: &Path,
    tls: Option<&Certificates>,
    http2: bool,
) -> Result<Running, String> {
    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let dir = out.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let template = include_str!("../../nginx.conf");
    let (ssl, tls) = match tls {
        Some(files) => (
            "ssl",
            format!(
                "ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.3;",
                nginx_string(&files.chain)?,
                nginx_string(&files.key)?
            ),
        ),
        None => ("", "# plain HTTP (the bench without --tls)".to_owned()),
    };
    // nginx 1.22's form (`http2` on `listen`); on a listener without
    // `ssl` it takes HTTP/2 with prior knowledge alone, as h2load sends.
    let protocols: String = [ssl, if http2 { "http2" } else { "" }]
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| format!(" {p}"))
        .collect();
    let config = template
        .replace("{{workers}}", &workers.to_string())
        .replace("{{dir}}", &dir.display().to_string())
        .replace("{{listen}}", &format!("127.0.0.1:{port}"))
        .replace("{{protocols}}", &protocols)
        .replace("{{tls}}", &tls)
        .replace("{{counter}}", &counter.to_string());
    let config_path = dir.join("nginx.conf");
    std::fs::write(&config_path, config).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let mut command = pinned(cpus, binary);
    command
        .arg("-c")
        .arg(&config_path)
        .arg("-p")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start nginx: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut running = Running {
        name: "nginx".to_owned(),
        child,
        addr,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        // A config nginx rejects (a certificate it cannot load) ends it at
        // once: say so now rather than after the deadline.
        let exited = matches!(running.child.try_wait(), Ok(Some(_)));
        if exited || Instant::now() > deadline {
            return Err(format!(
                "nginx did not start listening; see {}/error.log",
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(running)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::nginx_string;
    use std::path::Path;

    #[test]
    fn paths_are_quoted_for_nginx() {
        assert_eq!(
            nginx_string(Path::new("/a b/c.pem")).unwrap(),
            r#""/a b/c.pem""#
        );
        assert!(nginx_string(Path::new("/a$b/c.pem")).is_err());
    }
}
