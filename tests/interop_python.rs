//! Interop with a WebSocket client we did not write: the Python `websockets`
//! package talks to the real chat example binary (built by `cargo test`),
//! with permessage-deflate (which `websockets` offers by default) negotiated,
//! messages below and above the compression threshold both ways.
//!
//! Skipped (with a message) when `websockets` is not installed, unless
//! `TOWER_CHANNELS_REQUIRE_INTEROP=1`, as in CI, which makes that a failure.

mod common;

use std::process::Stdio;

use common::*;

fn python_websockets_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import websockets"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn python_websockets_client_talks_to_the_chat_example() {
    if !python_websockets_available() {
        if std::env::var("TOWER_CHANNELS_REQUIRE_INTEROP").as_deref() == Ok("1") {
            panic!("python websockets not installed (pip install websockets) and TOWER_CHANNELS_REQUIRE_INTEROP=1");
        }
        println!("skipped: python websockets not installed (pip install websockets)");
        return;
    }
    let (_server, addr) = spawn_example("chat");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/chat_client.py");
    let child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start python3");
    let out = within("the Python client", child.wait_with_output())
        .await
        .expect("python3 output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("interop ok"),
        "Python client failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    for step in ["chat ok", "echo ok", "bad json ok", "compression ok"] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
}
