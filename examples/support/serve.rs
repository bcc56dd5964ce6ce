//! The accept loop the examples share: hyper-util's auto builder (HTTP/1.1
//! with upgrades, HTTP/2 with extended CONNECT) with the limits a host on a
//! public address needs. Included by `examples/hyper.rs`, `examples/warp.rs`
//! and `examples/chat/main.rs` (`#[path]`), not an example of its own.
//!
//! What it bounds, per connection, before and between requests:
//!
//! * **silent TCP connections** and HTTP/2 connections that send the preface
//!   and SETTINGS and then nothing: a connection with no request in flight
//!   for [`Limits::idle_timeout`] is shut down gracefully (hyper-util's
//!   `graceful_shutdown`: a connection still waiting for its first bytes is
//!   dropped, an idle HTTP/1.1 keep-alive connection is closed, an HTTP/2
//!   one gets GOAWAY and ends once its open streams, WebSockets included,
//!   have ended);
//! * **half-sent HTTP/1.1 requests**: hyper's `header_read_timeout`
//!   ([`Limits::header_read_timeout`]), which needs a timer;
//! * **dead HTTP/2 peers**: a PING every [`Limits::keep_alive`], the
//!   connection closed when it is not answered within as long (an upgraded
//!   HTTP/1.1 WebSocket has the engine's own pings and idle timeout);
//! * **stalled HTTP/2 streams**: h2 buffers at most
//!   [`H2_MAX_SEND_BUF`] per stream for a client that grants no window.
//!
//! Accept errors (`EMFILE` when the process is out of descriptors,
//! `ECONNABORTED`, ...) are logged and retried after a pause that doubles
//! from 5 ms up to 1 s, never fatal, and never a busy loop.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
};
use tokio::{net::TcpListener, sync::watch, time::Instant};
use tower::ServiceExt;
use tower_channels::{channel_layer::BoxError, PeerAddr};

/// h2's per-stream send buffer (hyper's default is 400 KiB): what a stream
/// whose client grants no flow-control window can hold in h2.
pub(crate) const H2_MAX_SEND_BUF: usize = 64 * 1024;

/// Per-connection time limits (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// HTTP/1.1 request headers must be complete within this.
    pub(crate) header_read_timeout: Duration,
    /// A connection with no request in flight for this long is shut down.
    pub(crate) idle_timeout: Duration,
    /// HTTP/2 PING interval, and how long an answer may take.
    pub(crate) keep_alive: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            keep_alive: Duration::from_secs(20),
        }
    }
}

impl Limits {
    /// The command-line flags of these limits, for usage messages.
    pub(crate) const USAGE: &'static str =
        "[--header-read-timeout SECS] [--idle-timeout SECS] [--keep-alive SECS]";

    /// Takes `arg` (and its value from `it`) when it is one of [`USAGE`](Self::USAGE)'s
    /// flags; `Ok(false)` when it is not.
    pub(crate) fn parse_flag(
        &mut self,
        arg: &str,
        it: &mut impl Iterator<Item = String>,
    ) -> Result<bool, String> {
        let slot = match arg {
            "--header-read-timeout" => &mut self.header_read_timeout,
            "--idle-timeout" => &mut self.idle_timeout,
            "--keep-alive" => &mut self.keep_alive,
            _ => return Ok(false),
        };
        let v = it.next().ok_or_else(|| format!("{arg} needs seconds"))?;
        *slot = v
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("bad {arg} {v:?}"))?;
        Ok(true)
    }
}

/// Serves `service` on `listener` until `shutdown` resolves; then stops
/// accepting, shuts every connection down gracefully and waits for them, at
/// most 10 s. Each request carries the client's address as [`PeerAddr`].
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Every connection task holds a receiver; `closed()` tells when all ended.
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut pause = ACCEPT_PAUSE_MIN;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                pause = ACCEPT_PAUSE_MIN;
                a
            }
            Err(e) => {
                // E.g. too many open files: the connection waits in the
                // backlog; pause so the others can finish and free some.
                tracing::warn!(error = %e, pause_ms = pause.as_millis(), "accept failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = &mut shutdown => break,
                }
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            service.clone(),
            limits,
            stopping.clone(),
        ));
    }
    drop(listener);
    let _ = stop.send(true);
    drop(stopping);
    if tokio::time::timeout(Duration::from_secs(10), stop.closed())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after 10 s; exiting");
    }
}

const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(5);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Requests in flight on one connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    /// When the connection becomes idle-expired, if nothing is in flight.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.last.lock().unwrap_or_else(|e| e.into_inner()) + idle)
    }
}

/// Marks a request done (the response future ended or was dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves once `serve` asks the connections to stop.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

async fn connection<S, B>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    service: S,
    limits: Limits,
    mut stopping: watch::Receiver<bool>,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last: Mutex::new(Instant::now()),
    });
    // hyper's `Service` takes `&self`; each request gets a clone of the tower
    // service, with the client's address as an extension.
    let hyper_service = hyper::service::service_fn({
        let activity = activity.clone();
        move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            activity.in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(activity.clone());
            let response = service.clone().oneshot(req);
            async move {
                let response = response.await;
                drop(guard);
                response
            }
        }
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .keep_alive_interval(limits.keep_alive)
        .keep_alive_timeout(limits.keep_alive)
        .max_send_buf_size(H2_MAX_SEND_BUF);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), hyper_service);
    tokio::pin!(conn);
    let idle = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(idle);
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            () = &mut idle => {
                match activity.idle_deadline(limits.idle_timeout) {
                    Some(at) if at <= Instant::now() => {
                        tracing::debug!(%peer, "idle connection; shutting it down");
                        conn.as_mut().graceful_shutdown();
                        break conn.as_mut().await;
                    }
                    Some(at) => idle.as_mut().reset(at),
                    None => idle.as_mut().reset(Instant::now() + limits.idle_timeout),
                }
            }
            () = stopped(&mut stopping) => {
                // Finish the requests in flight, then close.
                conn.as_mut().graceful_shutdown();
                break conn.as_mut().await;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection error");
    }
}
