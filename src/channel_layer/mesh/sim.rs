//! An in-process broker for the mesh tests, deterministic (a seeded
//! generator decides every fault) and meant for a paused tokio clock:
//! drop, delay, duplicate and reorder messages, partition one process,
//! restart the broker (subscriptions lost until the clients re-subscribe,
//! messages in flight lost). It is also a [`Store`]: histories (kept
//! across restarts unless [`SimNet::forget_histories`]) and presence
//! entries, with a liveness per (group, process) that expires on the
//! (paused) tokio clock.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use tokio::{sync::mpsc, time::Instant};

use super::{
    live_subject, Arrival, HistoryRange, Inbox, PresenceListing, Store, StoredEntry, Transport,
    TransportError,
};
use crate::channel_layer::{BoxFuture, StreamPosition};

/// The subject prefix the simulated broker's clients use.
pub(crate) const PREFIX: &str = "t";
/// Events the simulated store keeps per group.
pub(crate) const KEPT: usize = 4096;

/// Which faults the network injects, per message and receiver.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Faults {
    /// Messages dropped, per thousand.
    pub(crate) drop: u32,
    /// Messages delivered twice, per thousand.
    pub(crate) duplicate: u32,
    /// Each copy is delivered after a delay drawn up to this (so messages
    /// get reordered); zero delivers at once, in order.
    pub(crate) max_delay: Duration,
    /// Publications that reach the broker but whose answer is lost (the
    /// connection broke), per thousand: the publisher gets
    /// [`TransportError::Failed`].
    pub(crate) lose_answer: u32,
    /// Subscriptions that take effect but whose answer is lost, per
    /// thousand: the subscriber gets [`TransportError::Failed`].
    pub(crate) lose_subscribe_answer: u32,
}

/// The broker: every [`SimTransport`] connected to one network sees the
/// others' publications.
#[derive(Debug, Clone)]
pub(crate) struct SimNet {
    net: Arc<Mutex<Net>>,
}

#[derive(Debug)]
struct Net {
    /// Bumped by every restart; copies in flight from an older epoch are lost.
    epoch: u64,
    down: bool,
    rng: u64,
    faults: Faults,
    procs: Vec<Proc>,
    /// Round robin over queue subscribers.
    next_queue: usize,
    /// Publish calls made, whatever became of them.
    publish_calls: u64,
    /// Group → its history.
    histories: HashMap<String, History>,
    /// Group → (process, user, channel) → entry.
    presence: HashMap<String, BTreeMap<(String, String, String), Bytes>>,
    /// Group → process → when its liveness expires (kept after that, as
    /// the record of a process of the group, until dropped or collected).
    alive: HashMap<String, HashMap<String, Instant>>,
    /// Group → named member → when its membership expires.
    named: HashMap<String, HashMap<String, Instant>>,
    /// (group, process) → when the claim expires.
    claims: HashMap<(String, String), Instant>,
}

#[derive(Debug)]
struct History {
    epoch: String,
    top: u64,
    events: VecDeque<(u64, Bytes)>,
}

#[derive(Debug)]
struct Proc {
    inbox: Inbox,
    /// Subject → queue subscription.
    subjects: HashMap<String, bool>,
    partitioned: bool,
    /// Its subscriptions are not back yet after a restart (its commands
    /// work): live copies to it are lost.
    deaf: bool,
    /// Its commands fail as not sent (its command connection is down)
    /// while its subscriptions work.
    commands_cut: bool,
}

impl Net {
    /// xorshift64*: deterministic, good enough to pick faults.
    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A publication from `from` reaches the broker (counted whatever
    /// becomes of it), or fails as not sent.
    fn reach(&mut self, from: usize) -> Result<(), TransportError> {
        self.publish_calls += 1;
        self.usable(from)
    }

    /// Whether client `id` can send the broker a command now.
    fn usable(&self, id: usize) -> Result<(), TransportError> {
        if self.down {
            return Err(not_sent("the broker is down"));
        }
        if self.procs[id].partitioned {
            return Err(not_sent("partitioned from the broker"));
        }
        if self.procs[id].commands_cut {
            return Err(not_sent("the command connection is down"));
        }
        Ok(())
    }

    fn roll(&mut self, per_thousand: u32) -> bool {
        per_thousand > 0 && self.next() % 1000 < u64::from(per_thousand)
    }
}

impl Net {
    /// The processes alive in `group` at `now`.
    fn alive_in(&self, group: &str, now: Instant) -> HashSet<String> {
        self.alive
            .get(group)
            .map(|processes| {
                processes
                    .iter()
                    .filter(|(_, expiry)| **expiry > now)
                    .map(|(p, _)| p.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The entries of `group` whose user passes `user`.
    fn listing(&self, group: &str, user: impl Fn(&str) -> bool) -> PresenceListing {
        let entries = self
            .presence
            .get(group)
            .map(|entries| {
                entries
                    .iter()
                    .filter(|((_, u, _), _)| user(u))
                    .map(|((process, _, channel), entry)| StoredEntry {
                        process: process.clone(),
                        channel: channel.clone(),
                        entry: entry.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        PresenceListing {
            entries,
            alive: self.alive_in(group, Instant::now()),
        }
    }

    /// Forgets `process`'s liveness and entries in `group`.
    fn drop_process(&mut self, group: &str, process: &str) {
        if let Some(processes) = self.alive.get_mut(group) {
            processes.remove(process);
        }
        if let Some(entries) = self.presence.get_mut(group) {
            entries.retain(|(p, _, _), _| p != process);
        }
    }
}

fn not_sent(why: &str) -> TransportError {
    TransportError::NotSent(why.into())
}

impl SimNet {
    /// A network whose faults are drawn from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            net: Arc::new(Mutex::new(Net {
                epoch: 0,
                down: false,
                rng: seed.max(1),
                faults: Faults::default(),
                procs: Vec::new(),
                next_queue: 0,
                publish_calls: 0,
                histories: HashMap::new(),
                presence: HashMap::new(),
                alive: HashMap::new(),
                named: HashMap::new(),
                claims: HashMap::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Net> {
        self.net.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new client of the broker, and the receiving end of its inbox.
    pub(crate) fn connect(&self) -> (SimTransport, mpsc::Receiver<Arrival>) {
        let (inbox, rx) = Inbox::new();
        let mut net = self.lock();
        net.procs.push(Proc {
            inbox,
            subjects: HashMap::new(),
            partitioned: false,
            deaf: false,
            commands_cut: false,
        });
        let id = net.procs.len() - 1;
        (
            SimTransport {
                net: self.clone(),
                id,
            },
            rx,
        )
    }

    /// How many times a client called publish (attempts included).
    pub(crate) fn publish_calls(&self) -> u64 {
        self.lock().publish_calls
    }

    /// Sets the faults injected from now on.
    pub(crate) fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Cuts (or restores) `client`'s commands only: its publications,
    /// subscriptions and store operations fail as not sent, while what it
    /// is subscribed to still reaches it (a command connection down, its
    /// Pub/Sub connection up).
    pub(crate) fn cut_commands(&self, client: &SimTransport, cut: bool) {
        self.lock().procs[client.id].commands_cut = cut;
    }

    /// Cuts `client` off the broker (or heals it): nothing reaches it and
    /// its operations fail as not sent.
    pub(crate) fn partition(&self, client: &SimTransport, cut: bool) {
        self.lock().procs[client.id].partitioned = cut;
    }

    /// Whether `client` is subscribed to `subject` at the broker.
    pub(crate) fn subscribed(&self, client: &SimTransport, subject: &str) -> bool {
        self.lock().procs[client.id].subjects.contains_key(subject)
    }

    /// Restarts the broker: it is down for `down_for` (operations fail as
    /// not sent, copies in flight are lost), then every client's
    /// subscriptions are back (the clients re-subscribe, as async-nats
    /// does) and each client is told it reconnected. Returns when it is up
    /// again.
    pub(crate) async fn restart(&self, down_for: Duration) {
        self.restart_with(down_for, Duration::ZERO).await;
    }

    /// [`restart`](Self::restart), each client's subscriptions coming back
    /// after a delay of its own, drawn up to `resubscribe` (as the Redis
    /// Pub/Sub task reconnects on its own back-off): until then its
    /// commands work but live copies to it are lost. Returns when every
    /// client is back.
    pub(crate) async fn restart_with(&self, down_for: Duration, resubscribe: Duration) {
        {
            let mut net = self.lock();
            net.epoch += 1;
            net.down = true;
            for proc in &mut net.procs {
                proc.deaf = true;
            }
        }
        tokio::time::sleep(down_for).await;
        let clients: Vec<(usize, Duration)> = {
            let mut net = self.lock();
            net.down = false;
            let max = u64::try_from(resubscribe.as_micros()).unwrap_or(u64::MAX);
            (0..net.procs.len())
                .map(|id| {
                    let delay = if max == 0 { 0 } else { net.next() % max };
                    (id, Duration::from_micros(delay))
                })
                .collect()
        };
        let back = clients.into_iter().map(|(id, delay)| {
            let net = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let inbox = {
                    let mut net = net.lock();
                    net.procs[id].deaf = false;
                    net.procs[id].inbox.clone()
                };
                inbox.reconnected().await;
            })
        });
        for client in back.collect::<Vec<_>>() {
            let _ = client.await;
        }
    }

    /// Loses every history (as a broker that restarted without its store):
    /// the next append starts a new epoch.
    pub(crate) fn forget_histories(&self) {
        self.lock().histories.clear();
    }

    fn publish(
        &self,
        from: usize,
        subject: &str,
        payload: &Bytes,
    ) -> Result<usize, TransportError> {
        let mut net = self.lock();
        net.reach(from)?;
        self.fan_out(&mut net, subject, payload, None)
    }

    /// Stores `event` in `group`'s history and publishes it on the live
    /// subject, with the faults of a publication.
    fn append(
        &self,
        from: usize,
        group: &str,
        event: &Bytes,
    ) -> Result<StreamPosition, TransportError> {
        let mut net = self.lock();
        net.reach(from)?;
        let fresh = format!("e{}", net.next() % 1_000_000);
        let history = net.histories.entry(group.to_owned()).or_insert(History {
            epoch: fresh,
            top: 0,
            events: VecDeque::new(),
        });
        history.top += 1;
        history.events.push_back((history.top, event.clone()));
        if history.events.len() > KEPT {
            history.events.pop_front();
        }
        let position = StreamPosition::new(history.top, history.epoch.as_str());
        let live = live_subject(PREFIX, group);
        self.fan_out(&mut net, &live, event, Some(&position))
            .map(|_| position)
    }

    fn fan_out(
        &self,
        net: &mut Net,
        subject: &str,
        payload: &Bytes,
        position: Option<&StreamPosition>,
    ) -> Result<usize, TransportError> {
        let mut targets = Vec::new();
        let mut queue = Vec::new();
        for (id, proc) in net.procs.iter().enumerate() {
            match proc.subjects.get(subject) {
                Some(false) if !proc.partitioned && !proc.deaf => targets.push(id),
                Some(true) if !proc.partitioned && !proc.deaf => queue.push(id),
                _ => {}
            }
        }
        if !queue.is_empty() {
            let pick = net.next_queue % queue.len();
            net.next_queue = net.next_queue.wrapping_add(1);
            targets.push(queue[pick]);
        }
        let faults = net.faults;
        let epoch = net.epoch;
        for &target in &targets {
            if net.roll(faults.drop) {
                continue;
            }
            let copies = if net.roll(faults.duplicate) { 2 } else { 1 };
            for _ in 0..copies {
                let max = u64::try_from(faults.max_delay.as_micros()).unwrap_or(u64::MAX);
                let delay = if max == 0 { 0 } else { net.next() % max };
                if delay == 0 {
                    net.procs[target]
                        .inbox
                        .deliver(subject, payload.clone(), position.cloned());
                    continue;
                }
                let this = self.clone();
                let (subject, payload) = (subject.to_owned(), payload.clone());
                let position = position.cloned();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros(delay)).await;
                    let net = this.lock();
                    let proc = &net.procs[target];
                    if net.epoch == epoch
                        && !net.down
                        && !proc.partitioned
                        && !proc.deaf
                        && proc.subjects.contains_key(&subject)
                    {
                        proc.inbox.deliver(&subject, payload, position);
                    }
                });
            }
        }
        if net.roll(faults.lose_answer) {
            return Err(TransportError::Failed(
                "the connection broke after sending".into(),
            ));
        }
        Ok(targets.len())
    }
}

/// One process's connection to a [`SimNet`].
#[derive(Debug)]
pub(crate) struct SimTransport {
    net: SimNet,
    id: usize,
}

impl SimTransport {
    fn check(&self) -> Result<(), TransportError> {
        self.net.lock().usable(self.id)
    }
}

impl Transport for SimTransport {
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, TransportError>> {
        let result = self.net.publish(self.id, subject, &payload).map(Some);
        Box::pin(std::future::ready(result))
    }

    fn subscribe<'a>(
        &'a self,
        subject: &'a str,
        queue: bool,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self.check().and_then(|()| {
            let mut net = self.net.lock();
            net.procs[self.id]
                .subjects
                .insert(subject.to_owned(), queue);
            let lose = net.faults.lose_subscribe_answer;
            if net.roll(lose) {
                return Err(TransportError::Failed(
                    "the connection broke after subscribing".into(),
                ));
            }
            Ok(())
        });
        Box::pin(std::future::ready(result))
    }

    fn unsubscribe<'a>(&'a self, subject: &'a str) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self.check().map(|()| {
            self.net.lock().procs[self.id].subjects.remove(subject);
        });
        Box::pin(std::future::ready(result))
    }

    fn store(&self) -> Option<&dyn Store> {
        Some(self)
    }
}

impl Store for SimTransport {
    fn append<'a>(
        &'a self,
        group: &'a str,
        event: Bytes,
    ) -> BoxFuture<'a, Result<StreamPosition, TransportError>> {
        Box::pin(std::future::ready(self.net.append(self.id, group, &event)))
    }

    fn latest<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<StreamPosition>, TransportError>> {
        let result = self.check().map(|()| {
            self.net
                .lock()
                .histories
                .get(group)
                .map(|h| StreamPosition::new(h.top, h.epoch.as_str()))
        });
        Box::pin(std::future::ready(result))
    }

    fn read<'a>(
        &'a self,
        group: &'a str,
        since: &'a StreamPosition,
    ) -> BoxFuture<'a, Result<Option<HistoryRange>, TransportError>> {
        let result = self.check().map(|()| {
            let net = self.net.lock();
            let h = net.histories.get(group)?;
            let same_epoch = h.epoch == since.epoch();
            Some(HistoryRange {
                latest: StreamPosition::new(h.top, h.epoch.as_str()),
                first: h.events.front().map_or(h.top + 1, |(o, _)| *o),
                events: h
                    .events
                    .iter()
                    .filter(|(o, _)| same_epoch && *o > since.offset())
                    .cloned()
                    .collect(),
            })
        });
        Box::pin(std::future::ready(result))
    }

    fn presence_add<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        user: &'a str,
        channel: &'a str,
        entry: Bytes,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self.check().map(|()| {
            self.net
                .lock()
                .presence
                .entry(group.to_owned())
                .or_default()
                .insert((process.into(), user.into(), channel.into()), entry);
        });
        Box::pin(std::future::ready(result))
    }

    fn presence_remove<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        user: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self.check().map(|()| {
            if let Some(entries) = self.net.lock().presence.get_mut(group) {
                entries.remove(&(process.into(), user.into(), channel.into()));
            }
        });
        Box::pin(std::future::ready(result))
    }

    fn presence_alive<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, TransportError>> {
        let result = self.check().map(|()| {
            let now = Instant::now();
            let mut net = self.net.lock();
            let expiry = net
                .alive
                .entry(group.to_owned())
                .or_default()
                .insert(process.to_owned(), now + ttl);
            expiry.is_some_and(|expiry| expiry > now)
        });
        Box::pin(std::future::ready(result))
    }

    fn presence_retire<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self.check().map(|()| {
            if let Some(processes) = self.net.lock().alive.get_mut(group) {
                processes.remove(process);
            }
        });
        Box::pin(std::future::ready(result))
    }

    fn presence_drop<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self
            .check()
            .map(|()| self.net.lock().drop_process(group, process));
        Box::pin(std::future::ready(result))
    }

    fn presence_collect<'a>(
        &'a self,
        group: &'a str,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self.check().map(|()| {
            let mut net = self.net.lock();
            let alive = net.alive_in(group, Instant::now());
            if !alive.contains(process) {
                net.drop_process(group, process);
            }
        });
        Box::pin(std::future::ready(result))
    }

    fn presence_list<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<PresenceListing, TransportError>> {
        let result = self
            .check()
            .map(|()| self.net.lock().listing(group, |_| true));
        Box::pin(std::future::ready(result))
    }

    fn presence_user<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<PresenceListing, TransportError>> {
        let result = self
            .check()
            .map(|()| self.net.lock().listing(group, |u| u == user));
        Box::pin(std::future::ready(result))
    }

    fn presence_processes<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, bool)>, TransportError>> {
        let result = self.check().map(|()| {
            let now = Instant::now();
            self.net
                .lock()
                .alive
                .get(group)
                .map(|processes| {
                    processes
                        .iter()
                        .map(|(p, expiry)| (p.clone(), *expiry > now))
                        .collect()
                })
                .unwrap_or_default()
        });
        Box::pin(std::future::ready(result))
    }

    fn named_add<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
        expiry: Duration,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self.check().map(|()| {
            self.net
                .lock()
                .named
                .entry(group.to_owned())
                .or_default()
                .insert(channel.to_owned(), Instant::now() + expiry);
        });
        Box::pin(std::future::ready(result))
    }

    fn named_remove<'a>(
        &'a self,
        group: &'a str,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self.check().map(|()| {
            if let Some(members) = self.net.lock().named.get_mut(group) {
                members.remove(channel);
            }
        });
        Box::pin(std::future::ready(result))
    }

    fn named_members<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, TransportError>> {
        let result = self.check().map(|()| {
            let now = Instant::now();
            let mut members: Vec<String> = self
                .net
                .lock()
                .named
                .get(group)
                .map(|members| {
                    members
                        .iter()
                        .filter(|(_, expiry)| **expiry > now)
                        .map(|(c, _)| c.clone())
                        .collect()
                })
                .unwrap_or_default();
            members.sort();
            members
        });
        Box::pin(std::future::ready(result))
    }

    fn presence_claim<'a>(
        &'a self,
        group: &'a str,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, TransportError>> {
        let result = self.check().map(|()| {
            let now = Instant::now();
            let mut net = self.net.lock();
            let key = (group.to_owned(), key.to_owned());
            if net.claims.get(&key).is_some_and(|expiry| *expiry > now) {
                return false;
            }
            net.claims.insert(key, now + ttl);
            true
        });
        Box::pin(std::future::ready(result))
    }

    fn clear(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        // One prefix per network ([`PREFIX`]): everything is under it.
        let result = self.check().map(|()| {
            let mut net = self.net.lock();
            net.histories.clear();
            net.presence.clear();
            net.alive.clear();
            net.named.clear();
            net.claims.clear();
        });
        Box::pin(std::future::ready(result))
    }
}
