//! Which CPUs each process of a benchmark gets.
//!
//! The gateway, the counter and the load generator are pinned to disjoint
//! CPU sets when the host has enough of them, so the load side does not
//! steal the gateway's cores and the number measured is the gateway's, not
//! the load generator's. On a 2-CPU host: the gateway alone on one, the
//! counter and the load generator on the other.

use std::fmt;

use serde::Serialize;

/// A set of CPU indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct CpuList(pub Vec<usize>);

impl CpuList {
    /// Parses `0-3,8,10-11`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut cpus = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || format!("`{part}` is not a CPU number or range (e.g. 0-3,8)");
            match part.split_once('-') {
                Some((from, to)) => {
                    let from: usize = from.trim().parse().map_err(|_| bad())?;
                    let to: usize = to.trim().parse().map_err(|_| bad())?;
                    if from > to {
                        return Err(bad());
                    }
                    cpus.extend(from..=to);
                }
                None => cpus.push(part.parse().map_err(|_| bad())?),
            }
        }
        if cpus.is_empty() {
            return Err(format!("`{text}` names no CPU"));
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(Self(cpus))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for CpuList {
    /// Writes the list in `taskset -c` form, ranges collapsed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

impl From<CpuList> for String {
    fn from(list: CpuList) -> Self {
        list.to_string()
    }
}

/// The CPUs of each process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub gateway: CpuList,
    pub counter: CpuList,
    pub load: CpuList,
}

impl Layout {
    /// The default split of `available` CPUs: a quarter (at least one) for
    /// the gateway, a quarter (at least one) for the counter, the rest for
    /// the load generator. The counter costs about as much CPU per visit
    /// as the server in front of it (on a 16-core host, an eighth for the
    /// counter was saturated first, before the gateway or nginx); the
    /// load generator costs less. With fewer than four CPUs the counter and load
    /// share what the gateway does not have.
    pub fn for_cpus(available: &[usize]) -> Self {
        let n = available.len();
        if n == 1 {
            let all = CpuList(available.to_vec());
            return Self {
                gateway: all.clone(),
                counter: all.clone(),
                load: all,
            };
        }
        if n < 4 {
            let rest = CpuList(available[1..].to_vec());
            return Self {
                gateway: CpuList(vec![available[0]]),
                counter: rest.clone(),
                load: rest,
            };
        }
        let gateway = (n / 4).max(1);
        let counter = (n / 4).max(1);
        Self {
            gateway: CpuList(available[..gateway].to_vec()),
            counter: CpuList(available[gateway..gateway + counter].to_vec()),
            load: CpuList(available[gateway + counter..].to_vec()),
        }
    }

    /// Applies `gateway=0-3 counter=4 load=5-15` (space- or
    /// semicolon-separated; any part may be left out) over `self`.
    pub fn override_with(mut self, spec: &str) -> Result<Self, String> {
        for part in spec.split([' ', ';']).filter(|p| !p.is_empty()) {
            let (name, list) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected NAME=CPUS, e.g. gateway=0-3"))?;
            let list = CpuList::parse(list)?;
            match name {
                "gateway" => self.gateway = list,
                "counter" => self.counter = list,
                "load" => self.load = list,
                _ => return Err(format!("`{name}`: expected gateway, counter or load")),
            }
        }
        Ok(self)
    }

    /// Whether the gateway shares a CPU with the load or the counter.
    pub fn gateway_shares(&self) -> bool {
        self.gateway
            .0
            .iter()
            .any(|c| self.load.0.contains(c) || self.counter.0.contains(c))
    }
}

/// The CPUs this process may run on.
pub fn available_cpus() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    use nix::unistd::Pid;
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// The CPU model, from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_cpus_put_the_gateway_alone() {
        let layout = Layout::for_cpus(&[0, 1]);
        assert_eq!(layout.gateway.to_string(), "0");
        assert_eq!(layout.counter.to_string(), "1");
        assert_eq!(layout.load.to_string(), "1");
    }

    #[test]
    fn sixteen_cpus_are_split_disjointly() {
        let cpus: Vec<usize> = (0..16).collect();
        let layout = Layout::for_cpus(&cpus);
        assert_eq!(layout.gateway.to_string(), "0-3");
        assert_eq!(layout.counter.to_string(), "4-7");
        assert_eq!(layout.load.to_string(), "8-15");
        assert!(!layout.gateway_shares());
    }

    #[test]
    fn cpu_lists_parse_and_print() {
        assert_eq!(
            CpuList::parse("0-3,8, 10-11").unwrap().to_string(),
            "0-3,8,10-11"
        );
        assert!(CpuList::parse("3-1").is_err());
        assert!(CpuList::parse("x").is_err());
        let layout = Layout::for_cpus(&[0, 1])
            .override_with("gateway=0-1 load=1")
            .unwrap();
        assert_eq!(layout.gateway.to_string(), "0-1");
        assert!(layout.gateway_shares());
        assert!(Layout::for_cpus(&[0]).override_with("nginx=1").is_err());
    }
}
