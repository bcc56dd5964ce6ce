//! The JavaScript client (`clients/js/tower-channels.js`) under Node's own
//! test runner, against the real chat example binary: transport choice and
//! fallback, backoff, resume without gap or duplicate, and the POST rules of
//! the HTTP transports (`clients/js/test/*.test.mjs`).
//!
//! The binary's path goes to Node in `TOWER_CHANNELS_CHAT_BIN`; `REDIS_URL`
//! (with the `redis` feature) enables the restart tests. Needs `node`
//! (18 or newer; `.ci/setup.sh` installs it): without it the test prints
//! `skipped: ...` and passes, unless `TOWER_CHANNELS_REQUIRE_INTEROP=1`, as
//! in CI, where it fails. Node 20 gets `--experimental-websocket` (22+ has
//! `WebSocket` anyway).

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use common::{empty, example_binary, get_req, http1, spawn_example};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/test");

/// The whole Node suite starts chat processes and waits on reconnects.
const SUITE_TIMEOUT: Duration = Duration::from_secs(240);

fn node(args: &[&str]) -> bool {
    std::process::Command::new("node")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn js_client_under_node_test_runner_against_the_chat_example() {
    if !node(&["--version"]) {
        if std::env::var("TOWER_CHANNELS_REQUIRE_INTEROP").as_deref() == Ok("1") {
            panic!("node not installed and TOWER_CHANNELS_REQUIRE_INTEROP=1");
        }
        println!("skipped: node not installed");
        return;
    }
    let mut files: Vec<String> = std::fs::read_dir(DIR)
        .expect("clients/js/test")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".test.mjs"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.test.mjs in {DIR}");

    let mut cmd = tokio::process::Command::new("node");
    let has_websocket = node(&[
        "-e",
        "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
    ]);
    if !has_websocket {
        cmd.arg("--experimental-websocket");
    }
    cmd.arg("--test")
        .args(&files)
        .env("TOWER_CHANNELS_CHAT_BIN", example_binary("chat"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // The chat example takes `--redis` only when built with the feature.
    if !cfg!(feature = "redis") {
        cmd.env_remove("REDIS_URL")
            .env_remove("TOWER_CHANNELS_REQUIRE_REDIS");
    }
    let child = cmd.spawn().expect("start node --test");
    let out = tokio::time::timeout(SUITE_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("node --test took more than {SUITE_TIMEOUT:?}"))
        .expect("node --test output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "node --test failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // The runner's summary, visible with `--nocapture`.
    for line in stdout.lines().filter(|l| l.starts_with("# ")) {
        println!("{line}");
    }
}

/// The chat example serves the client the page imports, as JavaScript, the
/// same bytes as the repository's file.
#[tokio::test]
async fn the_chat_example_serves_the_client() {
    let (_server, addr) = spawn_example("chat");
    let reply = http1(addr, empty(get_req(addr, "/tower-channels.js"))).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers["content-type"],
        "text/javascript; charset=utf-8"
    );
    let file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/js/tower-channels.js"
    ))
    .expect("clients/js/tower-channels.js");
    assert!(
        reply.body == file,
        "GET /tower-channels.js differs from clients/js/tower-channels.js (rebuild the example)"
    );
}
