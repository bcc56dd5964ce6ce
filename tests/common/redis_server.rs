//! A `redis-server` a test starts on a free port, and may stop, restart,
//! pause (`SIGSTOP`) and resume (`SIGCONT`).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A `redis-server` this test started; killed when dropped.
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// With persistence: the directory of its append-only file.
    dir: Option<PathBuf>,
}

impl RedisServer {
    /// Whether `redis-server` can be run.
    pub(crate) fn available() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts a server on a free port and waits until it answers `PING`.
    pub(crate) async fn start() -> Self {
        let mut server = RedisServer {
            child: None,
            port: super::layers::free_port(),
            dir: None,
        };
        server.restart().await;
        server
    }

    /// Starts a server that writes every command to an append-only file
    /// before answering (`appendfsync always`), so a restart after
    /// [`kill`](Self::kill) keeps every write it acknowledged.
    pub(crate) async fn start_persistent() -> Self {
        let port = super::layers::free_port();
        let dir = std::env::temp_dir().join(format!(
            "tower-channels-redis-{}-{port}",
            super::layers::unique_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("create the Redis data directory");
        let mut server = RedisServer {
            child: None,
            port,
            dir: Some(dir),
        };
        server.restart().await;
        server
    }

    /// `redis://127.0.0.1:{port}`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (after [`kill`](Self::kill)) on the same port.
    pub(crate) async fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""]);
        match &self.dir {
            Some(dir) => command
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(dir),
            None => command.args(["--appendonly", "no"]),
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        // Wait for the process to accept connections (start-up, not event
        // synchronization).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers(&self.url()).await {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills the server and waits for it to exit.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`) to the server process.
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A stopped process cannot act on SIGKILL's cleanup until resumed.
            self.signal("CONT");
        }
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Whether a Redis server answers `PING` at `url` within a second.
pub(crate) async fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Ok(_))
    )
}
