//! Where verification keys come from, and keeping them fresh: a JWKS fetched over HTTP(S) or read
//! from a file, or an HS256 secret. Keys are cached for `auth.jwks_ttl`; a token with an unknown
//! `kid` triggers at most one refetch per `auth.jwks_refetch_cooldown`, shared by all requests;
//! refreshes are single-flight (concurrent callers wait for the one fetch); a failed refresh keeps
//! the old keys. Key rotation therefore works without a restart.
//!
//! Requests never wait on a routine refresh: stale keys keep serving while one background task
//! fetches new ones. Only the very first load is waited for, and after it fails requests are
//! refused at once (503) until the cooldown passes, rather than queueing behind fetches.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::connectors::http::Connector;

use super::keys::KeySet;
use crate::client;
use crate::config::UpstreamUrl;

/// Most keys kept from one JWKS.
const MAX_KEYS: usize = 64;
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Where keys come from.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// A JWKS URL.
    Url(UpstreamUrl),
    /// A JWKS file.
    File(PathBuf),
    /// An HS256 secret (development only).
    Secret(Vec<u8>),
}

/// Timing of refreshes.
#[derive(Clone, Copy, Debug)]
pub struct KeyTiming {
    /// Keys are refetched after this long.
    pub ttl: Duration,
    /// At most one unknown-`kid` refetch per this period.
    pub cooldown: Duration,
    /// Fetch timeout.
    pub fetch_timeout: Duration,
}

struct Loaded {
    keys: Arc<KeySet>,
    /// When these keys should next be refreshed.
    refresh_at: Instant,
}

/// The current key set and its refresh policy.
pub struct KeyStore {
    source: KeySource,
    timing: KeyTiming,
    loaded: RwLock<Option<Loaded>>,
    last_forced: Mutex<Option<Instant>>,
    refreshing: tokio::sync::Mutex<()>,
    /// Bumped by every successful load, so a waiter can tell someone else refreshed.
    generation: std::sync::atomic::AtomicU64,
    /// A background refresh is under way.
    background: std::sync::atomic::AtomicBool,
    /// With no keys loaded: no new attempt before this instant (after a failure).
    retry_at: Mutex<Option<Instant>>,
    connector: Connector,
}

impl KeyStore {
    /// A store that loads lazily, on first use.
    pub fn new(source: KeySource, timing: KeyTiming) -> Self {
        KeyStore {
            source,
            timing,
            loaded: RwLock::new(None),
            last_forced: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
            background: std::sync::atomic::AtomicBool::new(false),
            retry_at: Mutex::new(None),
            connector: Connector::new(None),
        }
    }

    fn fresh(&self) -> Option<Arc<KeySet>> {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        loaded
            .as_ref()
            .filter(|l| Instant::now() < l.refresh_at)
            .map(|l| l.keys.clone())
    }

    fn any(&self) -> Option<Arc<KeySet>> {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        loaded.as_ref().map(|l| l.keys.clone())
    }

    /// The keys to verify with. Fresh ones as they are; stale ones while a background task
    /// refreshes them; with none loaded yet, a load is waited for. `None` when no keys could be
    /// loaded (and, after a failure, until the cooldown passes).
    pub async fn current(self: &Arc<Self>) -> Option<Arc<KeySet>> {
        use std::sync::atomic::Ordering;
        if let Some(keys) = self.fresh() {
            return Some(keys);
        }
        if let Some(stale) = self.any() {
            if !self.background.swap(true, Ordering::AcqRel) {
                let this = self.clone();
                tokio::spawn(async move {
                    this.refresh(false).await;
                    this.background.store(false, Ordering::Release);
                });
            }
            return Some(stale);
        }
        if self.backing_off() {
            return None;
        }
        self.refresh(false).await
    }

    fn backing_off(&self) -> bool {
        let wait = *self.retry_at.lock().unwrap_or_else(|p| p.into_inner());
        wait.is_some_and(|t| Instant::now() < t)
    }

    /// A token named a `kid` we do not have: refetch, unless another refetch happened within the
    /// cooldown. Returns the new keys when a refetch happened and succeeded.
    pub async fn refetch_for_unknown_kid(&self) -> Option<Arc<KeySet>> {
        {
            let mut last = self.last_forced.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.timing.cooldown) {
                return None;
            }
            *last = Some(Instant::now());
        }
        self.refresh(true).await
    }

    async fn refresh(&self, forced: bool) -> Option<Arc<KeySet>> {
        use std::sync::atomic::Ordering;
        let seen = self.generation.load(Ordering::Acquire);
        let _one_at_a_time = self.refreshing.lock().await;
        // Someone else refreshed while we waited for the lock: use their keys.
        if self.generation.load(Ordering::Acquire) != seen {
            return self.any();
        }
        if !forced {
            if let Some(keys) = self.fresh() {
                return Some(keys);
            }
            // A load failed while we waited: do not queue another fetch behind it.
            if self.any().is_none() && self.backing_off() {
                return None;
            }
        }
        match self.load().await {
            Ok(keys) => {
                let keys = Arc::new(keys);
                self.generation.fetch_add(1, Ordering::AcqRel);
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Some(Loaded {
                    keys: keys.clone(),
                    refresh_at: Instant::now() + self.timing.ttl,
                });
                Some(keys)
            }
            Err(e) => {
                log::warn!("cannot load verification keys: {e}; keeping the previous keys");
                let mut loaded = self.loaded.write().unwrap_or_else(|p| p.into_inner());
                // Keep the old keys, and try again after the cooldown rather than on every request.
                let next = Instant::now() + self.timing.cooldown.min(self.timing.ttl);
                match loaded.as_mut() {
                    Some(l) => l.refresh_at = next,
                    None => *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(next),
                }
                drop(loaded);
                if forced {
                    None
                } else {
                    self.any()
                }
            }
        }
    }

    async fn load(&self) -> Result<KeySet, String> {
        let bytes = match &self.source {
            KeySource::Secret(secret) => {
                return KeySet::from_hs256_secret(secret).map_err(|e| e.to_string())
            }
            KeySource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?,
            KeySource::Url(url) => self.fetch(url).await?,
        };
        KeySet::from_jwks(&bytes, MAX_KEYS).map_err(|e| e.to_string())
    }

    async fn fetch(&self, url: &UpstreamUrl) -> Result<Vec<u8>, String> {
        let limit = self.timing.fetch_timeout;
        let fetch = async {
            let mut http = client::send(
                &self.connector,
                &UpstreamUrl {
                    base_path: String::new(),
                    ..url.clone()
                },
                limit,
                "GET",
                &url.base_path,
                &[("accept", "application/json".to_string())],
                Bytes::new(),
            )
            .await
            .map_err(|e| e.to_string())?;
            http.read_response_header()
                .await
                .map_err(|e| e.to_string())?;
            let status = http.response_header().map_or(0, |h| h.status.as_u16());
            if status != 200 {
                return Err(format!("{url} answered HTTP {status}"));
            }
            client::read_body(&mut http, MAX_JWKS_BYTES, limit)
                .await
                .ok_or_else(|| format!("{url}: body unreadable or over {MAX_JWKS_BYTES} bytes"))
        };
        tokio::time::timeout(limit, fetch).await.map_err(|_| {
            format!(
                "{url}: no answer within {}",
                humantime::format_duration(limit)
            )
        })?
    }
}
