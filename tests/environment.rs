//! What the test suite could not run here, visible in `cargo test`'s
//! summary.
//!
//! Tests that need a program we did not write (Redis, Python's
//! `websockets`, Node, Chromium, nginx, Django, a Redis Cluster, NATS) print `skipped: ...`
//! and pass when it is missing, and cargo hides the output of passing tests.
//! This binary (`harness = false`) checks each of those programs the way the
//! tests do and reports one line per program in libtest's format: `ok` when
//! present, `ignored, skipped: ...` when absent, so the summary reads
//! `N passed; 0 failed; M ignored` and names what did not run. With the
//! matching `TOWER_CHANNELS_REQUIRE_<X>=1` (as `.ci/run` sets) a missing
//! program is a failure here too.

use std::{
    net::{TcpStream, ToSocketAddrs},
    path::Path,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

struct Check {
    name: &'static str,
    /// The switch that makes a missing program a failure.
    require: &'static str,
    /// The tests that skip without it.
    tests: &'static str,
    probe: fn() -> Result<(), String>,
}

const CHECKS: &[Check] = &[
    Check {
        name: "features",
        require: "TOWER_CHANNELS_REQUIRE_ALL_FEATURES",
        tests: "the tests behind those features",
        probe: features,
    },
    Check {
        name: "redis",
        require: "TOWER_CHANNELS_REQUIRE_REDIS",
        tests: "tests/redis.rs, tests/redis_faults.rs, tests/chat_layers.rs, tests/worker.rs",
        probe: redis,
    },
    Check {
        name: "python_websockets",
        require: "TOWER_CHANNELS_REQUIRE_INTEROP",
        tests: "tests/interop_python.rs",
        probe: python_websockets,
    },
    Check {
        name: "chromium",
        require: "TOWER_CHANNELS_REQUIRE_BROWSER",
        tests: "tests/browser.rs",
        probe: chromium_and_feature,
    },
    Check {
        name: "node",
        require: "TOWER_CHANNELS_REQUIRE_INTEROP",
        tests: "tests/js_client.rs, tests/interop_node.rs",
        probe: node,
    },
    Check {
        name: "nginx",
        require: "TOWER_CHANNELS_REQUIRE_NGINX",
        tests: "tests/browser.rs (through a load balancer)",
        probe: nginx,
    },
    Check {
        name: "django",
        require: "TOWER_CHANNELS_REQUIRE_DJANGO",
        tests: "tests/django.rs",
        probe: django,
    },
    Check {
        name: "redis_cluster",
        require: "TOWER_CHANNELS_REQUIRE_REDIS_CLUSTER",
        tests: "tests/redis_cluster.rs, tests/chat_layers.rs",
        probe: redis_cluster,
    },
    Check {
        name: "nats",
        require: "TOWER_CHANNELS_REQUIRE_NATS",
        tests: "the NATS channel-layer tests",
        probe: nats,
    },
];

fn features() -> Result<(), String> {
    let missing: Vec<&str> = [
        ("redis", cfg!(feature = "redis")),
        ("metrics", cfg!(feature = "metrics")),
        ("example-warp", cfg!(feature = "example-warp")),
        ("test-browser", cfg!(feature = "test-browser")),
        ("example-metrics", cfg!(feature = "example-metrics")),
    ]
    .into_iter()
    .filter_map(|(name, on)| (!on).then_some(name))
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "built without features {missing:?} (cargo test --all-features)"
        ))
    }
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether something accepts TCP connections at the `host:port` of `url`.
fn answers(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
    hostport.to_socket_addrs().is_ok_and(|mut addrs| {
        addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
    })
}

fn redis() -> Result<(), String> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    if answers(&url) || runs("redis-server", &["--version"]) {
        Ok(())
    } else {
        Err(format!(
            "nothing answers at {url} and redis-server is not installed"
        ))
    }
}

fn python_websockets() -> Result<(), String> {
    if runs("python3", &["-c", "import websockets"]) {
        Ok(())
    } else {
        Err("python3 cannot import websockets (pip install websockets)".into())
    }
}

fn chromium() -> Result<(), String> {
    if Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists() {
        Ok(())
    } else {
        Err(
            "no /usr/bin/chromium and /usr/bin/chromedriver (Debian: chromium chromium-driver)"
                .into(),
        )
    }
}

fn chromium_and_feature() -> Result<(), String> {
    chromium()?;
    if cfg!(feature = "test-browser") {
        Ok(())
    } else {
        Err("built without feature test-browser (cargo test --all-features)".into())
    }
}

fn node() -> Result<(), String> {
    if runs("node", &["--version"]) {
        Ok(())
    } else {
        Err("node is not installed (Debian: nodejs)".into())
    }
}

fn nginx() -> Result<(), String> {
    if Path::new("/usr/sbin/nginx").exists() {
        Ok(())
    } else {
        Err("no /usr/sbin/nginx (Debian: nginx)".into())
    }
}

fn django() -> Result<(), String> {
    if runs(
        "python3",
        &["-c", "import django, channels, channels_redis, daphne"],
    ) {
        Ok(())
    } else {
        Err("python3 cannot import django, channels, channels_redis and daphne".into())
    }
}

fn redis_cluster() -> Result<(), String> {
    match std::env::var("REDIS_CLUSTER_URLS") {
        Ok(urls) if urls.split(',').all(answers) => Ok(()),
        Ok(urls) => Err(format!("REDIS_CLUSTER_URLS={urls:?} does not answer")),
        Err(_) if runs("redis-server", &["--version"]) && runs("redis-cli", &["--version"]) => {
            Ok(())
        }
        Err(_) => {
            Err("REDIS_CLUSTER_URLS is not set and redis-server/redis-cli are not installed".into())
        }
    }
}

fn nats() -> Result<(), String> {
    match std::env::var("NATS_URL") {
        Ok(url) if answers(&url) => Ok(()),
        Ok(url) => Err(format!("nothing answers at NATS_URL={url}")),
        Err(_) if runs("nats-server", &["--version"]) => Ok(()),
        Err(_) => Err("NATS_URL is not set and nats-server is not installed".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exact = args.iter().any(|a| a == "--exact");
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let selected: Vec<&Check> = CHECKS
        .iter()
        .filter(|c| {
            filters.is_empty()
                || filters.iter().any(|f| {
                    if exact {
                        c.name == *f
                    } else {
                        c.name.contains(f)
                    }
                })
        })
        .collect();
    if args.iter().any(|a| a == "--list") {
        for c in &selected {
            println!("{}: test", c.name);
        }
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    let mut failures = Vec::new();
    for c in &selected {
        match (c.probe)() {
            Ok(()) => {
                passed += 1;
                println!("test {} ... ok", c.name);
            }
            Err(why) if std::env::var(c.require).as_deref() == Ok("1") => {
                failed += 1;
                println!("test {} ... FAILED", c.name);
                failures.push(format!(
                    "{}: {why} and {}=1 ({})",
                    c.name, c.require, c.tests
                ));
            }
            Err(why) => {
                ignored += 1;
                println!(
                    "test {} ... ignored, skipped: {why}; not run: {} (set {}=1 to fail instead)",
                    c.name, c.tests, c.require
                );
            }
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:");
        for f in &failures {
            println!("    {f}");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed == 0 { "ok" } else { "FAILED" },
        CHECKS.len() - selected.len(),
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
