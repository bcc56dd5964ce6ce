//! Shared helpers for the `tower-channels` benchmark binaries: a tiny
//! command-line parser, `/proc` readers (CPU time, RSS, open fds) and
//! percentile statistics.

pub mod fallback;

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::str::FromStr;

/// Error type used by the bench binaries: a plain message.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Result alias for the bench binaries.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Builds an error from anything printable.
pub fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Box::new(Error(msg.into())))
}

/// Spawns `cmd` (its stdout piped, killed on drop) and waits for the
/// `listening on <addr>` line every server here prints when ready; the rest
/// of its stdout is drained in the background. Returns the child, the
/// address and the pid (for `/proc` CPU and RSS).
pub async fn spawn_listening(
    mut cmd: tokio::process::Command,
) -> Result<(tokio::process::Child, std::net::SocketAddr, u32)> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or("the server exited")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        if let Some(a) = line.strip_prefix("listening on ") {
            let addr = a.trim().parse()?;
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok((child, addr, pid));
        }
    }
    err("the server ended before listening")
}

/// Minimal `--key value` / `--key=value` / `--flag` argument parser.
///
/// Every option must be consumed by one of the getters; [`Args::finish`]
/// rejects leftovers, so typos do not silently fall back to defaults.
#[derive(Debug)]
pub struct Args {
    items: Vec<(String, Option<String>)>,
    used: HashSet<usize>,
}

impl Args {
    /// Parses `args` (without the program name). `bool_flags` lists the
    /// options that take no value.
    pub fn parse(args: impl IntoIterator<Item = String>, bool_flags: &[&str]) -> Result<Self> {
        let mut items = Vec::new();
        let mut iter = args.into_iter();
        while let Some(arg) = iter.next() {
            let Some(stripped) = arg.strip_prefix("--") else {
                return err(format!("unexpected argument `{arg}`"));
            };
            if let Some((key, value)) = stripped.split_once('=') {
                items.push((key.to_owned(), Some(value.to_owned())));
            } else if bool_flags.contains(&stripped) {
                items.push((stripped.to_owned(), None));
            } else {
                match iter.next() {
                    Some(value) => items.push((stripped.to_owned(), Some(value))),
                    None => return err(format!("option `--{stripped}` needs a value")),
                }
            }
        }
        Ok(Self {
            items,
            used: HashSet::new(),
        })
    }

    /// True if the boolean flag `--key` was given.
    pub fn flag(&mut self, key: &str) -> bool {
        let mut found = false;
        for (i, (k, v)) in self.items.iter().enumerate() {
            if k == key && v.is_none() {
                self.used.insert(i);
                found = true;
            }
        }
        found
    }

    /// All values given for `--key`, in order.
    pub fn all(&mut self, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (i, (k, v)) in self.items.iter().enumerate() {
            if k == key {
                if let Some(v) = v {
                    self.used.insert(i);
                    out.push(v.clone());
                }
            }
        }
        out
    }

    /// The last value given for `--key`.
    pub fn opt(&mut self, key: &str) -> Option<String> {
        self.all(key).pop()
    }

    /// The value of `--key` parsed as `T`, or `default`.
    pub fn get<T: FromStr>(&mut self, key: &str, default: T) -> Result<T>
    where
        T::Err: fmt::Display,
    {
        match self.opt(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .or_else(|e| err(format!("invalid value `{v}` for --{key}: {e}"))),
        }
    }

    /// The value of `--key` parsed as `T`; an error if missing.
    pub fn required<T: FromStr>(&mut self, key: &str) -> Result<T>
    where
        T::Err: fmt::Display,
    {
        match self.opt(key) {
            None => err(format!("missing required option --{key}")),
            Some(v) => v
                .parse()
                .or_else(|e| err(format!("invalid value `{v}` for --{key}: {e}"))),
        }
    }

    /// Fails if any option was not consumed.
    pub fn finish(self) -> Result<()> {
        let unknown: Vec<String> = self
            .items
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.used.contains(i))
            .map(|(_, (k, _))| format!("--{k}"))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            err(format!(
                "unknown or misused option(s): {}",
                unknown.join(", ")
            ))
        }
    }
}

/// Readers for `/proc/<pid>/…`.
pub mod procfs {
    use super::{err, fs, io, Result};

    /// Kernel clock ticks per second (`getconf CLK_TCK`, 100 if unavailable).
    pub fn clock_ticks_per_sec() -> u64 {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t: &u64| t > 0)
            .unwrap_or(100)
    }

    /// utime + stime of `pid` (all threads), in clock ticks.
    pub fn cpu_ticks(pid: u32) -> Result<u64> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name (field 2) may contain spaces; fields after the
        // last ')' start at field 3 (state). utime = field 14, stime = 15.
        let Some(pos) = stat.rfind(')') else {
            return err(format!("malformed /proc/{pid}/stat"));
        };
        let fields: Vec<&str> = stat[pos + 1..].split_whitespace().collect();
        let (Some(utime), Some(stime)) = (fields.get(11), fields.get(12)) else {
            return err(format!("malformed /proc/{pid}/stat"));
        };
        Ok(utime.parse::<u64>()? + stime.parse::<u64>()?)
    }

    /// Resident set size (`VmRSS`) of `pid` in KiB.
    pub fn rss_kib(pid: u32) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("VmRSS:") {
                let kib = rest.trim().trim_end_matches("kB").trim();
                return Ok(kib.parse()?);
            }
        }
        err(format!("no VmRSS in /proc/{pid}/status"))
    }

    /// Number of open file descriptors of `pid`.
    pub fn fd_count(pid: u32) -> io::Result<usize> {
        Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    }

    /// Soft limit on open files of the current process, if readable.
    pub fn open_files_limit() -> Option<u64> {
        let limits = fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    }

    /// Measures the CPU time (user + system) consumed by a set of
    /// processes between [`CpuMeter::start`] and [`CpuMeter::elapsed_us`].
    #[derive(Debug)]
    pub struct CpuMeter {
        pids: Vec<u32>,
        ticks_per_sec: u64,
        start: u64,
    }

    impl CpuMeter {
        /// Snapshots the current CPU time of `pids`.
        pub fn start(pids: &[u32], ticks_per_sec: u64) -> Result<Self> {
            let start = Self::total(pids)?;
            Ok(Self {
                pids: pids.to_vec(),
                ticks_per_sec,
                start,
            })
        }

        fn total(pids: &[u32]) -> Result<u64> {
            pids.iter().map(|&p| cpu_ticks(p)).sum()
        }

        /// CPU microseconds used by the processes since `start`.
        pub fn elapsed_us(&self) -> Result<u64> {
            let ticks = Self::total(&self.pids)?.saturating_sub(self.start);
            Ok(ticks * 1_000_000 / self.ticks_per_sec)
        }
    }
}

/// Summary of a sample of durations in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median, in microseconds.
    pub p50_us: f64,
    /// 99th percentile, in microseconds.
    pub p99_us: f64,
    /// Maximum, in microseconds.
    pub max_us: f64,
}

impl Summary {
    /// Sorts `samples_ns` and summarises them (nearest-rank percentiles).
    pub fn of(samples_ns: &mut [u64]) -> Self {
        if samples_ns.is_empty() {
            return Self::default();
        }
        samples_ns.sort_unstable();
        let n = samples_ns.len();
        let rank = |q: f64| {
            let idx = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples_ns[idx] as f64 / 1000.0
        };
        Self {
            count: n,
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            max_us: samples_ns[n - 1] as f64 / 1000.0,
        }
    }
}

/// Median of a list of numbers (mean of the two middle ones for even
/// lengths); `None` if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_options_and_flags() {
        let mut a = Args::parse(args("--n 5 --smoke --addr=x --addr y"), &["smoke"]).unwrap();
        assert_eq!(a.get::<u32>("n", 1).unwrap(), 5);
        assert!(a.flag("smoke"));
        assert_eq!(a.all("addr"), vec!["x", "y"]);
        assert_eq!(a.get::<u32>("missing", 7).unwrap(), 7);
        a.finish().unwrap();
    }

    #[test]
    fn rejects_unknown_options() {
        let mut a = Args::parse(args("--n 5 --typo 3"), &[]).unwrap();
        assert_eq!(a.get::<u32>("n", 1).unwrap(), 5);
        assert!(a.finish().is_err());
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        let s = Summary::of(&mut v);
        assert_eq!(s.p50_us, 50.0);
        assert_eq!(s.p99_us, 99.0);
        assert_eq!(s.max_us, 100.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0]), Some(1.5));
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        procfs::cpu_ticks(pid).unwrap();
        assert!(procfs::rss_kib(pid).unwrap() > 0);
        assert!(procfs::fd_count(pid).unwrap() > 0);
    }
}
