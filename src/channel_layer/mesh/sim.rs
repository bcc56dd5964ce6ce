//! An in-process broker for the mesh tests, deterministic (a seeded
//! generator decides every fault) and meant for a paused tokio clock:
//! drop, delay, duplicate and reorder messages, partition one process,
//! restart the broker (subscriptions lost until the clients re-subscribe,
//! messages in flight lost).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Inbox, Incoming, Transport, TransportError};
use crate::channel_layer::BoxFuture;

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
}

#[derive(Debug)]
struct Proc {
    inbox: Inbox,
    /// Subject → queue subscription.
    subjects: HashMap<String, bool>,
    partitioned: bool,
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

    fn roll(&mut self, per_thousand: u32) -> bool {
        per_thousand > 0 && self.next() % 1000 < u64::from(per_thousand)
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
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Net> {
        self.net.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new client of the broker, and the receiving end of its inbox.
    pub(crate) fn connect(&self) -> (SimTransport, mpsc::Receiver<Incoming>) {
        let (inbox, rx) = Inbox::new();
        let mut net = self.lock();
        net.procs.push(Proc {
            inbox,
            subjects: HashMap::new(),
            partitioned: false,
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

    /// Cuts `client` off the broker (or heals it): nothing reaches it and
    /// its operations fail as not sent.
    pub(crate) fn partition(&self, client: &SimTransport, cut: bool) {
        self.lock().procs[client.id].partitioned = cut;
    }

    /// Restarts the broker: it is down for `down_for` (operations fail as
    /// not sent, copies in flight are lost), then every client's
    /// subscriptions are back (the clients re-subscribe, as async-nats
    /// does). Returns when it is up again.
    pub(crate) async fn restart(&self, down_for: Duration) {
        {
            let mut net = self.lock();
            net.epoch += 1;
            net.down = true;
        }
        tokio::time::sleep(down_for).await;
        self.lock().down = false;
    }

    fn publish(
        &self,
        from: usize,
        subject: &str,
        payload: &Bytes,
    ) -> Result<usize, TransportError> {
        let mut net = self.lock();
        net.publish_calls += 1;
        if net.down {
            return Err(not_sent("the broker is down"));
        }
        if net.procs[from].partitioned {
            return Err(not_sent("partitioned from the broker"));
        }
        let mut targets = Vec::new();
        let mut queue = Vec::new();
        for (id, proc) in net.procs.iter().enumerate() {
            match proc.subjects.get(subject) {
                Some(false) if !proc.partitioned => targets.push(id),
                Some(true) if !proc.partitioned => queue.push(id),
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
                    net.procs[target].inbox.deliver(subject, payload.clone());
                    continue;
                }
                let this = self.clone();
                let (subject, payload) = (subject.to_owned(), payload.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros(delay)).await;
                    let net = this.lock();
                    let proc = &net.procs[target];
                    if net.epoch == epoch
                        && !net.down
                        && !proc.partitioned
                        && proc.subjects.contains_key(&subject)
                    {
                        proc.inbox.deliver(&subject, payload);
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
        let net = self.net.lock();
        if net.down {
            return Err(not_sent("the broker is down"));
        }
        if net.procs[self.id].partitioned {
            return Err(not_sent("partitioned from the broker"));
        }
        Ok(())
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
        let result = self.check().map(|()| {
            self.net.lock().procs[self.id]
                .subjects
                .insert(subject.to_owned(), queue);
        });
        Box::pin(std::future::ready(result))
    }

    fn unsubscribe<'a>(&'a self, subject: &'a str) -> BoxFuture<'a, Result<(), TransportError>> {
        let result = self.check().map(|()| {
            self.net.lock().procs[self.id].subjects.remove(subject);
        });
        Box::pin(std::future::ready(result))
    }
}
