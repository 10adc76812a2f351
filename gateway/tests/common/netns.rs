//! Hosts for the tests: network namespaces (`ip netns`) on one bridge, so
//! that counters on "different hosts" reach a database on a third over a
//! real network stack, and a host can be cut off from another the way a
//! partition does: silently.
//! Needs root and iproute2; where either is missing the tests that need
//! it say so and skip, unless `GATEWAY_REQUIRE` names `netns` (see
//! [`super::require`]): then they fail.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Network {
    bridge: String,
    hosts: Vec<Host>,
}

pub struct Host {
    /// The namespace's name.
    pub name: String,
    pub addr: Ipv4Addr,
    /// The host's end of its link, inside its namespace.
    device: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn skip(why: &str) -> Option<Network> {
    super::require::skip_for_want_of("netns", why);
    None
}

impl Network {
    /// `hosts` namespaces on a bridge of their own, at .2, .3, … of a /24
    /// that the test process (the bridge, at .1) reaches too.
    pub fn create(hosts: usize) -> Option<Self> {
        if !rustix::process::geteuid().is_root() {
            return skip("network namespaces need root");
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Unique among live processes (the pid) and within this one (n);
        // the x keeps pid 12 with n 34 apart from pid 123 with n 4.
        // Interface names stay within 15 bytes.
        let id = format!("{}x{n}", std::process::id());
        let subnet = [10, 200 + (std::process::id() % 50) as u8, (n % 250) as u8];
        let mut network = Self {
            bridge: format!("gwb{id}"),
            hosts: Vec::new(),
        };
        let made = (|| {
            ip(&["link", "add", &network.bridge, "type", "bridge"])?;
            let gateway = format!("{}.{}.{}.1/24", subnet[0], subnet[1], subnet[2]);
            ip(&["addr", "add", &gateway, "dev", &network.bridge])?;
            ip(&["link", "set", &network.bridge, "up"])?;
            for i in 0..hosts {
                let name = format!("gw{id}h{i}");
                let outside = format!("gwv{id}h{i}");
                let addr = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 2 + i as u8);
                ip(&["netns", "add", &name])?;
                network.hosts.push(Host {
                    name: name.clone(),
                    addr,
                    device: "eth0".to_owned(),
                });
                ip(&[
                    "link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", &name,
                ])?;
                ip(&["link", "set", &outside, "master", &network.bridge, "up"])?;
                let inside = |args: &[&str]| {
                    let mut all = vec!["netns", "exec", &name, "ip"];
                    all.extend_from_slice(args);
                    ip(&all)
                };
                inside(&["link", "set", "lo", "up"])?;
                inside(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
                inside(&["link", "set", "eth0", "up"])?;
            }
            Ok::<(), String>(())
        })();
        match made {
            Ok(()) => Some(network),
            Err(why) => {
                drop(network);
                skip(&format!("cannot make network namespaces ({why})"))
            }
        }
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// A command that runs `program` on host `i`.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.hosts[i].name])
            .arg(program);
        command
    }

    /// Host `from` sends nothing to host `to` any more, until
    /// [`Network::heal`]: its frames go to a hardware address no one has,
    /// so they vanish on the bridge and the other end hears nothing (a
    /// partition, not a refusal; iproute2 alone, no packet filter).
    pub fn cut(&self, from: usize, to: usize) {
        let to = self.hosts[to].addr.to_string();
        let host = &self.hosts[from];
        ip(&[
            "-n",
            &host.name,
            "neigh",
            "replace",
            &to,
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            &host.device,
            "nud",
            "permanent",
        ])
        .expect("cut the link");
    }

    /// Undoes [`Network::cut`]: the address is resolved again.
    pub fn heal(&self, from: usize, to: usize) {
        let to = self.hosts[to].addr.to_string();
        let host = &self.hosts[from];
        ip(&["-n", &host.name, "neigh", "del", &to, "dev", &host.device]).expect("heal the link");
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            // Ends what still runs there with the namespace's last user.
            let _ = Command::new("ip")
                .args(["netns", "pids", &host.name])
                .output()
                .map(|out| {
                    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-KILL", pid]).status();
                    }
                });
            let _ = ip(&["netns", "del", &host.name]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
