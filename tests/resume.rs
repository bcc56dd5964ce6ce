//! `Context::join`: joining a group with presence and resuming from the
//! client's last position in a few lines (issue 24, item 1), through a real
//! axum app and the `Communicator`: recovered events reach `event` before
//! live ones, the live copies of recovered events are dropped, a lost
//! history is reported, a malformed position is a 400.

use std::sync::Arc;

use serde::Serialize;
use tower_channels::{
    channel_layer::{
        BoxFuture, ChannelLayer, ChannelLayerError, ChannelReceiver, Event, GroupPattern,
        GroupSendReport, HistoryPolicy, InMemoryChannelLayer, PresenceConfig, PresenceInfo,
        PresenceMember, Recovery, StreamPosition,
    },
    consumer::{
        position_from_query, websocket_consumer, Accept, Context, Reject, WebSocketConsumer,
    },
    testing::Communicator,
    BoxError, WebSocketLayer,
};

/// The whole consumer: join with presence, resume, render the position.
struct Doc {
    user: String,
}

#[derive(Serialize)]
struct Frame<'a> {
    text: String,
    #[serde(flatten)]
    position: Option<&'a StreamPosition>,
}

impl WebSocketConsumer for Doc {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        let since = position_from_query(ctx.scope())?;
        let info = PresenceInfo::new(self.user.as_str())?;
        let resumed = ctx.join("doc_1").presence(info).resume_from(since).await?;
        ctx.send_json(&serde_json::json!({ "resumed": format!("{resumed:?}") }))?;
        Ok(Accept::new())
    }

    async fn event(&mut self, ctx: &mut Context, event: Event) -> Result<(), BoxError> {
        if event.kind() == "doc.text" {
            let text = event.body::<String>()?;
            ctx.send_json(&Frame {
                text,
                position: event.position(),
            })?;
        }
        Ok(())
    }
}

fn memory() -> InMemoryChannelLayer {
    InMemoryChannelLayer::new()
        .with_history(HistoryPolicy::new(GroupPattern::prefix("doc_")))
        .with_presence(PresenceConfig::new())
}

fn app(layer: Arc<dyn ChannelLayer>) -> axum::Router {
    let channels = WebSocketLayer::new().with_channel_layer(layer).route(
        "/ws/doc",
        websocket_consumer(|scope| Doc {
            user: scope.query_param("user").unwrap_or_default(),
        }),
    );
    axum::Router::new().layer(channels)
}

fn get(path: &str) -> http::Request<()> {
    http::Request::get(path).body(()).unwrap()
}

async fn send(layer: &dyn ChannelLayer, text: &str) -> StreamPosition {
    let report = layer
        .group_send("doc_1", Event::new("doc.text", text.to_owned()))
        .await
        .unwrap();
    report.position.expect("doc_ groups keep a history")
}

async fn texts(comm: &mut Communicator, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(comm.receive_json().await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_reconnecting_client_gets_what_it_missed_then_live_events() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(memory());
    let first = send(&*layer, "one").await;
    send(&*layer, "two").await;
    send(&*layer, "three").await;

    let path = format!(
        "/ws/doc?user=ada&offset={}&epoch={}",
        first.offset(),
        first.epoch()
    );
    let mut comm = Communicator::through(app(layer.clone()), get(&path));
    comm.connect().await.unwrap();
    let got = texts(&mut comm, 3).await;
    assert_eq!(got[0]["resumed"], "Recovered { events: 2 }");
    assert_eq!(got[1]["text"], "two");
    assert_eq!(got[1]["offset"], first.offset() + 1);
    assert_eq!(got[1]["epoch"], first.epoch());
    assert_eq!(got[2]["text"], "three");
    // Presence lists the member.
    let members = layer.presence("doc_1").await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].user_id(), "ada");
    // Then live.
    send(&*layer, "four").await;
    let live = texts(&mut comm, 1).await;
    assert_eq!(live[0]["text"], "four");
    assert_eq!(live[0]["offset"], first.offset() + 3);
    comm.disconnect(1000).await;
}

#[tokio::test]
async fn a_first_connection_joins_fresh_and_a_lost_history_is_reported() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(memory());
    send(&*layer, "before").await;
    let mut fresh = Communicator::through(app(layer.clone()), get("/ws/doc?user=ada"));
    fresh.connect().await.unwrap();
    assert_eq!(texts(&mut fresh, 1).await[0]["resumed"], "Fresh");
    send(&*layer, "live").await;
    assert_eq!(texts(&mut fresh, 1).await[0]["text"], "live");

    let mut stale = Communicator::through(
        app(layer.clone()),
        get("/ws/doc?user=bob&offset=1&epoch=gone"),
    );
    stale.connect().await.unwrap();
    assert_eq!(
        texts(&mut stale, 1).await[0]["resumed"],
        "Failed(EpochChanged)"
    );

    // A layer without history (and without presence, so no presence here).
    let plain: Arc<dyn ChannelLayer> = Arc::new(InMemoryChannelLayer::new());
    let channels = WebSocketLayer::new()
        .with_channel_layer(plain)
        .route("/ws/plain", websocket_consumer(|_| Plain));
    let mut comm = Communicator::through(
        axum::Router::new().layer(channels),
        get("/ws/plain?offset=3&epoch=e"),
    );
    comm.connect().await.unwrap();
    assert_eq!(comm.receive_text().await.unwrap(), "Unavailable true");
}

struct Plain;

impl WebSocketConsumer for Plain {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        let since = position_from_query(ctx.scope())?;
        let resumed = ctx.join("doc_1").resume_from(since).await?;
        ctx.send_text(format!("{resumed:?} {}", resumed.has_gap()))?;
        Ok(Accept::new())
    }
}

#[tokio::test]
async fn a_malformed_position_is_a_400() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(memory());
    for query in ["offset=1", "epoch=e", "offset=x&epoch=e", "offset=1&epoch="] {
        let mut comm = Communicator::through(app(layer.clone()), get(&format!("/ws/doc?{query}")));
        let rejected = comm.connect().await.unwrap_err();
        assert_eq!(rejected.status, http::StatusCode::BAD_REQUEST, "{query}");
    }
}

/// The in-memory layer, with one group send slipped in between the join
/// and the recovery read: that event reaches the connection both ways.
#[derive(Debug)]
struct SendDuringRecover(InMemoryChannelLayer);

impl ChannelLayer for SendDuringRecover {
    fn new_channel(&self) -> BoxFuture<'_, Result<ChannelReceiver, ChannelLayerError>> {
        self.0.new_channel()
    }
    fn receive<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<ChannelReceiver, ChannelLayerError>> {
        self.0.receive(channel)
    }
    fn send<'a>(
        &'a self,
        channel: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        self.0.send(channel, event)
    }
    fn group_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        self.0.group_add(group, channel)
    }
    fn group_discard<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        self.0.group_discard(group, channel)
    }
    fn group_send<'a>(
        &'a self,
        group: &'a str,
        event: Event,
    ) -> BoxFuture<'a, Result<GroupSendReport, ChannelLayerError>> {
        self.0.group_send(group, event)
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), ChannelLayerError>> {
        self.0.flush()
    }
    fn presence_join<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
        info: PresenceInfo,
    ) -> BoxFuture<'a, Result<(), ChannelLayerError>> {
        self.0.presence_join(group, channel, info)
    }
    fn presence<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<PresenceMember>, ChannelLayerError>> {
        self.0.presence(group)
    }
    fn recover<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Recovery, ChannelLayerError>> {
        Box::pin(async move {
            self.0
                .group_send(group, Event::new("doc.text", "raced".to_owned()))
                .await?;
            self.0.recover(group, since).await
        })
    }
}

#[tokio::test]
async fn an_event_sent_between_join_and_recovery_is_delivered_once() {
    let inner = memory();
    let first = send(&inner, "one").await;
    send(&inner, "two").await;
    let layer: Arc<dyn ChannelLayer> = Arc::new(SendDuringRecover(inner));
    let path = format!(
        "/ws/doc?user=ada&offset={}&epoch={}",
        first.offset(),
        first.epoch()
    );
    let mut comm = Communicator::through(app(layer.clone()), get(&path));
    comm.connect().await.unwrap();
    let got = texts(&mut comm, 3).await;
    assert_eq!(got[0]["resumed"], "Recovered { events: 2 }");
    assert_eq!(got[1]["text"], "two");
    assert_eq!(got[2]["text"], "raced");
    // The live copy of "raced" was dropped: the next frame is the next event.
    send(&*layer, "after").await;
    let next = texts(&mut comm, 1).await;
    assert_eq!(next[0]["text"], "after");
    assert_eq!(next[0]["offset"], first.offset() + 3);
    comm.disconnect(1000).await;
}

/// Joins `lobby` with presence and says which presence changes it got.
struct Present {
    user: String,
    quiet: bool,
}

impl WebSocketConsumer for Present {
    async fn connect(&mut self, ctx: &mut Context) -> Result<Accept, Reject> {
        let mut join = ctx
            .join("lobby")
            .presence(PresenceInfo::new(self.user.as_str())?);
        if self.quiet {
            join = join.skip_own_presence();
        }
        join.await?;
        Ok(Accept::new())
    }

    async fn event(&mut self, ctx: &mut Context, event: Event) -> Result<(), BoxError> {
        let change: tower_channels::channel_layer::PresenceChange = event.body()?;
        ctx.send_text(format!("{} {}", event.kind(), change.user_id))?;
        Ok(())
    }
}

#[tokio::test]
async fn a_member_gets_its_own_presence_change_unless_it_skips_it() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(
        InMemoryChannelLayer::new()
            .with_presence(PresenceConfig::new().notify(GroupPattern::exact("lobby"))),
    );
    let channels = WebSocketLayer::new().with_channel_layer(layer).route(
        "/ws/lobby",
        websocket_consumer(|scope| Present {
            user: scope.query_param("user").unwrap_or_default(),
            quiet: scope.query_param("quiet").is_some(),
        }),
    );
    let app = axum::Router::new().layer(channels);
    let mut ada = Communicator::through(app.clone(), get("/ws/lobby?user=ada&quiet"));
    ada.connect().await.unwrap();
    let mut bob = Communicator::through(app.clone(), get("/ws/lobby?user=bob"));
    bob.connect().await.unwrap();
    // By default the joining connection is told about itself...
    assert_eq!(bob.receive_text().await.unwrap(), "presence.join bob");
    // ...ada skipped her own join: bob's is the first she hears of.
    assert_eq!(ada.receive_text().await.unwrap(), "presence.join bob");
    // A second tab of ada: a connection of a present user is no join;
    // when she closes it, no leave either (she is still there).
    let mut ada2 = Communicator::through(app, get("/ws/lobby?user=ada&quiet"));
    ada2.connect().await.unwrap();
    ada2.disconnect(1000).await;
    bob.disconnect(1000).await;
    assert_eq!(ada.receive_text().await.unwrap(), "presence.leave bob");
    assert!(ada.receive_nothing().await);
    ada.disconnect(1000).await;
}
