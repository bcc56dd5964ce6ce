use std::{sync::Arc, time::Duration};

use crate::engine::Tracker;

/// What a [`ShutdownHandle::shutdown`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Connections that closed cleanly (close 1001 sent, `disconnect` ran).
    pub closed: usize,
    /// Connections still open at the deadline, which were dropped.
    pub aborted: usize,
}

/// Shuts a [`WebSocketLayer`](crate::WebSocketLayer)'s WebSockets down
/// gracefully; get one from
/// [`WebSocketLayer::shutdown_handle`](crate::WebSocketLayer::shutdown_handle).
///
/// [`shutdown`](Self::shutdown):
/// 1. new handshakes get `503 Service Unavailable` (with `Retry-After`);
/// 2. every open connection is sent close **1001** (going away);
/// 3. every consumer's `disconnect` runs and its groups are left;
/// 4. the future resolves when all connections are done, or at the deadline,
///    when the remaining ones are dropped.
///
/// axum's graceful shutdown does not cover upgraded connections (they live
/// outside the HTTP connection), so run both:
///
/// ```no_run
/// # async fn doc(listener: tokio::net::TcpListener, app: axum::Router, channels: tower_channels::WebSocketLayer) {
/// use std::time::Duration;
///
/// let handle = channels.shutdown_handle();
/// axum::serve(listener, app)
///     .with_graceful_shutdown(async move {
///         tokio::signal::ctrl_c().await.ok();
///         handle.shutdown(Duration::from_secs(10)).await;
///     })
///     .await
///     .unwrap();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    pub(crate) tracker: Arc<Tracker>,
}

impl ShutdownHandle {
    /// Whether shutdown has started.
    pub fn is_shutting_down(&self) -> bool {
        self.tracker.is_shutting_down()
    }

    /// Connection tasks still running (handshakes and open connections).
    pub fn connections(&self) -> usize {
        self.tracker.len()
    }

    /// Starts shutdown and waits until every connection is done or `deadline`
    /// passes. Calling it again waits again.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let t = &self.tracker;
        let before = t.len();
        t.start_shutdown();
        if tokio::time::timeout(deadline, t.all_finished())
            .await
            .is_ok()
        {
            return ShutdownReport {
                closed: before,
                aborted: 0,
            };
        }
        let aborted = t.abort_all();
        tracing::warn!(aborted, "shutdown deadline passed; dropping connections");
        ShutdownReport {
            closed: before.saturating_sub(aborted),
            aborted,
        }
    }
}
