//! The per-instance watcher: one pub/sub connection that carries every notification this
//! instance's readers wait on, and a small cache of each watched run's recent events.
//!
//! A reader that waits on a run (a stream, a long-poll) first watches its thread's channel:
//! the first watch of a thread subscribes, later ones share it, and a thread nobody watched for
//! [`LINGER`] is unsubscribed. Notifications carry the events they announce, so a watched run's
//! [`Tail`] stays current without reading Redis: a live stream reads its next events from the
//! tail and waits on the thread's version counter, and touches Redis only to catch up from
//! further back. The log stays the source of truth: a tail is merged by seq, dropped when a
//! notification is missed (a gap, a reconnect), and rebuilt from the log.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::{mpsc, watch};

use super::wire::{self, Note};
use crate::event::Event;
use crate::store::{Control, RunId, RunStatus};

/// How long a thread's channel stays subscribed after its last reader left.
pub const LINGER: Duration = Duration::from_secs(30);

/// A watched run's recent events and state, as notifications told them.
#[derive(Debug, Default)]
pub struct Tail {
    /// The run's last seq, as far as this instance knows.
    pub known_last: u64,
    /// Its status (`None`: only seen in a notification without one).
    pub status: Option<RunStatus>,
    /// Contiguous recent events, ending at `known_last` (maybe empty).
    pub events: VecDeque<Event>,
    /// Whether the run was evicted.
    pub gone: bool,
}

impl Tail {
    fn merge(&mut self, note: &Note, keep: usize) {
        if note.status == "evicted" {
            self.gone = true;
            self.events.clear();
            return;
        }
        if let Some(s) = status_of(&note.status) {
            // A terminal status is final whatever order things arrive in.
            if !self.status.is_some_and(RunStatus::is_terminal) {
                self.status = Some(s);
            }
        }
        let next = self.known_last + 1;
        match note.events.first() {
            Some(first) if first.seq == next => self.events.extend(note.events.iter().cloned()),
            Some(first) if first.seq < next => {
                let skip = (next - first.seq) as usize;
                self.events.extend(note.events.iter().skip(skip).cloned());
            }
            // A gap (or an announcement without its events): what lies between is unknown here.
            _ if note.last > self.known_last => self.events.clear(),
            _ => {}
        }
        self.known_last = self.known_last.max(note.last);
        while self.events.len() > keep {
            self.events.pop_front();
        }
    }

    /// Merge what a read of the run's record said.
    pub fn merge_state(&mut self, last: u64, status: RunStatus) {
        if last > self.known_last {
            self.events.clear();
            self.known_last = last;
        }
        if !self.status.is_some_and(RunStatus::is_terminal) {
            self.status = Some(status);
        }
    }

    /// Events after `after` from the cache, if it holds them all (or knows there are none).
    pub fn read(&self, after: u64, max: usize, max_bytes: usize) -> Option<Vec<Event>> {
        self.status?;
        if after >= self.known_last {
            return Some(Vec::new());
        }
        let start = self.events.front()?.seq;
        if start > after + 1 {
            return None;
        }
        let held = self.events.iter().skip((after + 1 - start) as usize);
        Some(crate::store::bounded(held, max, max_bytes))
    }
}

/// A status as the scripts write it.
pub fn status_of(s: &str) -> Option<RunStatus> {
    RunStatus::ALL.into_iter().find(|st| st.as_str() == s)
}

struct Topic {
    refs: usize,
    idle_since: Option<Instant>,
    version: watch::Sender<u64>,
    subscribed: bool,
}

struct State {
    topics: HashMap<String, Topic>,
    /// Run id → (thread channel, tail).
    tails: HashMap<String, (String, Tail)>,
    sink: Option<PubSubSink>,
}

/// The watcher (shared by the store's clones).
pub struct Watcher {
    state: Mutex<State>,
    /// Whether the pub/sub connection is up (watched by callers waiting for it).
    up: watch::Sender<bool>,
    /// How long a watch waits for the connection to come up.
    patience: Duration,
    keep: usize,
    control_channel: String,
}

/// A reader's hold on a thread's channel: while held, the channel stays subscribed.
pub struct Watch {
    watcher: Arc<Watcher>,
    channel: String,
    /// Bumped on every notification of the thread (and on reconnects).
    pub changes: watch::Receiver<u64>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut st = self.watcher.lock();
        if let Some(t) = st.topics.get_mut(&self.channel) {
            t.refs -= 1;
            if t.refs == 0 {
                t.idle_since = Some(Instant::now());
            }
        }
    }
}

impl Watcher {
    /// A watcher keeping `keep` events per run, listening for control messages on
    /// `control_channel`.
    pub fn new(keep: usize, control_channel: String, patience: Duration) -> Arc<Watcher> {
        Arc::new(Watcher {
            up: watch::channel(false).0,
            patience,
            state: Mutex::new(State {
                topics: HashMap::new(),
                tails: HashMap::new(),
                sink: None,
            }),
            keep,
            control_channel,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the pub/sub connection is up.
    pub fn connected(&self) -> bool {
        self.lock().sink.is_some()
    }

    /// Wait until the pub/sub connection is up, at most `limit`; returns whether it is.
    pub async fn wait_up(&self, limit: Duration) -> bool {
        let mut up = self.up.subscribe();
        let waited = tokio::time::timeout(limit, up.wait_for(|u| *u)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// Watch a thread's channel: returns once the channel is subscribed, so that every write
    /// after this call is seen. Waits a little for a connection that is down.
    pub async fn watch(self: &Arc<Self>, channel: &str) -> Result<Watch, String> {
        if !self.connected() && !self.wait_up(self.patience).await {
            return Err("notifications connection is down".into());
        }
        let (rx, sink) = {
            let mut st = self.lock();
            let sink = st.sink.clone();
            let topic = st
                .topics
                .entry(channel.to_owned())
                .or_insert_with(|| Topic {
                    refs: 0,
                    idle_since: None,
                    version: watch::channel(0).0,
                    subscribed: false,
                });
            topic.refs += 1;
            topic.idle_since = None;
            let need = !topic.subscribed;
            (topic.version.subscribe(), need.then_some(sink))
        };
        let held = Watch {
            watcher: self.clone(),
            channel: channel.to_owned(),
            changes: rx,
        };
        if let Some(sink) = sink {
            let Some(mut sink) = sink else {
                return Err("notifications connection is down".into());
            };
            sink.subscribe(channel)
                .await
                .map_err(|e| format!("subscribe: {e}"))?;
            if let Some(t) = self.lock().topics.get_mut(channel) {
                t.subscribed = true;
            }
        }
        Ok(held)
    }

    /// Run `f` on a run's tail (created empty when missing) if its thread's channel is live.
    pub fn with_tail<T>(
        &self,
        run: &str,
        channel: &str,
        f: impl FnOnce(&mut Tail) -> T,
    ) -> Option<T> {
        let mut st = self.lock();
        if st.sink.is_none() || !st.topics.get(channel).is_some_and(|t| t.subscribed) {
            return None;
        }
        let entry = st
            .tails
            .entry(run.to_owned())
            .or_insert_with(|| (channel.to_owned(), Tail::default()));
        Some(f(&mut entry.1))
    }

    /// Record what this instance itself wrote (its notification may not have come back yet).
    pub fn note_local(&self, note: &Note) {
        let mut st = self.lock();
        if let Some((_, tail)) = st.tails.get_mut(&note.run) {
            tail.merge(note, self.keep);
        }
    }

    fn dispatch(&self, channel: &str, payload: Bytes, control: &mpsc::UnboundedSender<Control>) {
        if channel == self.control_channel {
            if let Some(run) = std::str::from_utf8(&payload)
                .ok()
                .and_then(|s| s.strip_prefix("cancel "))
            {
                let _ = control.send(Control::Cancel(RunId(run.to_owned())));
            }
            return;
        }
        let mut st = self.lock();
        match wire::decode(&payload) {
            Some(note) if !note.run.is_empty() => {
                let keep = self.keep;
                let (_, tail) = st
                    .tails
                    .entry(note.run.clone())
                    .or_insert_with(|| (channel.to_owned(), Tail::default()));
                tail.merge(&note, keep);
            }
            Some(_) => {}
            // Unreadable: forget what is cached for the thread, readers go to the log.
            None => st.tails.retain(|_, (c, _)| c != channel),
        }
        if let Some(t) = st.topics.get(channel) {
            t.version.send_modify(|v| *v += 1);
        }
    }

    /// Forget every tail and wake every reader (notifications may have been missed).
    fn reset(&self, sink: Option<PubSubSink>) {
        let mut st = self.lock();
        self.up.send_replace(sink.is_some());
        st.tails.clear();
        st.sink = sink;
        for t in st.topics.values_mut() {
            t.subscribed = false;
            t.version.send_modify(|v| *v += 1);
        }
    }

    /// Unsubscribe threads nobody watched for [`LINGER`] and drop their tails.
    async fn prune(&self) {
        let (gone, sink) = {
            let mut st = self.lock();
            let now = Instant::now();
            let gone: Vec<String> = st
                .topics
                .iter()
                .filter(|(_, t)| t.refs == 0 && t.idle_since.is_some_and(|i| now - i >= LINGER))
                .map(|(c, _)| c.clone())
                .collect();
            for c in &gone {
                st.topics.remove(c);
            }
            st.tails.retain(|_, (c, _)| !gone.contains(c));
            (gone, st.sink.clone())
        };
        if let (false, Some(mut sink)) = (gone.is_empty(), sink) {
            let _ = sink.unsubscribe(&gone).await;
        }
    }

    /// Drive the pub/sub connection for ever: connect, subscribe to the control channel and
    /// every watched thread, dispatch notifications; on loss, reset and reconnect.
    pub async fn run(
        self: Arc<Self>,
        client: redis::Client,
        connect_timeout: Duration,
        control: mpsc::UnboundedSender<Control>,
    ) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let connected = tokio::time::timeout(connect_timeout, client.get_async_pubsub()).await;
            let pubsub = match connected {
                Ok(Ok(p)) => p,
                _ => {
                    crate::metrics::REDIS_ERRORS.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let (mut sink, mut stream) = pubsub.split();
            if sink.subscribe(&self.control_channel).await.is_err() {
                tokio::time::sleep(backoff).await;
                continue;
            }
            let channels: Vec<String> = self.lock().topics.keys().cloned().collect();
            if !channels.is_empty() && sink.subscribe(&channels).await.is_err() {
                tokio::time::sleep(backoff).await;
                continue;
            }
            backoff = Duration::from_millis(50);
            self.reset(Some(sink));
            {
                let mut st = self.lock();
                for c in &channels {
                    if let Some(t) = st.topics.get_mut(c) {
                        t.subscribed = true;
                    }
                }
            }
            self.up.send_replace(true);
            let mut prune = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(msg) => {
                            let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
                            self.dispatch(msg.get_channel_name(), payload, &control);
                        }
                        None => break,
                    },
                    _ = prune.tick() => self.prune().await,
                }
            }
            crate::metrics::REDIS_ERRORS.inc();
            log::warn!("redis notifications connection lost; reconnecting");
            self.reset(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(first: u64, last: u64, status: &str, n: usize) -> Note {
        let payloads: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("e{}", first + i as u64).into_bytes())
            .collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        wire::decode(&Bytes::from(wire::encode("r", status, first, last, &refs))).unwrap()
    }

    #[test]
    fn a_tail_serves_contiguous_events_and_knows_when_there_are_none() {
        let mut t = Tail::default();
        t.merge_state(3, RunStatus::InProgress);
        t.merge(&note(4, 5, "in_progress", 2), 10);
        t.merge(&note(6, 6, "in_progress", 1), 10);
        let seqs = |v: Vec<Event>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(t.read(3, 10, 1 << 20).unwrap()), vec![4, 5, 6]);
        assert_eq!(seqs(t.read(5, 10, 1 << 20).unwrap()), vec![6]);
        assert!(t.read(6, 10, 1 << 20).unwrap().is_empty());
        // Before what the tail holds: the log must be read.
        assert!(t.read(1, 10, 1 << 20).is_none());
    }

    #[test]
    fn a_gap_drops_the_cached_events_and_a_terminal_status_stays() {
        let mut t = Tail::default();
        t.merge_state(0, RunStatus::InProgress);
        t.merge(&note(1, 2, "in_progress", 2), 10);
        t.merge(&note(5, 5, "in_progress", 1), 10);
        assert!(t.read(2, 10, 1 << 20).is_none());
        t.merge(&note(6, 6, "completed", 1), 10);
        t.merge_state(6, RunStatus::InProgress);
        assert_eq!(t.status, Some(RunStatus::Completed));
    }

    #[test]
    fn a_tail_keeps_at_most_its_share() {
        let mut t = Tail::default();
        t.merge_state(0, RunStatus::InProgress);
        t.merge(&note(1, 5, "in_progress", 5), 3);
        assert_eq!(t.events.len(), 3);
        assert!(t.read(0, 10, 1 << 20).is_none());
        assert_eq!(t.read(2, 10, 1 << 20).unwrap().len(), 3);
    }
}
