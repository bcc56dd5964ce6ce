//! End to end in a real browser: the chat example's page in headless
//! Chromium, driven through chromedriver with the `fantoccini` WebDriver
//! client.
//!
//! Three browsers open the page: two join room A, one joins room B. A message
//! typed on the first page (sent with the Send button) and one typed on the
//! second (sent with Enter) reach both room A pages and never room B's, and a
//! sentinel sent in room B reaches only room B.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/setup.sh` installs
//! them). Without them the test prints `skipped: ...` and passes, unless
//! `TOWER_CHANNELS_REQUIRE_BROWSER=1`, as in CI, where it fails.
//!
//! Every wait is bounded; nothing sleeps to synchronize (polls only).
#![cfg(feature = "test-browser")] // fantoccini is an optional dependency (build time)

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use fantoccini::{key::Key, Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const SKIPPED: &str = "skipped: no chromium (install Debian packages chromium and chromium-driver)";

/// How long one wait (a process starting, a page element reaching a state)
/// may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long the whole browser scenario may take.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);
/// Between two reads of a page element while waiting for it to change.
const POLL: Duration = Duration::from_millis(50);

type Result<T, E = String> = std::result::Result<T, E>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_in_headless_chromium() {
    if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
        if std::env::var("TOWER_CHANNELS_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("{SKIPPED}");
        }
        println!("{SKIPPED}");
        return;
    }
    let started = Instant::now();

    // Declared before the processes so that they are removed after the
    // browsers are gone (locals drop in reverse order).
    let profiles: Vec<TempDir> = (0..3).map(TempDir::new).collect();
    let chat = Chat::start();
    let driver = Driver::start();

    let mut sessions = Vec::new();
    let result = tokio::time::timeout(
        SCENARIO_TIMEOUT,
        scenario(chat.addr, driver.port, &profiles, &mut sessions),
    )
    .await
    .unwrap_or_else(|_| Err(format!("the scenario took more than {SCENARIO_TIMEOUT:?}")));

    // Close the sessions on every path: chromedriver then quits its browsers.
    for session in sessions {
        let _ = tokio::time::timeout(TIMEOUT, session.close()).await;
    }
    if let Err(e) = result {
        panic!(
            "{e}\n--- chat example output (last lines) ---\n{}\n--- chromedriver output (last lines) ---\n{}",
            chat.process.output(),
            driver.process.output(),
        );
    }
    println!("browser test passed in {:?}", started.elapsed());
}

/// The scenario. Every session it opens is pushed to `sessions`, which the
/// caller closes whatever happens here.
async fn scenario(
    addr: SocketAddr,
    port: u16,
    profiles: &[TempDir],
    sessions: &mut Vec<Client>,
) -> Result<()> {
    let webdriver = format!("http://127.0.0.1:{port}");
    let (a, b, c) = tokio::join!(
        new_session(&webdriver, &profiles[0]),
        new_session(&webdriver, &profiles[1]),
        new_session(&webdriver, &profiles[2]),
    );
    // Keep whichever sessions opened, so that they are closed even if another
    // one failed.
    sessions.extend([&a, &b, &c].into_iter().flatten().cloned());
    let (a1, a2, b1) = (a?, b?, c?);

    let pid = std::process::id();
    let room_a = format!("e2e{pid}");
    let room_b = format!("e2e{pid}other");
    let url = format!("http://{addr}/");
    let (r1, r2, r3) = tokio::join!(
        join_room(&a1, &url, &room_a),
        join_room(&a2, &url, &room_a),
        join_room(&b1, &url, &room_b),
    );
    r1.map_err(|e| format!("page 1: {e}"))?;
    r2.map_err(|e| format!("page 2: {e}"))?;
    r3.map_err(|e| format!("page 3: {e}"))?;

    // Every page negotiated permessage-deflate with the server.
    for (page, name) in [(&a1, "page 1"), (&a2, "page 2"), (&b1, "page 3")] {
        let ext = page
            .execute("return socket.extensions;", vec![])
            .await
            .map_err(|e| format!("{name}: reading socket.extensions: {e}"))?;
        let ext = ext.as_str().unwrap_or_default();
        if !ext.starts_with("permessage-deflate") {
            return Err(format!(
                "{name}: socket.extensions is {ext:?}, expected permessage-deflate"
            ));
        }
    }

    // Page 1 types a message and clicks Send: both room A pages show it.
    // It is longer than the 256-byte compression threshold, so the server
    // sends it compressed (and Chromium compresses what it sends anyway).
    let first = format!("hello from page 1 ({pid}) {}", "la".repeat(150));
    type_message(&a1, &first).await?;
    click(&a1, "send").await?;
    wait_for_log(&a1, "page 1", &first).await?;
    wait_for_log(&a2, "page 2", &first).await?;

    // Page 3, in room B, sends a sentinel and waits for its own echo: its
    // socket is live and delivers, and the first message (fanned out before
    // the sentinel was even sent) did not reach it.
    let sentinel = format!("sentinel in room B ({pid})");
    type_message(&b1, &sentinel).await?;
    click(&b1, "send").await?;
    wait_for_log(&b1, "page 3", &sentinel).await?;

    // Page 2 answers with Enter in the message input: both room A pages show
    // it, after the first message and without the room B sentinel.
    let second = format!("reply from page 2 ({pid})");
    type_message(&a2, &format!("{second}{}", char::from(Key::Enter))).await?;
    wait_for_log(&a1, "page 1", &second).await?;
    wait_for_log(&a2, "page 2", &second).await?;

    let expected_a = format!("{first}\n{second}\n");
    let expected_b = format!("{sentinel}\n");
    for (page, name, expected) in [
        (&a1, "page 1 (room A)", &expected_a),
        (&a2, "page 2 (room A)", &expected_a),
        (&b1, "page 3 (room B)", &expected_b),
    ] {
        let log = prop(page, "log", "value").await?;
        if &log != expected {
            return Err(format!(
                "{name}: #log is {log:?}, expected exactly {expected:?}"
            ));
        }
    }
    // The inputs were cleared after sending.
    for (page, name) in [(&a1, "page 1"), (&a2, "page 2"), (&b1, "page 3")] {
        let value = prop(page, "message", "value").await?;
        if !value.is_empty() {
            return Err(format!(
                "{name}: #message not cleared after sending: {value:?}"
            ));
        }
    }
    Ok(())
}

/// A WebDriver session on a fresh headless Chromium with its own profile.
async fn new_session(webdriver: &str, profile: &TempDir) -> Result<Client> {
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                format!("--user-data-dir={}", profile.0.display()),
            ],
        },
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!("capabilities are an object")
    };
    let mut builder = ClientBuilder::new(HttpConnector::new());
    builder.capabilities(caps);
    tokio::time::timeout(TIMEOUT * 2, builder.connect(webdriver))
        .await
        .map_err(|_| format!("no WebDriver session from {webdriver} in {:?}", TIMEOUT * 2))?
        .map_err(|e| format!("WebDriver session from {webdriver}: {e}"))
}

/// Opens the chat page, enters `room`, clicks Join and waits until the page
/// says it is connected.
async fn join_room(page: &Client, url: &str, room: &str) -> Result<()> {
    page.goto(url)
        .await
        .map_err(|e| format!("opening {url}: {e}"))?;
    let input = find(page, "room").await?;
    input
        .clear()
        .await
        .map_err(|e| format!("clearing #room: {e}"))?;
    input
        .send_keys(room)
        .await
        .map_err(|e| format!("typing in #room: {e}"))?;
    click(page, "join").await?;
    let connected = format!("connected to {room}");
    wait_for(
        page,
        "status",
        "textContent",
        &format!("#status = {connected:?}"),
        |s| s == connected,
    )
    .await
    .map(drop)
}

async fn type_message(page: &Client, text: &str) -> Result<()> {
    find(page, "message")
        .await?
        .send_keys(text)
        .await
        .map_err(|e| format!("typing in #message: {e}"))
}

async fn click(page: &Client, id: &str) -> Result<()> {
    find(page, id)
        .await?
        .click()
        .await
        .map_err(|e| format!("clicking #{id}: {e}"))
}

async fn find(page: &Client, id: &str) -> Result<fantoccini::elements::Element> {
    page.find(Locator::Id(id))
        .await
        .map_err(|e| format!("finding #{id}: {e}"))
}

/// An element's DOM property (`value` for inputs and the textarea).
async fn prop(page: &Client, id: &str, name: &str) -> Result<String> {
    Ok(find(page, id)
        .await?
        .prop(name)
        .await
        .map_err(|e| format!("reading #{id}.{name}: {e}"))?
        .unwrap_or_default())
}

/// Waits until `#log` has `line` as one of its lines.
async fn wait_for_log(page: &Client, name: &str, line: &str) -> Result<()> {
    wait_for(
        page,
        "log",
        "value",
        &format!("{name}: #log has line {line:?}"),
        |log| log.lines().any(|l| l == line),
    )
    .await
    .map(drop)
}

/// Polls `#id.prop` until `ready` holds, for at most [`TIMEOUT`].
async fn wait_for(
    page: &Client,
    id: &str,
    prop_name: &str,
    what: &str,
    ready: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let value = prop(page, id, prop_name).await?;
        if ready(&value) {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {TIMEOUT:?} waiting for {what}; #{id}.{prop_name} is {value:?}"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The chat example, started with `--addr 127.0.0.1:0`.
struct Chat {
    process: Process,
    addr: SocketAddr,
}

impl Chat {
    fn start() -> Self {
        let mut command = Command::new(example_binary("chat"));
        command.args(["--addr", "127.0.0.1:0"]);
        let (process, line) = Process::start("chat example", command, |line| {
            line.strip_prefix("listening on ").map(str::to_owned)
        });
        let addr = line
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("chat example printed a bad address {line:?}: {e}"));
        Chat { process, addr }
    }
}

/// `target/<profile>/examples/<name>`, built by `cargo test` (the test binary
/// is `target/<profile>/deps/browser-<hash>`).
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo test` (which builds the examples), or `cargo build --examples` first",
        path.display()
    );
    path
}

/// chromedriver on a port of its choosing (`--port=0`), read from its
/// "started successfully on port N." line.
struct Driver {
    process: Process,
    port: u16,
}

impl Driver {
    fn start() -> Self {
        let mut command = Command::new(CHROMEDRIVER);
        command.arg("--port=0");
        let (process, port) = Process::start("chromedriver", command, |line| {
            let (_, rest) = line.split_once("started successfully on port ")?;
            Some(rest.trim_end_matches(['.', ' ', '\r']).to_owned())
        });
        let port = port
            .parse()
            .unwrap_or_else(|e| panic!("chromedriver printed a bad port {port:?}: {e}"));
        Driver { process, port }
    }
}

/// A child process in a process group of its own, killed with everything it
/// started (the browsers under chromedriver) when dropped. Its stdout and
/// stderr are drained by threads that keep the last lines for diagnostics.
struct Process {
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Process {
    /// Starts `command` and waits until a line of its stdout gives
    /// `ready(line)`, which is returned.
    fn start(
        name: &str,
        command: Command,
        ready: impl Fn(&str) -> Option<String>,
    ) -> (Self, String) {
        let (process, rx) = Process::spawn(name, command);

        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(found) = ready(&line) {
                        return (process, found);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{name} not ready in {TIMEOUT:?}:\n{}", process.output())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "{name} closed its stdout before it was ready:\n{}",
                        process.output()
                    )
                }
            }
        }
    }

    /// Starts `command`; its stdout lines go to the receiver.
    fn spawn(name: &str, mut command: Command) -> (Self, mpsc::Receiver<String>) {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {name}: {e}"));
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        drain(stdout, Arc::clone(&tail), Some(tx));
        drain(stderr, Arc::clone(&tail), None);
        (Process { child, tail }, rx)
    }

    /// The last lines it printed.
    fn output(&self) -> String {
        let tail = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // The whole group: chromedriver's browsers are in it too.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `from` to its end on a thread, keeping the last lines in `tail` and
/// sending each line to `lines` while someone listens.
fn drain(
    from: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    lines: Option<mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = &lines {
                let _ = tx.send(line.clone());
            }
            let mut tail = tail
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if tail.len() == 40 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    });
}

/// A fresh browser profile directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(n: usize) -> Self {
        let path =
            std::env::temp_dir().join(format!("tower-channels-browser-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ------------------------------------------- reconnection with recovery

/// The chat page reconnects on its own when the server drops its socket,
/// and resumes from the last message it showed: messages sent while it was
/// disconnected appear once, in order, before the live ones.
///
/// The page talks to chat process A; messages are posted through process B
/// (both on Redis). A is killed (its socket drops without a close), three
/// messages are posted while it is down, then A starts again on the same
/// port. Needs Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`) as
/// well as Chromium; without Redis it prints `skipped: ...` unless
/// `TOWER_CHANNELS_REQUIRE_REDIS=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_reconnects_and_recovers_missed_messages() {
    reconnect_test("/", 10).await;
}

/// The same with `WebSocket` undefined: the page is on SSE, and its
/// `EventSource` is reopened by the client with `?offset=&epoch=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_without_websocket_reconnects_and_recovers_missed_messages() {
    reconnect_test("/?nows=1", 11).await;
}

/// The reconnect scenario for the page at `path` (with its own profile `n`).
async fn reconnect_test(path: &str, n: usize) {
    if !chromium_or_skip() {
        return;
    }
    let Some(redis) = redis_or_skip().await else {
        return;
    };
    let profiles = [TempDir::new(n)];
    // A listens on a port we choose so that it can come back on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr_a = format!("127.0.0.1:{port}");
    let a = chat_with(&["--addr", &addr_a, "--redis", &redis]);
    let b = chat_with(&["--addr", "127.0.0.1:0", "--redis", &redis]);
    let driver = Driver::start();

    let mut sessions = Vec::new();
    let result = tokio::time::timeout(
        SCENARIO_TIMEOUT,
        reconnect_scenario(
            a,
            path,
            &redis,
            b.addr,
            driver.port,
            &profiles,
            &mut sessions,
        ),
    )
    .await
    .unwrap_or_else(|_| Err(format!("the scenario took more than {SCENARIO_TIMEOUT:?}")));
    for session in sessions {
        let _ = tokio::time::timeout(TIMEOUT, session.close()).await;
    }
    if let Err(e) = result {
        panic!(
            "{e}\n--- chat example B output (last lines) ---\n{}\n--- chromedriver output (last lines) ---\n{}",
            b.process.output(),
            driver.process.output(),
        );
    }
}

async fn reconnect_scenario(
    a: Chat,
    path: &str,
    redis: &str,
    addr_b: SocketAddr,
    port: u16,
    profiles: &[TempDir],
    sessions: &mut Vec<Client>,
) -> Result<()> {
    let page = new_session(&format!("http://127.0.0.1:{port}"), &profiles[0]).await?;
    sessions.push(page.clone());
    // One room per scenario (A's port is this scenario's): the WebSocket
    // and the SSE variants run at the same time in this process, on the
    // same Redis, and must not see each other's messages.
    let room = format!("reconnect{}x{}", std::process::id(), a.addr.port());
    let addr_a = &a.addr.to_string();
    join_room(&page, &format!("http://{addr_a}{path}"), &room).await?;

    let m1 = "before the drop";
    post(addr_b, &room, m1).await?;
    wait_for_log(&page, "page", m1).await?;

    // The server goes away: the socket drops without a close frame.
    drop(a);
    let missed = ["missed 1", "missed 2", "missed 3"];
    for m in missed {
        post(addr_b, &room, m).await?;
    }
    wait_for(
        &page,
        "status",
        "textContent",
        "#status to show the page is reconnecting",
        |s| s.starts_with("reconnecting") || s == "connecting",
    )
    .await?;

    // The server is back: the page reconnects with its last offset.
    let a = chat_with(&["--addr", addr_a, "--redis", redis]);
    let connected = format!("connected to {room}");
    wait_for(&page, "status", "textContent", "#status reconnected", |s| {
        s == connected
    })
    .await
    .map_err(|e| format!("{e}\n--- chat example A output ---\n{}", a.process.output()))?;
    wait_for_log(&page, "page", missed[2]).await?;
    let live = "after the reconnect";
    post(addr_b, &room, live).await?;
    wait_for_log(&page, "page", live).await?;

    let log = prop(&page, "log", "value").await?;
    let expected = format!("{m1}\n{}\n{live}\n", missed.join("\n"));
    if log != expected {
        return Err(format!(
            "#log is {log:?}, expected exactly {expected:?} (no gap, no duplicate)"
        ));
    }
    Ok(())
}

/// The chat example with `args` (which must include `--addr`).
fn chat_with(args: &[&str]) -> Chat {
    let mut command = Command::new(example_binary("chat"));
    command.args(args);
    let (process, line) = Process::start("chat example", command, |line| {
        line.strip_prefix("listening on ").map(str::to_owned)
    });
    let addr = line
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("chat example printed a bad address {line:?}: {e}"));
    Chat { process, addr }
}

/// `POST /rooms/{room}/messages` with `text`: the chat example's HTTP
/// handler sends it to the room through the channel layer.
async fn post(addr: SocketAddr, room: &str, text: &str) -> Result<()> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let req = http::Request::post(format!("http://{addr}/rooms/{room}/messages"))
        .body(Full::new(bytes::Bytes::from(text.to_owned())))
        .map_err(|e| format!("building the POST: {e}"))?;
    let res = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .map_err(|_| format!("POST to {addr} timed out"))?
        .map_err(|e| format!("POST to {addr}: {e}"))?;
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the POST reply: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("POST {text:?}: {status} {body:?}"));
    }
    Ok(())
}

// ------------------------------------------- HTTP fallback and the JS client

/// The redis URL from `REDIS_URL` (default `redis://127.0.0.1:6379`) if
/// something answers there; else `None` after printing `skipped: ...`, or a
/// panic under `TOWER_CHANNELS_REQUIRE_REDIS=1`.
async fn redis_or_skip() -> Option<String> {
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let hostport = redis
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:6379")
        .to_owned();
    match tokio::net::TcpStream::connect(&hostport).await {
        Ok(_) => Some(redis),
        Err(e) if std::env::var("TOWER_CHANNELS_REQUIRE_REDIS").as_deref() == Ok("1") => {
            panic!("no Redis at {redis}: {e} (TOWER_CHANNELS_REQUIRE_REDIS=1)")
        }
        Err(e) => {
            println!("skipped: no Redis ({redis}: {e})");
            None
        }
    }
}

fn chromium_or_skip() -> bool {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return true;
    }
    if std::env::var("TOWER_CHANNELS_REQUIRE_BROWSER").as_deref() == Ok("1") {
        panic!("{SKIPPED}");
    }
    println!("{SKIPPED}");
    false
}

/// The chat page in three browsers, in one room: on WebSocket (`/`), with
/// `WebSocket` deleted before the client loads (`/?nows=1`: the client falls
/// back to SSE) and long-polling (`/?nows=1&transports=poll`). Each page
/// sends messages through the page's own input and Send button; every page
/// shows every message once, each sender's in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_without_websocket_chat_with_a_websocket_page() {
    if !chromium_or_skip() {
        return;
    }
    let profiles: Vec<TempDir> = (20..23).map(TempDir::new).collect();
    let chat = Chat::start();
    let driver = Driver::start();
    let mut sessions = Vec::new();
    let result = tokio::time::timeout(
        SCENARIO_TIMEOUT,
        fallback_scenario(
            &format!("http://{}", chat.addr),
            driver.port,
            &profiles,
            &mut sessions,
        ),
    )
    .await
    .unwrap_or_else(|_| Err(format!("the scenario took more than {SCENARIO_TIMEOUT:?}")));
    for session in sessions {
        let _ = tokio::time::timeout(TIMEOUT, session.close()).await;
    }
    if let Err(e) = result {
        panic!(
            "{e}\n--- chat example output (last lines) ---\n{}\n--- chromedriver output (last lines) ---\n{}",
            chat.process.output(),
            driver.process.output(),
        );
    }
}

/// The same three pages through nginx (Debian's package, run by the test
/// from a temporary directory on a free port) in front of two chat processes
/// on Redis, round-robin without affinity: a page's POSTs and polls land on
/// either process. Needs nginx (`.ci/setup.sh` installs it) and Redis as
/// well as Chromium; without nginx it prints `skipped: ...` unless
/// `TOWER_CHANNELS_REQUIRE_NGINX=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_pages_through_nginx_round_robin_over_two_processes() {
    if !chromium_or_skip() {
        return;
    }
    if !Path::new(NGINX).exists() {
        let why = format!("skipped: no {NGINX} (Debian package nginx)");
        if std::env::var("TOWER_CHANNELS_REQUIRE_NGINX").as_deref() == Ok("1") {
            panic!("{why} and TOWER_CHANNELS_REQUIRE_NGINX=1");
        }
        println!("{why}");
        return;
    }
    let Some(redis) = redis_or_skip().await else {
        return;
    };
    let profiles: Vec<TempDir> = (30..33).map(TempDir::new).collect();
    // Both processes sign session tokens with the same secret: a POST or a
    // poll that lands on the process not holding its session is checked
    // there, then handed over through Redis.
    let secret = format!("nginx-test-{}", std::process::id());
    let args = [
        "--addr",
        "127.0.0.1:0",
        "--redis",
        &redis,
        "--http-secret",
        &secret,
    ];
    let a = chat_with(&args);
    let b = chat_with(&args);
    let nginx = Nginx::start(&[a.addr, b.addr]);
    let driver = Driver::start();
    let mut sessions = Vec::new();
    let result = tokio::time::timeout(
        SCENARIO_TIMEOUT,
        fallback_scenario(
            &format!("http://127.0.0.1:{}", nginx.port),
            driver.port,
            &profiles,
            &mut sessions,
        ),
    )
    .await
    .unwrap_or_else(|_| Err(format!("the scenario took more than {SCENARIO_TIMEOUT:?}")))
    .and_then(|()| nginx.session_requests_reached(&[a.addr, b.addr]));
    for session in sessions {
        let _ = tokio::time::timeout(TIMEOUT, session.close()).await;
    }
    if let Err(e) = result {
        panic!(
            "{e}\n--- chat A (last lines) ---\n{}\n--- chat B (last lines) ---\n{}\n--- nginx output ---\n{}\n--- nginx error.log ---\n{}",
            a.process.output(),
            b.process.output(),
            nginx.process.output(),
            nginx.error_log(),
        );
    }
}

/// How many messages each page sends.
const PER_PAGE: usize = 8;

async fn fallback_scenario(
    base: &str,
    port: u16,
    profiles: &[TempDir],
    sessions: &mut Vec<Client>,
) -> Result<()> {
    let webdriver = format!("http://127.0.0.1:{port}");
    let (a, b, c) = tokio::join!(
        new_session(&webdriver, &profiles[0]),
        new_session(&webdriver, &profiles[1]),
        new_session(&webdriver, &profiles[2]),
    );
    sessions.extend([&a, &b, &c].into_iter().flatten().cloned());
    let pages = [
        (a?, "websocket", format!("{base}/")),
        (b?, "sse", format!("{base}/?nows=1")),
        (c?, "poll", format!("{base}/?nows=1&transports=poll")),
    ];
    let room = format!("fallback{}", std::process::id());
    let (r1, r2, r3) = tokio::join!(
        join_room(&pages[0].0, &pages[0].2, &room),
        join_room(&pages[1].0, &pages[1].2, &room),
        join_room(&pages[2].0, &pages[2].2, &room),
    );
    r1.map_err(|e| format!("websocket page: {e}"))?;
    r2.map_err(|e| format!("page without WebSocket: {e}"))?;
    r3.map_err(|e| format!("long-polling page: {e}"))?;
    for (page, transport, _) in &pages {
        let shown = prop(page, "transport", "textContent").await?;
        if shown != *transport {
            return Err(format!("the {transport} page is on {shown:?}"));
        }
    }

    // Rounds of one message per page, typed into #message and sent with the
    // Send button (a script does both: far faster than key events).
    let mut sent: Vec<Vec<String>> = vec![Vec::new(); pages.len()];
    for i in 0..PER_PAGE {
        for (n, (page, transport, _)) in pages.iter().enumerate() {
            let text = format!("{transport} {i}");
            let cleared = page
                .execute(
                    "const m = document.getElementById('message'); m.value = arguments[0];
                     document.getElementById('send').click(); return m.value === '';",
                    vec![json!(text)],
                )
                .await
                .map_err(|e| format!("{transport} page: sending {text:?}: {e}"))?;
            if cleared != json!(true) {
                return Err(format!(
                    "{transport} page did not send {text:?} (not open?)"
                ));
            }
            sent[n].push(text);
        }
    }
    let total = PER_PAGE * pages.len();
    for (page, transport, _) in &pages {
        let log = wait_for(
            page,
            "log",
            "value",
            &format!("{transport} page: {total} lines in #log"),
            |log| log.lines().count() >= total,
        )
        .await?;
        let lines: Vec<&str> = log.lines().collect();
        if lines.len() != total {
            return Err(format!(
                "{transport} page: {} lines, expected {total}:\n{log}",
                lines.len()
            ));
        }
        for (from, expected) in pages.iter().map(|p| p.1).zip(&sent) {
            let got: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.split(' ').next() == Some(from))
                .collect();
            if got != *expected {
                return Err(format!(
                    "{transport} page: the {from} page's messages are {got:?}, expected {expected:?} (in order, once each)"
                ));
            }
        }
    }
    Ok(())
}

const NGINX: &str = "/usr/sbin/nginx";

/// nginx in the foreground (`daemon off`), configured and run from a
/// temporary directory (pid, logs, temp paths), listening on a port found
/// free, proxying round-robin to `upstreams` with WebSocket upgrades mapped
/// and response buffering off (SSE and streaming).
struct Nginx {
    process: Process,
    port: u16,
    dir: TempDir,
}

impl Nginx {
    fn start(upstreams: &[SocketAddr]) -> Self {
        let dir = TempDir::new(40);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let d = dir.0.display();
        let servers: String = upstreams
            .iter()
            .map(|a| format!("        server {a};\n"))
            .collect();
        // As root the workers would switch to `nobody`, who cannot use the
        // temporary directory: keep them as the user running the test.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let user = if root { "user root;" } else { "" };
        let conf = format!(
            r#"{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 512; }}
http {{
    log_format upstream '$request_method $request_uri $upstream_addr $status';
    access_log {d}/access.log upstream;
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
        }}
    }}
}}
"#
        );
        let conf_path = dir.0.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("writing nginx.conf");
        let mut command = Command::new(NGINX);
        command
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .args(["-g", "daemon off;"]);
        let (mut process, _stdout) = Process::spawn("nginx", command);
        // nginx prints nothing when ready: wait until the port accepts.
        let deadline = Instant::now() + TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "nginx exited ({status}):\n{}\n{}",
                    process.output(),
                    std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx not listening on {port} after {TIMEOUT:?}"
            );
            std::thread::sleep(POLL);
        }
        Nginx { process, port, dir }
    }

    /// Checks in the access log that requests to sessions (POSTs and polls,
    /// which carry `session=`) reached every upstream.
    fn session_requests_reached(&self, upstreams: &[SocketAddr]) -> Result<()> {
        let log = std::fs::read_to_string(self.dir.0.join("access.log"))
            .map_err(|e| format!("reading nginx's access.log: {e}"))?;
        let session_lines: Vec<&str> = log.lines().filter(|l| l.contains("session=")).collect();
        for upstream in upstreams {
            let addr = upstream.to_string();
            if !session_lines
                .iter()
                .any(|l| l.split(' ').nth(2) == Some(&addr))
            {
                return Err(format!(
                    "no session request reached {addr}:\n{}",
                    session_lines.join("\n")
                ));
            }
        }
        let posts = session_lines
            .iter()
            .filter(|l| l.starts_with("POST "))
            .count();
        println!(
            "{posts} POSTs and {} polls/DELETEs through nginx, on both processes",
            session_lines.len() - posts
        );
        Ok(())
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }
}
