//! Server wiring: turns a [`Config`] into Pingora services (client API, admin, housekeeping) and
//! runs them. `main.rs` only parses the command line and calls in here.

pub mod admin;
pub mod connections;
pub mod exchange;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tokio::sync::watch;

use crate::api::views::Views;
use crate::api::{Api, Exchange};
use crate::config::Config;
use crate::config::StoreBackend;
use crate::ingest::route::Routes;
use crate::ingest::Ingestor;
use crate::metrics;
use crate::store::budget::{Budget, Part, QuotaKind};
use crate::store::memory::{MemoryLimits, MemoryStore};
use crate::store::redis::{RedisSettings, RedisStore};
use crate::store::{Control, Store};
use exchange::{Local, LocalApp};

/// Resolve `host:0` to a concrete free port so it can be announced (Pingora binds by address
/// string and does not report the port it got).
///
/// The port is probed (bound, then released for Pingora to bind), so another process probing at
/// the same moment could be handed the same one. To make that unlikely the probe picks random
/// ports below the kernel's ephemeral range (which outgoing connections also draw from), and
/// falls back to the kernel's choice.
pub fn resolve_listen(addr: &str) -> std::io::Result<SocketAddr> {
    use std::hash::{BuildHasher, Hasher};
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, addr.to_string()))?;
    if parsed.port() != 0 {
        return Ok(parsed);
    }
    const RANGE: std::ops::Range<u16> = 20_000..32_000;
    for _ in 0..64 {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = RANGE.start + (random % u64::from(RANGE.end - RANGE.start)) as u16;
        let candidate = SocketAddr::new(parsed.ip(), port);
        if TcpListener::bind(candidate).is_ok() {
            return Ok(candidate);
        }
    }
    let probe = TcpListener::bind(parsed)?;
    probe.local_addr()
}

/// A Pingora server configured from ours (threads, grace periods).
pub fn new_server(config: &Config) -> Server {
    return_large_blocks();
    let conf = ServerConf {
        threads: config.server.threads,
        // One single-threaded runtime per thread, as nginx has one event loop per worker: a
        // connection, its stream and the ingestion it starts stay on one thread, so an event
        // goes from the backend's socket to the client's without waking another thread.
        work_stealing: false,
        grace_period_seconds: Some(config.server.grace_period.0.as_secs()),
        graceful_shutdown_timeout_seconds: Some(
            config.server.graceful_shutdown_timeout.0.as_secs().max(1),
        ),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    server
}

/// Allocations of 128 KiB and more (user messages, large events, request bodies) are mapped
/// on their own and given back to the system when freed. glibc's default raises that threshold
/// as such blocks are freed, after which they come from its heaps and stay resident after the
/// store evicted them: under churn of large messages the process then holds far more than the
/// memory budget counts (about 9 MiB more in the flood test at a 24 MiB budget).
fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets an allocator parameter; it is called before any thread of
    // ours starts allocating large blocks, and a refused value changes nothing.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Where the gateway listens.
#[derive(Clone, Copy, Debug)]
pub struct Listening {
    /// Client API.
    pub api: SocketAddr,
    /// Admin.
    pub admin: SocketAddr,
}

#[async_trait]
impl LocalApp for Api {
    async fn handle(&self, ex: &mut dyn Exchange) -> &'static str {
        Api::handle(self, ex).await
    }
    fn records_metrics(&self) -> bool {
        true
    }
    fn bodies(&self) -> Option<crate::api::quota::Bodies> {
        Some(self.bodies.clone())
    }
}

/// Add the gateway's services (client API, admin, housekeeping) to `server`; `page` is served
/// at the API's root (the demo's chat page).
pub fn add_gateway(
    server: &mut Server,
    config: Config,
    page: Option<bytes::Bytes>,
) -> std::io::Result<Listening> {
    metrics::init(&metrics::LabelSets {
        run_statuses: &crate::store::RunStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .map(crate::store::RunStatus::as_str)
            .collect::<Vec<_>>(),
        auth_failures: crate::auth::AuthError::REASONS,
        upstream_errors: &crate::ingest::Failure::KINDS,
        held_parts: &Part::ALL.map(Part::as_str),
        quotas: &QuotaKind::ALL.map(QuotaKind::as_str),
    });
    let api_addr = resolve_listen(&config.server.listen)?;
    let admin_addr = resolve_listen(&config.server.admin_listen)?;
    let config = Arc::new(config);
    let quotas = config.limits.quotas();
    let budget = Arc::new(Budget::new(config.limits.max_total_bytes));
    let store = open_store(&config, quotas.clone(), budget.clone())?;
    let shared = config.store.backend == StoreBackend::Redis;
    let adapter = Arc::new(Routes::from_config(&config));
    let ingest = Ingestor::new(store.clone(), adapter, config.upstream.run_timeout.0);
    let views = Arc::new(Views::with_budget(budget.clone()));
    let control = store.control();
    let (draining_tx, draining_rx) = watch::channel(false);
    let (cut_tx, cut_rx) = watch::channel(false);
    let api = Arc::new(Api {
        config: config.clone(),
        store: store.clone(),
        ingest: ingest.clone(),
        shutdown: draining_rx.clone(),
        cut: cut_rx,
        auth: crate::auth::Authenticator::from_config(&config.auth),
        views: views.clone(),
        gates: crate::api::quota::Gates::new(quotas),
        bodies: crate::api::quota::Bodies::new(config.limits.max_body_bytes_in_flight),
        page,
        cors: crate::api::cors::Cors::new(&config.server.cors_origins),
    });

    let proxy = pingora::proxy::http_proxy(&server.configuration, Local(api));
    let mut api_service = Service::new(
        "sluice api".to_string(),
        connections::Capped::new(proxy, config.server.max_connections),
    );
    // No read buffer under Pingora's own: it reads request heads into its own buffer, and a
    // 64 KiB one (the default, zero-filled) would be most of an idle connection's memory.
    api_service.add_listener(
        ListenerConfig::tcp(api_addr.to_string())
            .l4_buffer(L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE)),
    );
    server.add_service(api_service);

    let mut admin = Service::new(
        "sluice admin".to_string(),
        pingora::apps::http_app::HttpServer::new_app(admin::AdminApp {
            shutdown: draining_rx,
            budget: budget.clone(),
            store: store.clone(),
            token: Some(config.server.admin_token.0.clone()).filter(|t| !t.is_empty()),
        }),
    );
    admin.add_tcp(&admin_addr.to_string());
    server.add_service(admin);

    server.add_service(background_service(
        "sluice housekeeping",
        Housekeeping {
            store,
            views,
            ingest,
            control: std::sync::Mutex::new(control),
            draining: draining_tx,
            cut: cut_tx,
            // With a shared store the runs go on elsewhere: streams are cut at once, so that
            // their clients resume on another instance.
            cut_after: if shared {
                Duration::ZERO
            } else {
                cut_after(config.server.grace_period.0)
            },
            sweep_every: config
                .store
                .retention
                .0
                .clamp(Duration::from_millis(100), Duration::from_secs(5)),
        },
    ));
    Ok(Listening {
        api: api_addr,
        admin: admin_addr,
    })
}

/// The store `[store]` asks for: the embedded one, or the shared one in Redis (connected now,
/// so that a wrong URL or an unreachable Redis stops the start with a clear error).
fn open_store(
    config: &Config,
    quotas: crate::store::budget::Quotas,
    budget: Arc<Budget>,
) -> std::io::Result<Arc<dyn Store>> {
    let limits = &config.limits;
    Ok(match config.store.backend {
        StoreBackend::Memory => Arc::new(MemoryStore::with_budget(
            MemoryLimits {
                max_events_per_run: limits.max_events_per_run,
                max_bytes_per_run: limits.max_bytes_per_run,
                max_total_bytes: limits.max_total_bytes,
                retention: config.store.retention.0,
                thread_retention: config.store.thread_retention.0,
                retry_after: config.store.full_retry_after.0,
                quotas,
            },
            budget,
        )),
        StoreBackend::Redis => {
            let r = &config.store.redis;
            let settings = RedisSettings {
                url: r.url.0.clone(),
                prefix: r.key_prefix.clone(),
                connect_timeout: r.connect_timeout.0,
                response_timeout: r.response_timeout.0,
                lease_ttl: r.lease_ttl.0,
                lease_renew: r.lease_renew.0,
                takeover_scan: r.takeover_scan.0,
                tail_events: r.tail_events,
                max_events_per_run: limits.max_events_per_run,
                max_bytes_per_run: limits.max_bytes_per_run,
                retention: config.store.retention.0,
                thread_retention: config.store.thread_retention.0,
                retry_after: config.store.full_retry_after.0,
                quotas,
            };
            RedisStore::connect(settings, budget).map_err(std::io::Error::other)?
        }
    })
}

/// How long after the drain starts open streams are cut: just before Pingora's grace period
/// (`grace_period_seconds`, whole seconds) ends and it drops the services' runtimes, which would
/// drop the streams' tasks mid-write. The margin leaves time to abort them in order.
pub fn cut_after(grace_period: Duration) -> Duration {
    const MARGIN: Duration = Duration::from_millis(250);
    Duration::from_secs(grace_period.as_secs()).saturating_sub(MARGIN)
}

/// Sweeps expired runs and tells the API when the process drains and when its streams are cut.
///
/// Pingora fires the services' `ShutdownWatch` at SIGTERM, at the *start* of its grace period,
/// then sleeps `grace_period_seconds`, then shuts the runtimes down. So at SIGTERM `draining`
/// becomes true (new requests get 503, held long-polls answer, open streams go on until their
/// run ends) and `cut_after` later `cut` does (streams still open are aborted).
struct Housekeeping {
    store: Arc<dyn Store>,
    views: Arc<Views>,
    ingest: Ingestor,
    /// What the store asks of this instance's ingestion (a shared store only).
    control: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Control>>>,
    draining: watch::Sender<bool>,
    cut: watch::Sender<bool>,
    cut_after: Duration,
    sweep_every: Duration,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.sweep_every);
        let control = self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut control = control.unwrap_or_else(|| tokio::sync::mpsc::unbounded_channel().1);
        loop {
            tokio::select! {
                Some(asked) = control.recv() => match asked {
                    Control::Cancel(run) => self.ingest.cancel(&run),
                    Control::Adopt(adopted) => self.ingest.adopt(*adopted),
                },
                _ = tick.tick() => {
                    self.store.sweep().await;
                    let held = self
                        .views
                        .prune(self.store.as_ref(), crate::api::views::VIEW_IDLE)
                        .await;
                    metrics::VIEW_BYTES.set(held as i64);
                }
                _ = shutdown.changed() => {
                    log::info!(
                        "draining: new requests are refused; open streams are cut in {:?} \
                         unless their runs end first",
                        self.cut_after
                    );
                    self.draining.send_replace(true);
                    // A shared store's runs are handed to other instances at once.
                    self.store.release().await;
                    while let Ok(asked) = control.try_recv() {
                        if let Control::Cancel(run) = asked {
                            self.ingest.cancel(&run);
                        }
                    }
                    tokio::time::sleep(self.cut_after).await;
                    log::info!("grace period ending: cutting open streams");
                    self.cut.send_replace(true);
                    return;
                }
            }
        }
    }
}

/// Add a local app (e.g. the mock agent) on its own listener.
pub fn add_local_app<A: LocalApp>(
    server: &mut Server,
    name: &str,
    app: A,
    listen: &str,
) -> std::io::Result<SocketAddr> {
    let addr = resolve_listen(listen)?;
    let mut service = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Local(Arc::new(app)),
        name,
    );
    service.add_tcp(&addr.to_string());
    server.add_service(service);
    Ok(addr)
}
