//! Workers: named channels consumed in the background, on the in-memory layer
//! (the Redis layer runs the same scenario in `tests/redis.rs`-style setups
//! below when the `redis` feature and a server are available).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tower_channels::{
    channel_layer::{BoxError, ChannelLayer, Event, InMemoryChannelLayer},
    consumer::{websocket_consumer, Context, WebSocketConsumer},
    message::Message,
    testing::Communicator,
    worker::{Worker, WorkerContext},
};

const WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Serialize, Deserialize)]
struct Job {
    n: u64,
    reply_to: String,
}

/// Hands every text message to the "jobs" worker and forwards its replies.
struct Client;

impl WebSocketConsumer for Client {
    async fn receive(&mut self, ctx: &mut Context, msg: Message) -> Result<(), BoxError> {
        if let Message::Text(t) = msg {
            let job = Job {
                n: t.parse()?,
                reply_to: ctx.channel_name().to_owned(),
            };
            ctx.send_to("jobs", Event::new("job.square", job)).await?;
        }
        Ok(())
    }
}

async fn square(ctx: WorkerContext, event: Event) -> Result<(), BoxError> {
    let job: Job = event.body()?;
    let answer = (job.n * job.n).to_string();
    ctx.send(&job.reply_to, Event::text("job.done", answer))
        .await?;
    Ok(())
}

#[tokio::test]
async fn consumer_hands_work_to_worker_and_gets_the_reply() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let worker = Worker::new(layer.clone())
        .channel("jobs")
        .on("job.square", square)
        .start()
        .await
        .unwrap();
    let request = http::Request::get("/ws/jobs").body(()).unwrap();
    let mut comm =
        Communicator::with_request(websocket_consumer(|_| Client), "/ws/jobs", request, layer);
    comm.connect().await.unwrap();
    for n in [3u64, 12, 40] {
        comm.send_text(n.to_string()).await;
        assert_eq!(comm.receive_text().await.unwrap(), (n * n).to_string());
    }
    comm.disconnect(1000).await;
    let stats = worker.shutdown().await;
    assert_eq!(stats.handled, 3);
    assert_eq!(stats.failed, 0);
}

#[tokio::test]
async fn concurrency_is_bounded() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let worker = {
        let (in_flight, max_seen, release) = (in_flight.clone(), max_seen.clone(), release.clone());
        Worker::new(layer.clone())
            .channel("slow")
            .concurrency(3)
            .on("work", move |_ctx, _event| {
                let (in_flight, max_seen, release, started_tx) = (
                    in_flight.clone(),
                    max_seen.clone(),
                    release.clone(),
                    started_tx.clone(),
                );
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max_seen.fetch_max(now, Ordering::SeqCst);
                    let released = release.notified();
                    let _ = started_tx.send(());
                    released.await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .start()
            .await
            .unwrap()
    };
    for _ in 0..10 {
        layer.send("slow", Event::bare("work")).await.unwrap();
    }
    let mut done = 0;
    while done < 10 {
        // Wait for a wave of handlers to start, then let them finish.
        tokio::time::timeout(WAIT, started.recv())
            .await
            .unwrap()
            .unwrap();
        done += 1;
        while started.try_recv().is_ok() {
            done += 1;
        }
        tokio::task::yield_now().await;
        release.notify_waiters();
    }
    let stats = worker.shutdown().await;
    assert_eq!(stats.handled, 10);
    let max = max_seen.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&max),
        "at most 3 handlers at once, saw {max}"
    );
}

#[tokio::test]
async fn errors_and_panics_do_not_stop_the_worker() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let mut replies = layer.new_channel().await.unwrap();
    let reply_to = replies.name().to_owned();
    let worker = Worker::new(layer.clone())
        .channel("fragile")
        .on("fail", |_ctx, _e| async {
            Err::<(), BoxError>("boom".into())
        })
        .on("panic", |_ctx, _e| async {
            panic!("worker handler panicked on purpose")
        })
        .on("ok", move |ctx: WorkerContext, _e| {
            let reply_to = reply_to.clone();
            async move {
                ctx.send(&reply_to, Event::bare("ok.done")).await?;
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    for kind in ["fail", "panic", "unknown.type", "ok"] {
        layer.send("fragile", Event::bare(kind)).await.unwrap();
    }
    let done = tokio::time::timeout(WAIT, replies.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.kind(), "ok.done");
    let stats = worker.shutdown().await;
    assert_eq!((stats.handled, stats.failed, stats.unhandled), (1, 2, 1));
}

#[tokio::test]
async fn shutdown_drains_events_in_flight() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let finished = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let worker = {
        let (finished, release) = (finished.clone(), release.clone());
        Worker::new(layer.clone())
            .channel("drain")
            .on("work", move |_ctx, _e| {
                let (finished, release, started_tx) =
                    (finished.clone(), release.clone(), started_tx.clone());
                async move {
                    let released = release.notified();
                    let _ = started_tx.send(());
                    released.await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .start()
            .await
            .unwrap()
    };
    layer.send("drain", Event::bare("work")).await.unwrap();
    tokio::time::timeout(WAIT, started.recv())
        .await
        .unwrap()
        .unwrap();
    let shutdown = tokio::spawn(worker.shutdown());
    // Shutdown must wait for the running handler.
    tokio::task::yield_now().await;
    assert!(!shutdown.is_finished());
    release.notify_waiters();
    let stats = tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
    assert_eq!(stats.handled, 1);
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    // The channel is no longer received: sends to it now fail.
    assert!(layer.send("drain", Event::bare("work")).await.is_err());
}

#[tokio::test]
async fn a_channel_has_one_worker_per_process() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let first = Worker::new(layer.clone())
        .channel("solo")
        .start()
        .await
        .unwrap();
    let second = Worker::new(layer.clone()).channel("solo").start().await;
    assert!(
        second.is_err(),
        "a second receiver of the same channel is refused"
    );
    first.shutdown().await;
    // Once the first is gone, the name can be taken again.
    Worker::new(layer)
        .channel("solo")
        .start()
        .await
        .unwrap()
        .shutdown()
        .await;
}

/// The same consumer/worker round trip across two Redis layer instances
/// (two "processes"): the consumer on one, the worker on the other.
#[cfg(feature = "redis")]
#[tokio::test]
async fn worker_on_another_process_through_redis() {
    use tower_channels::channel_layer::redis::RedisChannelLayer;

    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("tc-worker-test-{}", std::process::id());
    let connect = || {
        RedisChannelLayer::builder(url.clone())
            .prefix(prefix.clone())
            .timeout(Duration::from_secs(2))
            .build()
    };
    let web = match connect().await {
        Ok(layer) => layer,
        Err(e) if std::env::var("TOWER_CHANNELS_REQUIRE_REDIS").as_deref() == Ok("1") => {
            panic!("no Redis at {url}: {e} (TOWER_CHANNELS_REQUIRE_REDIS=1)")
        }
        Err(e) => {
            eprintln!("skipped: no Redis ({url}: {e})");
            return;
        }
    };
    let web: Arc<dyn ChannelLayer> = Arc::new(web);
    let background: Arc<dyn ChannelLayer> = Arc::new(connect().await.unwrap());
    let worker = Worker::new(background)
        .channel("jobs")
        .concurrency(2)
        .on("job.square", square)
        .start()
        .await
        .unwrap();
    let request = http::Request::get("/ws/jobs").body(()).unwrap();
    let mut comm =
        Communicator::with_request(websocket_consumer(|_| Client), "/ws/jobs", request, web);
    comm.connect().await.unwrap();
    for n in [7u64, 9] {
        comm.send_text(n.to_string()).await;
        let reply = comm.receive_timeout(WAIT).await.unwrap();
        assert_eq!(reply.as_text(), Some((n * n).to_string().as_str()));
    }
    comm.disconnect(1000).await;
    assert_eq!(worker.shutdown().await.handled, 2);
}
