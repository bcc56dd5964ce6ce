//! Interop with Node's `ws` client (which we did not write), with
//! permessage-deflate (`perMessageDeflate`) negotiated, against the real chat
//! example binary: echo and group messages below and above the compression
//! threshold, text and binary, both ways.
//!
//! Needs `node` and `ws` installed in `tests/interop/node` (`npm ci` there;
//! `.ci/setup.sh` does it). Skipped (with a message) otherwise, unless
//! `TOWER_CHANNELS_REQUIRE_INTEROP=1`, as in CI, which makes that a failure.

mod common;

use std::{path::Path, process::Stdio};

use common::*;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/node");

fn node_ws_available() -> Result<(), &'static str> {
    let node = std::process::Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node {
        return Err("node not installed");
    }
    if !Path::new(DIR).join("node_modules/ws/package.json").exists() {
        return Err("ws not installed (cd tests/interop/node && npm ci)");
    }
    Ok(())
}

#[tokio::test]
async fn node_ws_client_with_permessage_deflate_talks_to_the_chat_example() {
    if let Err(why) = node_ws_available() {
        if std::env::var("TOWER_CHANNELS_REQUIRE_INTEROP").as_deref() == Ok("1") {
            panic!("{why} and TOWER_CHANNELS_REQUIRE_INTEROP=1");
        }
        println!("skipped: {why}");
        return;
    }
    let (_server, addr) = spawn_example("chat");
    let child = tokio::process::Command::new("node")
        .arg(Path::new(DIR).join("chat_client.mjs"))
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let out = within("the Node client", child.wait_with_output())
        .await
        .expect("node output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("interop ok"),
        "Node client failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    for step in ["echo ok", "chat ok"] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
}
