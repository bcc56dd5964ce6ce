//! Runs every benchmark against the crate's `chat` example (without and
//! with a Prometheus recorder installed), the axum `baseline` server and,
//! for echo, the `fastws` server (fastwebsockets), alternating the servers
//! round by round, each measurement on a freshly started server, and prints
//! a markdown table of the medians with the ratios and the load average.
//!
//! `--only sse` compares WebSocket subscribers with SSE sessions of the
//! HTTP fallback on the same server; `--only post-rtt --redis URL` measures
//! a message `POST`ed through nginx to a member on another process.
//!
//! Normally started through `bench/run.sh`, which builds everything and
//! raises `ulimit -n` first. See `bench/README.md`.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tower_channels_bench::{err, median, procfs, Args, Result};

const USAGE: &str = "usage: runall [--smoke] [--redis URL] [--rounds N]
              [--only echo,fanout,paced,idle,connections,paced-delay,
                      sse (= sse-fanout,sse-paced,sse-idle),post-rtt]
              [--connections-baseline] [--crate-bin PATH] [--crate-metrics-bin PATH]
              [--baseline-bin PATH] [--fastws-bin PATH] [--loadgen-bin PATH]
              [--paced-rate MSGS_PER_S] [--nginx-bin PATH] [--json-out FILE] [--verbose]";

/// How long a server may take to print its `listening on` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Echo,
    Fanout,
    /// Fan-out at a fixed publish rate, crate vs baseline.
    Paced,
    Idle,
    Connections,
    /// The paced workload on the crate only, without and with a write delay.
    PacedDelay,
    /// The `fanout` workload on the crate, WebSocket subscribers vs SSE
    /// sessions of the HTTP fallback.
    SseFanout,
    /// The `paced` workload, WebSocket vs SSE subscribers.
    SsePaced,
    /// The `idle` workload, WebSocket connections vs SSE sessions.
    SseIdle,
    /// Chat messages `POST`ed through nginx (round-robin) to a member on the
    /// other of two crate processes on Redis.
    PostRtt,
}

impl Mode {
    /// Every mode `--only` accepts.
    const ALL: [Mode; 10] = [
        Mode::Echo,
        Mode::Fanout,
        Mode::Paced,
        Mode::Idle,
        Mode::Connections,
        Mode::PacedDelay,
        Mode::SseFanout,
        Mode::SsePaced,
        Mode::SseIdle,
        Mode::PostRtt,
    ];
    /// What `--only sse` stands for.
    const SSE: [Mode; 3] = [Mode::SseFanout, Mode::SsePaced, Mode::SseIdle];
    /// The modes run without `--only`.
    const DEFAULT: [Mode; 5] = [
        Mode::Echo,
        Mode::Fanout,
        Mode::Paced,
        Mode::Idle,
        Mode::Connections,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Fanout => "fanout",
            Mode::Paced => "paced",
            Mode::Idle => "idle",
            Mode::Connections => "connections",
            Mode::PacedDelay => "paced-delay",
            Mode::SseFanout => "sse-fanout",
            Mode::SsePaced => "sse-paced",
            Mode::SseIdle => "sse-idle",
            Mode::PostRtt => "post-rtt",
        }
    }

    /// Whether the mode has rows in the main table (crate vs baselines).
    fn in_main_table(self) -> bool {
        matches!(
            self,
            Mode::Echo | Mode::Fanout | Mode::Paced | Mode::Idle | Mode::Connections
        )
    }

    /// The `loadgen` mode that measures it.
    fn loadgen_mode(self) -> &'static str {
        match self {
            Mode::Paced | Mode::PacedDelay | Mode::SseFanout | Mode::SsePaced => "fanout",
            Mode::SseIdle => "idle",
            m => m.name(),
        }
    }
}

/// `--write-delay-ms` given to the crate server for the `paced-delay` mode.
const PACED_WRITE_DELAY_MS: &str = "5";

/// Workload sizes.
#[derive(Debug)]
struct Sizes {
    echo_conns: u32,
    echo_size: u32,
    echo_duration: f64,
    echo_warmup: f64,
    fanout_subs: u32,
    fanout_msgs: u32,
    fanout_size: u32,
    paced_subs: u32,
    /// Messages per second.
    paced_rate: u32,
    paced_msgs: u32,
    paced_size: u32,
    idle_conns: u32,
    conn_total: u32,
    conn_procs: u32,
    conn_ips: &'static str,
    /// `post-rtt`: messages and their rate (msgs/s).
    post_msgs: u32,
    post_rate: u32,
}

const FULL: Sizes = Sizes {
    echo_conns: 50,
    echo_size: 64,
    echo_duration: 10.0,
    echo_warmup: 1.0,
    fanout_subs: 1000,
    fanout_msgs: 500,
    fanout_size: 100,
    paced_subs: 1000,
    paced_rate: 500,
    paced_msgs: 5000,
    paced_size: 100,
    idle_conns: 5000,
    conn_total: 19_900,
    conn_procs: 4,
    conn_ips: "127.0.0.2-127.0.0.5",
    post_msgs: 500,
    post_rate: 50,
};

const SMOKE: Sizes = Sizes {
    echo_conns: 5,
    echo_size: 64,
    echo_duration: 1.0,
    echo_warmup: 0.0,
    fanout_subs: 20,
    fanout_msgs: 20,
    fanout_size: 100,
    paced_subs: 20,
    paced_rate: 50,
    paced_msgs: 40,
    paced_size: 100,
    idle_conns: 50,
    conn_total: 200,
    conn_procs: 2,
    conn_ips: "127.0.0.2-127.0.0.3",
    post_msgs: 20,
    post_rate: 20,
};

#[derive(Debug)]
struct Config {
    smoke: bool,
    rounds: u32,
    redis: Option<String>,
    modes: Vec<Mode>,
    connections_baseline: bool,
    crate_bin: PathBuf,
    /// The chat example built with `example-metrics` (a Prometheus recorder
    /// installed); `None` when the file does not exist (column left out).
    crate_metrics_bin: Option<PathBuf>,
    baseline_bin: PathBuf,
    fastws_bin: PathBuf,
    loadgen_bin: PathBuf,
    nginx_bin: PathBuf,
    json_out: Option<PathBuf>,
    verbose: bool,
    sizes: &'static Sizes,
    /// The paced modes' rate (msgs/s) and message count: `--paced-rate`,
    /// the count scaled to keep the same duration.
    paced_rate: u32,
    paced_msgs: u32,
}

/// One measurement.
#[derive(Debug)]
struct Run {
    mode: Mode,
    /// "crate", "crate-metrics", "baseline", "fastws", "crate-redis" or
    /// "crate-delay".
    server: &'static str,
    ok: bool,
    json: Value,
    failure: Option<String>,
}

impl Run {
    fn metric(&self, key: &str) -> Option<f64> {
        self.json.get(key).and_then(Value::as_f64)
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("runall: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<bool> {
    let cfg = parse_config()?;
    for bin in [
        Some(&cfg.crate_bin),
        cfg.crate_metrics_bin.as_ref(),
        Some(&cfg.baseline_bin),
        Some(&cfg.fastws_bin),
        Some(&cfg.loadgen_bin),
    ]
    .into_iter()
    .flatten()
    {
        if !bin.is_file() {
            return err(format!(
                "{} not found (build first, or use bench/run.sh)",
                bin.display()
            ));
        }
    }
    if cfg.modes.contains(&Mode::PostRtt) {
        if cfg.redis.is_none() {
            return err("post-rtt needs --redis URL (two crate processes share a room through it)");
        }
        if !cfg.nginx_bin.is_file() {
            return err(format!(
                "post-rtt needs nginx: {} not found (Debian package nginx, or --nginx-bin)",
                cfg.nginx_bin.display()
            ));
        }
    }
    let needed = u64::from(cfg.sizes.conn_total.max(cfg.sizes.idle_conns)) + 32;
    let limit = procfs::open_files_limit().unwrap_or(0);
    if limit < needed {
        eprintln!(
            "runall: warning: open-file limit is {limit}, the servers need about {needed}; \
             raise it with `ulimit -n` (bench/run.sh does)"
        );
    }

    println!(
        "# tower-channels benchmarks ({}; {} CPUs; {} round(s) per server)",
        if cfg.smoke { "smoke" } else { "full" },
        thread::available_parallelism().map_or(0, |n| n.get()),
        cfg.rounds
    );
    println!("crate server:    {}", cfg.crate_bin.display());
    match &cfg.crate_metrics_bin {
        Some(bin) => println!("crate + metrics: {}", bin.display()),
        None => println!("crate + metrics: not found, column left out"),
    }
    println!("baseline server: {}", cfg.baseline_bin.display());
    println!("fastws server:   {}", cfg.fastws_bin.display());
    let load_start = load_average();
    println!("load average at start: {load_start}");
    println!();

    let started = Instant::now();
    let mut runs = Vec::new();
    let mut loads = Vec::new();
    for &mode in &cfg.modes {
        let mut servers: Vec<&'static str> = vec!["crate", "crate-metrics", "baseline"];
        if mode == Mode::Echo {
            servers.push("fastws");
        }
        if cfg.crate_metrics_bin.is_none() {
            servers.retain(|s| *s != "crate-metrics");
        }
        if mode == Mode::Connections {
            servers.retain(|s| *s == "crate" || (*s == "baseline" && cfg.connections_baseline));
        }
        if mode == Mode::PacedDelay {
            servers = vec!["crate", "crate-delay"];
        }
        if Mode::SSE.contains(&mode) {
            servers = vec!["crate", "crate-sse"];
        }
        if mode == Mode::PostRtt {
            servers = vec!["crate-nginx"];
        }
        loads.push((mode, load_average()));
        for round in 1..=cfg.rounds {
            for &server in &servers {
                let run = measure(&cfg, mode, server, round);
                report(&cfg, &run, round)?;
                runs.push(run);
            }
        }
    }
    if cross_process_fanout(&cfg) {
        for round in 1..=cfg.rounds {
            let run = measure(&cfg, Mode::Fanout, "crate-redis", round);
            report(&cfg, &run, round)?;
            runs.push(run);
        }
    }

    println!();
    print!("{}", table(&cfg, &runs, &load_start));
    println!();
    println!(
        "load average (1/5/15 min) at start: {load_start}; at end: {}",
        load_average()
    );
    for (mode, load) in &loads {
        println!("- {} started at load average {load}", mode.name());
    }
    let failures: Vec<&Run> = runs.iter().filter(|r| !r.ok).collect();
    println!();
    println!(
        "{} run(s) in {:.0} s, {} failed",
        runs.len(),
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    for r in &failures {
        println!(
            "FAILED: {} on {}: {}",
            r.mode.name(),
            r.server,
            r.failure.as_deref().unwrap_or("see output above")
        );
    }
    Ok(failures.is_empty())
}

/// Whether the cross-process fan-out (`crate-redis`) runs: with `--redis`
/// and a mode of the main table (not for `--only sse,post-rtt`, although
/// `post-rtt` needs `--redis` itself).
fn cross_process_fanout(cfg: &Config) -> bool {
    cfg.redis.is_some() && cfg.modes.iter().any(|m| m.in_main_table())
}

fn parse_config() -> Result<Config> {
    let mut args = Args::parse(
        std::env::args().skip(1),
        &["smoke", "connections-baseline", "verbose", "help"],
    )?;
    if args.flag("help") {
        println!("{USAGE}");
        std::process::exit(0);
    }
    let smoke = args.flag("smoke");
    let rounds = args.get("rounds", if smoke { 1 } else { 2 })?;
    let redis = args.opt("redis");
    let modes = match args.opt("only") {
        // The smoke run checks the SSE subscribers too (tiny sizes, cheap).
        None if smoke => Mode::DEFAULT.into_iter().chain(Mode::SSE).collect(),
        None => Mode::DEFAULT.to_vec(),
        Some(list) => {
            let mut modes = Vec::new();
            for m in list.split(',').map(str::trim) {
                if m == "sse" {
                    modes.extend(Mode::SSE);
                    continue;
                }
                match Mode::ALL.into_iter().find(|x| x.name() == m) {
                    Some(mode) => modes.push(mode),
                    None => return err(format!("unknown mode `{m}`\n{USAGE}")),
                }
            }
            modes
        }
    };
    // Binaries default to the directory runall itself was built into.
    let dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = |args: &mut Args, key: &str, default: PathBuf| -> PathBuf {
        args.opt(key).map_or(default, PathBuf::from)
    };
    let explicit_crate = args.opt("crate-bin").map(PathBuf::from);
    // With an explicit --crate-bin, a chat-metrics from an earlier build
    // would not be the same code: only an explicit --crate-metrics-bin counts.
    let crate_metrics_bin = match (args.opt("crate-metrics-bin"), &explicit_crate) {
        (Some(p), _) => Some(PathBuf::from(p)),
        (None, None) => Some(dir.join("chat-metrics")).filter(|p| p.is_file()),
        (None, Some(_)) => None,
    };
    let crate_bin = explicit_crate.unwrap_or_else(|| dir.join("examples").join("chat"));
    let baseline_bin = path(&mut args, "baseline-bin", dir.join("baseline"));
    let fastws_bin = path(&mut args, "fastws-bin", dir.join("fastws"));
    let loadgen_bin = path(&mut args, "loadgen-bin", dir.join("loadgen"));
    let nginx_bin = path(&mut args, "nginx-bin", PathBuf::from("/usr/sbin/nginx"));
    let json_out = args.opt("json-out").map(PathBuf::from);
    let connections_baseline = args.flag("connections-baseline");
    let verbose = args.flag("verbose");
    let sizes = if smoke { &SMOKE } else { &FULL };
    let paced_rate: u32 = args.get("paced-rate", sizes.paced_rate)?;
    let paced_msgs = (u64::from(sizes.paced_msgs) * u64::from(paced_rate)
        / u64::from(sizes.paced_rate))
    .max(1) as u32;
    args.finish()?;
    if paced_rate == 0 {
        return err("--paced-rate must be at least 1");
    }
    if rounds == 0 {
        return err("--rounds must be at least 1");
    }
    Ok(Config {
        smoke,
        rounds,
        redis,
        modes,
        connections_baseline,
        crate_bin,
        crate_metrics_bin,
        baseline_bin,
        fastws_bin,
        loadgen_bin,
        nginx_bin,
        json_out,
        verbose,
        sizes,
        paced_rate,
        paced_msgs,
    })
}

// ---------------------------------------------------------------------------
// Servers

/// A server child process; killed when dropped.
struct Server {
    label: String,
    child: Child,
    addr: String,
    log: Arc<Mutex<VecDeque<String>>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Server {
    /// Starts `bin --addr 127.0.0.1:0 [extra…]` and waits for its
    /// `listening on <addr>` line.
    fn start(label: &str, bin: &Path, extra: &[&str], verbose: bool) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(["--addr", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(collect_output(
                label,
                out,
                Arc::clone(&log),
                Some(tx),
                verbose,
            ));
        }
        if let Some(errout) = child.stderr.take() {
            readers.push(collect_output(
                label,
                errout,
                Arc::clone(&log),
                None,
                verbose,
            ));
        }
        let mut server = Self {
            label: label.to_owned(),
            child,
            addr: String::new(),
            log,
            readers,
        };
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(addr) => {
                server.addr = addr;
                Ok(server)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => err(format!(
                "{label} did not print `listening on <addr>` within {} s{}",
                STARTUP_TIMEOUT.as_secs(),
                server.tail()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Its stdout closed: let it exit and collect all its output.
                let _ = server.child.wait();
                for reader in server.readers.drain(..) {
                    let _ = reader.join();
                }
                err(format!(
                    "{label} exited without printing `listening on <addr>`{}",
                    server.tail()
                ))
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// None if still running, else a description of how it ended.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(format!("{} exited ({status}){}", self.label, self.tail())),
            Err(e) => Some(format!("{}: {e}", self.label)),
        }
    }

    /// The last lines the server printed, for error messages.
    fn tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.is_empty() {
            String::new()
        } else {
            let lines: Vec<&str> = log.iter().map(String::as_str).collect();
            format!("; last output:\n    {}", lines.join("\n    "))
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx in the foreground (`daemon off`) in front of the `post-rtt`
/// processes: round-robin without affinity, WebSocket upgrades mapped,
/// response buffering off (SSE), and an `X-Upstream` response header naming
/// the process that answered (`loadgen post-rtt` reads it). Configured and
/// run from a fresh directory under the system's temporary directory
/// (removed on drop), on a port found free. The same configuration as the
/// nginx test in `tests/browser.rs`, plus that header.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    fn start(bin: &Path, upstreams: &[&str], round: u32) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("runall-nginx-{}-{round}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let d = dir.display();
        let servers: String = upstreams
            .iter()
            .map(|a| format!("        server {a};\n"))
            .collect();
        // As root the workers would switch to `nobody`, who cannot use the
        // temporary directory: keep them as the user running the benchmark.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let user = if root { "user root;" } else { "" };
        let conf = format!(
            r#"{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' close;
    }}
    # Round-robin, no affinity (no ip_hash, no sticky cookie).
    upstream chat {{
{servers}    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://chat;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut nginx = Self { child, port, dir };
        // nginx prints nothing when ready: poll until the port accepts (or
        // nginx exits), up to the servers' startup timeout.
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(e) = nginx.exited() {
                return err(e);
            }
            if Instant::now() > deadline {
                return err(format!(
                    "nginx not listening on {port} after {STARTUP_TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    /// None if still running, else how it ended with its error log.
    fn exited(&mut self) -> Option<String> {
        let status = match self.child.try_wait() {
            Ok(None) => return None,
            Ok(Some(status)) => status.to_string(),
            Err(e) => e.to_string(),
        };
        let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
        Some(format!("nginx exited ({status}); error.log:\n{log}"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Keeps the last lines of a server's output (so its pipe never fills up);
/// sends the address of the first `listening on <addr>` line to `listening`.
fn collect_output(
    label: &str,
    pipe: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<VecDeque<String>>>,
    mut listening: Option<mpsc::Sender<String>>,
    verbose: bool,
) -> thread::JoinHandle<()> {
    let label = label.to_owned();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if verbose {
                eprintln!("  [{label}] {line}");
            }
            if let Some(pos) = line.find("listening on ") {
                if let Some(tx) = listening.take() {
                    let addr = line[pos + "listening on ".len()..].trim();
                    let addr = addr
                        .trim_start_matches("http://")
                        .trim_start_matches("ws://")
                        .trim_end_matches('/');
                    let _ = tx.send(addr.to_owned());
                }
            }
            let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
            if log.len() == 20 {
                log.pop_front();
            }
            log.push_back(line);
        }
    })
}

// ---------------------------------------------------------------------------
// Measurements

fn measure(cfg: &Config, mode: Mode, server: &'static str, round: u32) -> Run {
    let failed = |msg: String| Run {
        mode,
        server,
        ok: false,
        json: Value::Null,
        failure: Some(msg),
    };
    let mut servers = Vec::new();
    let start = |label: &str, bin: &Path, extra: &[&str]| {
        Server::start(&format!("{label}#{round}"), bin, extra, cfg.verbose)
    };
    let started = match server {
        "crate" => start("crate", &cfg.crate_bin, &[]).map(|s| vec![s]),
        "crate-metrics" => match &cfg.crate_metrics_bin {
            Some(bin) => start("crate-metrics", bin, &[]).map(|s| vec![s]),
            None => err("no crate-metrics binary".to_owned()),
        },
        "baseline" => start("baseline", &cfg.baseline_bin, &[]).map(|s| vec![s]),
        "fastws" => start("fastws", &cfg.fastws_bin, &[]).map(|s| vec![s]),
        "crate-sse" => start("crate-sse", &cfg.crate_bin, &[]).map(|s| vec![s]),
        "crate-nginx" => {
            // Both processes sign session tokens with the same secret, so a
            // POST may land on either.
            let url = cfg.redis.as_deref().unwrap_or_default();
            let secret = format!("runall-{}", std::process::id());
            let extra = ["--redis", url, "--http-secret", &secret];
            start("crate-nginx-a", &cfg.crate_bin, &extra)
                .and_then(|a| start("crate-nginx-b", &cfg.crate_bin, &extra).map(|b| vec![a, b]))
        }
        "crate-delay" => start(
            "crate-delay",
            &cfg.crate_bin,
            &["--write-delay-ms", PACED_WRITE_DELAY_MS],
        )
        .map(|s| vec![s]),
        _ => {
            let url = cfg.redis.as_deref().unwrap_or_default();
            start("crate-redis-a", &cfg.crate_bin, &["--redis", url]).and_then(|a| {
                start("crate-redis-b", &cfg.crate_bin, &["--redis", url]).map(|b| vec![a, b])
            })
        }
    };
    match started {
        Ok(s) => servers.extend(s),
        Err(e) => return failed(e.to_string()),
    }
    let nginx = if server == "crate-nginx" {
        let upstreams: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
        match Nginx::start(&cfg.nginx_bin, &upstreams, round) {
            Ok(n) => Some(n),
            Err(e) => return failed(e.to_string()),
        }
    } else {
        None
    };

    let s = cfg.sizes;
    let addr = match &nginx {
        Some(n) => format!("127.0.0.1:{}", n.port),
        None => servers[0].addr.clone(),
    };
    let mut args: Vec<String> = vec![mode.loadgen_mode().into(), "--addr".into(), addr];
    let mut push = |k: &str, v: String| {
        args.push(format!("--{k}"));
        args.push(v);
    };
    match mode {
        Mode::Echo => {
            push("conns", s.echo_conns.to_string());
            push("size", s.echo_size.to_string());
            push("duration", s.echo_duration.to_string());
            push("warmup", s.echo_warmup.to_string());
        }
        Mode::Fanout | Mode::SseFanout => {
            push("subs", s.fanout_subs.to_string());
            push("msgs", s.fanout_msgs.to_string());
            push("size", s.fanout_size.to_string());
            if let Some(b) = servers.get(1) {
                push("addr2", b.addr.clone());
            }
        }
        Mode::Paced | Mode::PacedDelay | Mode::SsePaced => {
            push("subs", s.paced_subs.to_string());
            push("msgs", cfg.paced_msgs.to_string());
            push("size", s.paced_size.to_string());
            push("rate", cfg.paced_rate.to_string());
        }
        Mode::Idle | Mode::SseIdle => push("conns", s.idle_conns.to_string()),
        Mode::PostRtt => {
            push("msgs", s.post_msgs.to_string());
            push("rate", s.post_rate.to_string());
            push("size", s.fanout_size.to_string());
            for srv in &servers {
                push("upstream", srv.addr.clone());
            }
        }
        Mode::Connections => {
            push("conns", s.conn_total.to_string());
            push("procs", s.conn_procs.to_string());
            push("local-ip", s.conn_ips.to_owned());
        }
    }
    if server == "crate-sse" {
        let key = if mode == Mode::SseIdle {
            "transport"
        } else {
            "sub-transport"
        };
        push(key, "sse".to_owned());
    }
    for srv in &servers {
        push("server-pid", srv.pid().to_string());
    }
    if cfg.verbose {
        eprintln!("  $ {} {}", cfg.loadgen_bin.display(), args.join(" "));
    }

    let output = match Command::new(&cfg.loadgen_bin)
        .args(&args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
    {
        Ok(o) => o,
        Err(e) => return failed(format!("cannot run loadgen: {e}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut json = Value::Null;
    for line in stdout.lines() {
        if line.starts_with('{') {
            json = serde_json::from_str(line).unwrap_or(Value::Null);
        } else if !line.trim().is_empty() {
            println!("  {server} #{round}: {line}");
        }
    }
    let mut crashed: Vec<String> = servers.iter_mut().filter_map(Server::exited).collect();
    if let Some(e) = nginx.and_then(|mut n| n.exited()) {
        crashed.push(e);
    }
    let reported_ok = json.get("ok").and_then(Value::as_bool) == Some(true);
    let failure = if !crashed.is_empty() {
        Some(crashed.join("; "))
    } else if json.is_null() {
        Some(format!("loadgen produced no result ({})", output.status))
    } else if !output.status.success() || !reported_ok {
        Some(format!("loadgen reported failure ({})", output.status))
    } else {
        None
    };
    drop(servers);
    Run {
        mode,
        server,
        ok: failure.is_none(),
        json,
        failure,
    }
}

/// Prints one run's JSON line (tagged with server and round) and appends it
/// to `--json-out`.
fn report(cfg: &Config, run: &Run, round: u32) -> Result<()> {
    let mut json = match &run.json {
        Value::Object(m) => Value::Object(m.clone()),
        _ => serde_json::json!({ "mode": run.mode.name(), "ok": false }),
    };
    json["bench"] = Value::from(run.mode.name());
    json["server"] = Value::from(run.server);
    json["round"] = Value::from(round);
    if let Some(f) = &run.failure {
        json["failure"] = Value::from(f.as_str());
        println!("  {} #{round}: FAILED: {f}", run.server);
    }
    println!("{json}");
    if let Some(path) = &cfg.json_out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(file, "{json}")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Table

/// Median of `key` over the successful runs of `mode` on `server`.
fn med(runs: &[Run], mode: Mode, server: &str, key: &str) -> Option<f64> {
    let values: Vec<f64> = runs
        .iter()
        .filter(|r| r.mode == mode && r.server == server && r.ok)
        .filter_map(|r| r.metric(key))
        .collect();
    median(&values)
}

/// Sum of `key` over all runs of `mode` on `server` (for loss counters).
fn total(runs: &[Run], mode: Mode, server: &str, key: &str) -> Option<f64> {
    let values: Vec<f64> = runs
        .iter()
        .filter(|r| r.mode == mode && r.server == server)
        .filter_map(|r| r.metric(key))
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn had_failure(runs: &[Run], mode: Mode, server: &str) -> bool {
    runs.iter()
        .any(|r| r.mode == mode && r.server == server && !r.ok)
}

fn fmt_num(x: Option<f64>) -> String {
    let Some(x) = x else {
        return "—".to_owned();
    };
    if x.abs() >= 1000.0 {
        let s = format!("{:.0}", x.abs());
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if x < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if x.abs() >= 10.0 || x == x.trunc() {
        format!("{x:.1}").trim_end_matches(".0").to_owned()
    } else {
        format!("{x:.2}")
    }
}

fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "—".to_owned(),
    }
}

struct Row {
    label: String,
    key: &'static str,
    better: &'static str,
    /// Sum over runs instead of the median.
    sum: bool,
    /// Divide the value by 1000 (µs -> ms).
    ms: bool,
}

fn row(label: impl Into<String>, key: &'static str, better: &'static str) -> Row {
    Row {
        label: label.into(),
        key,
        better,
        sum: false,
        ms: false,
    }
}

/// The rows of the paced fan-out modes.
fn paced_rows() -> Vec<Row> {
    let ms = |mut r: Row| {
        r.ms = true;
        r
    };
    let mut lost = row("lost (all rounds)", "lost", "0");
    lost.sum = true;
    vec![
        row("deliveries/s", "deliveries_per_s", "higher"),
        row("server CPU µs/delivery", "cpu_us_per_delivery", "lower"),
        ms(row("latency p50 ms", "latency_p50_us", "lower")),
        ms(row("latency p99 ms", "latency_p99_us", "lower")),
        lost,
    ]
}

fn table(cfg: &Config, runs: &[Run], load_start: &str) -> String {
    let s = cfg.sizes;
    let mut out = String::new();
    if cfg.modes.iter().any(|m| m.in_main_table()) {
        let _ = writeln!(
            out,
            "## Results (median of {} round(s); load average at start: {})\n\n\
             tc = tower-channels' chat example, tc+P = the same built with \
             `example-metrics` (a Prometheus recorder installed), axum = the \
             `baseline` server, fws = fastwebsockets on plain hyper (echo only).\n",
            cfg.rounds, load_start
        );
        let _ = writeln!(
            out,
            "| benchmark | metric | better | tc | tc+P | axum | fws | tc / axum | tc+P / axum | \
             tc+P / fws | tc+P / tc |"
        );
        let _ = writeln!(out, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    }

    let echo = format!("echo ({} conns, {} B)", s.echo_conns, s.echo_size);
    let fan = format!(
        "fan-out ({} subs, {} msgs, {} B)",
        s.fanout_subs, s.fanout_msgs, s.fanout_size
    );
    let paced = format!(
        "paced fan-out ({} subs, {} msgs/s × {} msgs, {} B)",
        s.paced_subs, cfg.paced_rate, cfg.paced_msgs, s.paced_size
    );
    let idle = format!("idle ({} conns)", s.idle_conns);
    let conns = format!("connections ({})", s.conn_total);
    let ms = |mut r: Row| {
        r.ms = true;
        r
    };
    let sum = |mut r: Row| {
        r.sum = true;
        r
    };
    let sections: Vec<(Mode, &str, Vec<Row>)> = vec![
        (
            Mode::Echo,
            &echo,
            vec![
                row("msgs/s", "msgs_per_s", "higher"),
                row("server CPU µs/msg", "cpu_us_per_msg", "lower"),
                row("RTT p50 µs", "rtt_p50_us", "lower"),
                row("RTT p99 µs", "rtt_p99_us", "lower"),
            ],
        ),
        (
            Mode::Fanout,
            &fan,
            vec![
                row("deliveries/s", "deliveries_per_s", "higher"),
                row("server CPU µs/delivery", "cpu_us_per_delivery", "lower"),
                ms(row("latency p50 ms", "latency_p50_us", "lower")),
                ms(row("latency p99 ms", "latency_p99_us", "lower")),
                ms(row(
                    "broadcast completion p50 ms",
                    "completion_p50_us",
                    "lower",
                )),
                ms(row(
                    "broadcast completion p99 ms",
                    "completion_p99_us",
                    "lower",
                )),
                ms(row(
                    "broadcast completion max ms",
                    "completion_max_us",
                    "lower",
                )),
                sum(row("lost (all rounds)", "lost", "0")),
            ],
        ),
        (Mode::Paced, &paced, paced_rows()),
        (
            Mode::Idle,
            &idle,
            vec![row("server KiB/conn", "kib_per_conn", "lower")],
        ),
        (
            Mode::Connections,
            &conns,
            vec![
                row("established", "established", "all"),
                row("answered echo", "answered", "all"),
                row("server KiB/conn", "kib_per_conn", "lower"),
                row("seconds to open all", "open_s", "lower"),
                row("server CPU µs/conn", "cpu_us_per_conn", "lower"),
            ],
        ),
    ];
    for (mode, title, rows) in &sections {
        if !cfg.modes.contains(mode) {
            continue;
        }
        for r in rows {
            let value = |server: &str| {
                let v = if r.sum {
                    total(runs, *mode, server, r.key)
                } else {
                    med(runs, *mode, server, r.key)
                };
                v.map(|x| if r.ms { x / 1000.0 } else { x })
            };
            let cell = |server: &str, v: Option<f64>| {
                if had_failure(runs, *mode, server) && !r.sum {
                    format!("{} (FAIL)", fmt_num(v))
                } else {
                    fmt_num(v)
                }
            };
            let (tc, tcp, axum, fws) = (
                value("crate"),
                value("crate-metrics"),
                value("baseline"),
                value("fastws"),
            );
            let ratio = |a, b| {
                if r.sum {
                    "—".to_owned()
                } else {
                    fmt_ratio(a, b)
                }
            };
            let base_cell = if *mode == Mode::Connections && !cfg.connections_baseline {
                "not run".to_owned()
            } else {
                cell("baseline", axum)
            };
            let _ = writeln!(
                out,
                "| {title} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.label,
                r.better,
                cell("crate", tc),
                cell("crate-metrics", tcp),
                base_cell,
                cell("fastws", fws),
                ratio(tc, axum),
                ratio(tcp, axum),
                ratio(tcp, fws),
                ratio(tcp, tc),
            );
        }
    }

    if cfg.modes.contains(&Mode::PacedDelay) {
        if !out.is_empty() {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "## Write delay: {paced}, tower-channels only (median of {} round(s))\n",
            cfg.rounds
        );
        let _ = writeln!(
            out,
            "| metric | better | no write delay | --write-delay-ms {PACED_WRITE_DELAY_MS} | \
             with / without |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|");
        for r in &paced_rows() {
            let mode = Mode::PacedDelay;
            let cell = |server: &str| {
                let v = if r.sum {
                    total(runs, mode, server, r.key)
                } else {
                    med(runs, mode, server, r.key)
                };
                let v = v.map(|x| if r.ms { x / 1000.0 } else { x });
                let fail = if had_failure(runs, mode, server) && !r.sum {
                    " (FAIL)"
                } else {
                    ""
                };
                (v, format!("{}{fail}", fmt_num(v)))
            };
            let ((without, without_cell), (with, with_cell)) = (cell("crate"), cell("crate-delay"));
            let ratio = if r.sum {
                "—".to_owned()
            } else {
                fmt_ratio(with, without)
            };
            let _ = writeln!(
                out,
                "| {} | {} | {without_cell} | {with_cell} | {ratio} |",
                r.label, r.better
            );
        }
    }

    sse_table(cfg, runs, &mut out);
    post_rtt_table(cfg, runs, &mut out);

    if cross_process_fanout(cfg) {
        let _ = writeln!(
            out,
            "\n## Cross-process fan-out through Redis ({} subs split over 2 crate processes, \
             publisher on the first; CPU summed over both)\n",
            s.fanout_subs
        );
        let _ = writeln!(
            out,
            "| metric | better | in-memory (1 process) | Redis (2 processes) | Redis / in-memory |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|");
        let rows = [
            row("deliveries/s", "deliveries_per_s", "higher"),
            row("server CPU µs/delivery", "cpu_us_per_delivery", "lower"),
            ms(row("latency p50 ms", "latency_p50_us", "lower")),
            ms(row("latency p99 ms", "latency_p99_us", "lower")),
            sum(row("lost (all rounds)", "lost", "0")),
        ];
        for r in &rows {
            let value = |server: &str| {
                let v = if r.sum {
                    total(runs, Mode::Fanout, server, r.key)
                } else {
                    med(runs, Mode::Fanout, server, r.key)
                };
                v.map(|x| if r.ms { x / 1000.0 } else { x })
            };
            let (mem, redis) = (value("crate"), value("crate-redis"));
            let fail = if had_failure(runs, Mode::Fanout, "crate-redis") && !r.sum {
                " (FAIL)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {}{fail} | {} |",
                r.label,
                r.better,
                fmt_num(mem),
                fmt_num(redis),
                if r.sum {
                    "—".to_owned()
                } else {
                    fmt_ratio(redis, mem)
                }
            );
        }
    }
    out
}

/// The value of `r` for `mode` on `server` (median, or sum for loss rows).
fn value(runs: &[Run], mode: Mode, server: &str, r: &Row) -> Option<f64> {
    let v = if r.sum {
        total(runs, mode, server, r.key)
    } else {
        med(runs, mode, server, r.key)
    };
    v.map(|x| if r.ms { x / 1000.0 } else { x })
}

/// A cell: the value, marked `(FAIL)` if a round of that server failed.
fn cell(runs: &[Run], mode: Mode, server: &str, r: &Row) -> String {
    let v = fmt_num(value(runs, mode, server, r));
    if had_failure(runs, mode, server) && !r.sum {
        format!("{v} (FAIL)")
    } else {
        v
    }
}

/// The `sse-*` modes: the crate with WebSocket subscribers vs SSE sessions.
fn sse_table(cfg: &Config, runs: &[Run], out: &mut String) {
    let modes: Vec<Mode> = Mode::SSE
        .into_iter()
        .filter(|m| cfg.modes.contains(m))
        .collect();
    if modes.is_empty() {
        return;
    }
    let s = cfg.sizes;
    let _ = writeln!(
        out,
        "\n## SSE sessions vs WebSockets, tower-channels' chat example (median of {} round(s))\n\n\
         Same server binary, same room and publisher (a WebSocket client); the subscribers \
         (or idle connections) are WebSockets or SSE sessions of the HTTP fallback \
         (`?transport=sse`).\n",
        cfg.rounds
    );
    let _ = writeln!(
        out,
        "| benchmark | metric | better | WebSocket | SSE | SSE / WebSocket |"
    );
    let _ = writeln!(out, "|---|---|---|---:|---:|---:|");
    let ms = |mut r: Row| {
        r.ms = true;
        r
    };
    for mode in modes {
        let (title, rows) = match mode {
            Mode::SseFanout => (
                format!(
                    "fan-out ({} subs, {} msgs, {} B)",
                    s.fanout_subs, s.fanout_msgs, s.fanout_size
                ),
                vec![
                    row("deliveries/s", "deliveries_per_s", "higher"),
                    row("server CPU µs/delivery", "cpu_us_per_delivery", "lower"),
                    ms(row("latency p50 ms", "latency_p50_us", "lower")),
                    ms(row("latency p99 ms", "latency_p99_us", "lower")),
                    ms(row(
                        "broadcast completion p99 ms",
                        "completion_p99_us",
                        "lower",
                    )),
                    row("lost (all rounds)", "lost", "0"),
                ],
            ),
            Mode::SsePaced => (
                format!(
                    "paced fan-out ({} subs, {} msgs/s × {} msgs, {} B)",
                    s.paced_subs, cfg.paced_rate, cfg.paced_msgs, s.paced_size
                ),
                paced_rows(),
            ),
            _ => (
                format!("idle ({} conns / sessions)", s.idle_conns),
                vec![row("server KiB/conn", "kib_per_conn", "lower")],
            ),
        };
        for mut r in rows {
            // Losses are summed over the rounds, not a median.
            r.sum |= r.key == "lost";
            let ratio = if r.sum {
                "—".to_owned()
            } else {
                fmt_ratio(
                    value(runs, mode, "crate-sse", &r),
                    value(runs, mode, "crate", &r),
                )
            };
            let _ = writeln!(
                out,
                "| {title} | {} | {} | {} | {} | {ratio} |",
                r.label,
                r.better,
                cell(runs, mode, "crate", &r),
                cell(runs, mode, "crate-sse", &r),
            );
        }
    }
}

/// The `post-rtt` mode.
fn post_rtt_table(cfg: &Config, runs: &[Run], out: &mut String) {
    if !cfg.modes.contains(&Mode::PostRtt) {
        return;
    }
    let s = cfg.sizes;
    let _ = writeln!(
        out,
        "\n## POST through nginx to a member on the other process (median of {} round(s))\n\n\
         Two chat processes on Redis with one `--http-secret`, nginx round-robin in front. \
         The sender's SSE session is opened through nginx; its {} chat messages ({} B) are \
         `POST`ed through nginx at {} msgs/s (each lands on either process); the member is a \
         WebSocket on the process that does not hold the session. Latency = start of the \
         `POST` to the member's receipt.\n",
        cfg.rounds, s.post_msgs, s.fanout_size, s.post_rate
    );
    let _ = writeln!(out, "| metric | better | value |");
    let _ = writeln!(out, "|---|---|---:|");
    let ms = |mut r: Row| {
        r.ms = true;
        r
    };
    let mut lost = row("lost (all rounds)", "lost", "0");
    lost.sum = true;
    let rows = [
        ms(row("POST -> member p50 ms", "latency_p50_us", "lower")),
        ms(row("POST -> member p99 ms", "latency_p99_us", "lower")),
        ms(row(
            "  POST on the session's process: p50 ms",
            "direct_p50_us",
            "lower",
        )),
        ms(row(
            "  POST on the session's process: p99 ms",
            "direct_p99_us",
            "lower",
        )),
        ms(row(
            "  POST forwarded to the session's process: p50 ms",
            "forwarded_p50_us",
            "lower",
        )),
        ms(row(
            "  POST forwarded to the session's process: p99 ms",
            "forwarded_p99_us",
            "lower",
        )),
        row("POSTs forwarded", "forwarded", "—"),
        ms(row(
            "POST -> sender's own SSE copy p50 ms",
            "own_p50_us",
            "lower",
        )),
        ms(row(
            "POST -> sender's own SSE copy p99 ms",
            "own_p99_us",
            "lower",
        )),
        ms(row("POST response p50 ms", "post_p50_us", "lower")),
        ms(row("POST response p99 ms", "post_p99_us", "lower")),
        row(
            "server CPU µs/msg (both processes)",
            "cpu_us_per_msg",
            "lower",
        ),
        lost,
    ];
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            r.label,
            r.better,
            cell(runs, Mode::PostRtt, "crate-nginx", r)
        );
    }
}

/// The 1, 5 and 15 minute load averages, as `uptime` prints them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formatting() {
        assert_eq!(fmt_num(Some(830_402.8)), "830,403");
        assert_eq!(fmt_num(Some(1000.0)), "1,000");
        assert_eq!(fmt_num(Some(12.34)), "12.3");
        assert_eq!(fmt_num(Some(0.0)), "0");
        assert_eq!(fmt_num(Some(1.2345)), "1.23");
        assert_eq!(fmt_num(None), "—");
        assert_eq!(fmt_ratio(Some(1.0), Some(2.0)), "0.50");
    }
}
