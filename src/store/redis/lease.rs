//! Leases over time: renewing the ones this instance holds, giving them up on drain, taking
//! over runs whose ingesting instance went away, and the retention sweep.
//!
//! Renewal runs every `lease_renew`. A lease Redis refuses to renew (fenced, ended, gone) is
//! dropped and its ingestion cancelled; a lease that could not be renewed for `lease_ttl`
//! (Redis unreachable) is given up the same way, since another instance may hold it by then.
//! The scan runs every `takeover_scan` (with jitter): runs in `P:live` whose deadline passed are
//! taken over one by one with the takeover script, which checks the deadline again against
//! Redis's clock and bumps the epoch.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{scripts, Lease, RedisStore};
use crate::store::{Adopted, Control, RunId, Store};

/// Runs taken over per scan, at most.
const TAKEOVERS_PER_SCAN: usize = 32;

/// The store's lease loop, for as long as the store lives.
pub(super) async fn run(store: Weak<RedisStore>) {
    let (renew_every, scan_every) = match store.upgrade() {
        Some(s) => (s.s.lease_renew, s.s.takeover_scan),
        None => return,
    };
    let mut renew = tokio::time::interval(renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_scan = tokio::time::Instant::now() + jitter(scan_every);
    loop {
        tokio::select! {
            _ = renew.tick() => {
                let Some(s) = store.upgrade() else { return };
                renew_all(&s).await;
            }
            _ = tokio::time::sleep_until(next_scan) => {
                let Some(s) = store.upgrade() else { return };
                scan(&s).await;
                next_scan = tokio::time::Instant::now() + jitter(scan_every);
            }
        }
    }
}

/// `every` ± 20 %, so instances do not scan in step.
fn jitter(every: Duration) -> Duration {
    let spread = every.as_millis() as u64 / 5;
    let r = uuid::Uuid::new_v4().as_u128() as u64;
    every - Duration::from_millis(spread) + Duration::from_millis(r % (2 * spread + 1))
}

async fn renew_all(s: &Arc<RedisStore>) {
    let held: Vec<(RunId, super::Held)> = s
        .leases
        .iter()
        .map(|e| (e.key().clone(), e.value().clone()))
        .collect();
    let ttl = s.s.lease_ttl.as_millis().to_string();
    let tasks = held.into_iter().map(|(run, held)| {
        let ttl = ttl.clone();
        async move {
            let (epoch, renewed) = {
                let l = held.lock().await;
                (l.epoch.clone(), l.renewed)
            };
            let r = s
                .eval(
                    &scripts::RENEW,
                    &[
                        run.0.as_bytes(),
                        s.instance.as_bytes(),
                        epoch.as_bytes(),
                        ttl.as_bytes(),
                    ],
                )
                .await;
            match r.as_ref().ok().and_then(|r| r.first()).map(String::as_str) {
                Some("ok") => held.lock().await.renewed = Instant::now(),
                Some("terminal") | Some("norun") => {
                    // Ended elsewhere (a stop): ingestion here stops.
                    s.drop_lease(&run, &held);
                    let _ = s.control_tx.send(Control::Cancel(run));
                }
                Some(_) => s.lost(&run, &held),
                None if renewed.elapsed() >= s.s.lease_ttl => {
                    log::warn!("run {run}: lease not renewed for its whole term; giving it up");
                    s.lost(&run, &held);
                }
                None => {}
            }
        }
    });
    futures_util::future::join_all(tasks).await;
}

async fn scan(s: &Arc<RedisStore>) {
    if s.draining.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    let now = super::now_ms();
    let due = due(s, "live", now, TAKEOVERS_PER_SCAN).await;
    for rid in due {
        let run = RunId(rid);
        if s.leases.contains_key(&run) {
            // Ours, and being renewed (or given up) by the renewal loop.
            continue;
        }
        if let Err(e) = take_over(s, &run).await {
            log::warn!("run {run}: takeover failed: {e}");
        }
    }
}

async fn take_over(s: &Arc<RedisStore>, run: &RunId) -> Result<(), crate::store::StoreError> {
    let ttl = s.s.lease_ttl.as_millis().to_string();
    let r = s
        .eval(
            &scripts::TAKEOVER,
            &[run.0.as_bytes(), s.instance.as_bytes(), ttl.as_bytes()],
        )
        .await?;
    if r.first().map(String::as_str) != Some("acquired") || r.len() != 7 {
        return Ok(());
    }
    let info = s.run(run).await?;
    let lease = Lease {
        epoch: r[1].clone(),
        last: info.last_seq,
        renewed: Instant::now(),
    };
    s.leases
        .insert(run.clone(), Arc::new(tokio::sync::Mutex::new(lease)));
    s.threads_of.insert(run.clone(), info.thread_id.0.clone());
    crate::metrics::STORE_TAKEOVERS.inc();
    log::info!(
        "run {run}: taken over at seq {} (epoch {})",
        info.last_seq,
        r[1]
    );
    let mark = (r[3] == "1").then(|| r[4].clone());
    let job = (r[5] == "1")
        .then(|| serde_json::from_str(&r[6]).ok())
        .flatten();
    let adopted = Adopted {
        run: info,
        job,
        mark,
    };
    if s.control_tx
        .send(Control::Adopt(Box::new(adopted)))
        .is_err()
    {
        // Nobody ingests here (no receiver): hand it back at once.
        release_one(s, run).await;
    }
    Ok(())
}

async fn release_one(s: &RedisStore, run: &RunId) {
    let Some((_, held)) = s.leases.remove(run) else {
        return;
    };
    let epoch = held.lock().await.epoch.clone();
    let _ = s
        .eval(
            &scripts::RELEASE,
            &[run.0.as_bytes(), s.instance.as_bytes(), epoch.as_bytes()],
        )
        .await;
}

/// Give every lease up (drain) and cancel the ingestion of those runs here.
pub(super) async fn release_all(s: &RedisStore) {
    s.draining.store(true, std::sync::atomic::Ordering::Release);
    let runs: Vec<RunId> = s.leases.iter().map(|e| e.key().clone()).collect();
    for run in runs {
        release_one(s, &run).await;
        let _ = s.control_tx.send(Control::Cancel(run));
    }
}

/// Members of the index `P:<index>` scored at most `until` (ms), at most `max` of them (none
/// when Redis cannot be reached: the next round tries again).
async fn due(s: &RedisStore, index: &str, until: u64, max: usize) -> Vec<String> {
    let found = redis::cmd("ZRANGEBYSCORE")
        .arg(format!("{}:{index}", s.s.prefix))
        .arg("-inf")
        .arg(until)
        .arg("LIMIT")
        .arg(0)
        .arg(max)
        .query_async(&mut s.conn())
        .await;
    found.unwrap_or_else(|e| {
        log::debug!("reading {index} failed: {e}");
        crate::metrics::REDIS_ERRORS.inc();
        Vec::new()
    })
}

/// Evict finished runs past retention and forget thread records past thread retention.
pub(super) async fn sweep(s: &RedisStore) -> usize {
    let now = super::now_ms();
    let cutoff = |keep: Duration| now.saturating_sub(keep.as_millis() as u64);
    let done = due(s, "done", cutoff(s.s.retention), 1000).await;
    let mut n = 0;
    for rid in done {
        if let Ok(r) = s.eval(&scripts::EVICT, &[rid.as_bytes()]).await {
            if r.first().map(String::as_str) == Some("1") {
                n += 1;
            }
        }
    }
    crate::metrics::STORE_EVICTIONS
        .with_label_values(&["retention"])
        .inc_by(n as u64);
    let emptied = due(s, "emptied", cutoff(s.s.thread_retention), 1000).await;
    for tid in emptied {
        let _ = s.eval(&scripts::FORGET_THREAD, &[tid.as_bytes()]).await;
    }
    n
}
