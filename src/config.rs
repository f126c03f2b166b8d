//! Configuration: the TOML schema, its defaults, and validation into a typed [`Config`].
//!
//! Every key lives in `config/sluice.toml` with its default and a one-line comment (a unit test
//! keeps the two in step). Unknown keys and bad values are refused with a message naming the key.
//! Durations are humantime strings (`"30s"`, `"15m"`); sizes are plain integers whose key ends
//! in `_bytes`. Nothing here does I/O except [`Config::load`] reading the file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::store::budget::{OrgQuota, Quotas};

/// A configuration problem, naming the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A key has a value that parses but is not acceptable.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// Dotted key, e.g. `limits.max_body_bytes`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// A duration written as a humantime string (`"250ms"`, `"30s"`, `"1h"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!("`{s}` is not a duration ({e}); write e.g. \"30s\""))
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and process settings.
    #[serde(default)]
    pub server: ServerSection,
    /// Client authentication. Required: there is no implicit default.
    pub auth: AuthSection,
    /// The agent backend(s).
    #[serde(default)]
    pub upstream: UpstreamSection,
    /// Size limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// The run store.
    #[serde(default)]
    pub store: StoreSection,
    /// Client streams.
    #[serde(default)]
    pub stream: StreamSection,
}

/// `[server]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Client API listener (`host:port`; port 0 picks a free port, announced on stdout).
    pub listen: String,
    /// Admin listener: `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: String,
    /// When set, `/metrics` on the admin listener needs `Authorization: Bearer <admin_token>`
    /// (`/healthz` and `/readyz` stay open for load balancers).
    pub admin_token: Secret,
    /// Worker threads per service.
    pub threads: usize,
    /// On SIGTERM, how long to keep serving before stopping.
    pub grace_period: Dur,
    /// Then, how long running work may take to finish.
    pub graceful_shutdown_timeout: Dur,
    /// Most client connections open on the API listener at once; one more is answered
    /// `503 overloaded` and closed.
    pub max_connections: usize,
    /// After an answer, how long Sluice spends reading the rest of a request body it did not
    /// need (to keep the connection); past it, the connection is closed.
    pub drain_timeout: Dur,
    /// Browser apps on these origins (`https://app.example.com`, or `*` for any) may call the
    /// API (CORS); none by default.
    pub cors_origins: Vec<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            admin_token: Secret::default(),
            threads: 2,
            grace_period: Dur(Duration::from_secs(1)),
            graceful_shutdown_timeout: Dur(Duration::from_secs(5)),
            max_connections: 16_384,
            drain_timeout: Dur(Duration::from_secs(5)),
            cors_origins: Vec::new(),
        }
    }
}

/// How clients are authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Clerk-style JWTs (`Authorization: Bearer …`), verified on every request.
    Jwt,
    /// No authentication: every request is attributed to the development organisation.
    /// Logged as a warning at start-up.
    Disabled,
}

/// A secret that never shows in `sluice check`, logs or debug output.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// Whether a value was given.
    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.is_set() { "<redacted>" } else { "" })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() {
            "Secret(<redacted>)"
        } else {
            "Secret(<empty>)"
        })
    }
}

/// `[auth]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// `"jwt"` or `"disabled"`. Must be given explicitly: there is no default.
    pub mode: AuthMode,
    /// Required `iss` (Clerk: the Frontend API URL, e.g. `https://x.clerk.accounts.dev`).
    #[serde(default)]
    pub issuer: String,
    /// JWKS URL to fetch the verification keys from: https, or http to a loopback host (or
    /// anywhere with `allow_insecure_jwks`).
    #[serde(default)]
    pub jwks_url: String,
    /// Accept a `jwks_url` over plain http to a host that is not loopback. Anyone on that path
    /// could serve keys and mint tokens for every organisation; logged at start-up.
    #[serde(default)]
    pub allow_insecure_jwks: bool,
    /// Or a JWKS file to read them from.
    #[serde(default)]
    pub jwks_file: String,
    /// Or, for development only, an HS256 shared secret.
    #[serde(default)]
    pub hs256_secret: Secret,
    /// Accepted `aud` values; empty means `aud` is not checked.
    #[serde(default)]
    pub audience: Vec<String>,
    /// Accepted `azp` values (the browser origins); empty means `azp` is not checked.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Organisation role a caller must have.
    #[serde(default = "default_role")]
    pub required_role: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway: Dur,
    /// How long fetched keys are used before they are fetched again.
    #[serde(default = "default_jwks_ttl")]
    pub jwks_ttl: Dur,
    /// A token with an unknown `kid` triggers at most one refetch per this period.
    #[serde(default = "default_refetch_cooldown")]
    pub jwks_refetch_cooldown: Dur,
    /// Time allowed to fetch the JWKS.
    #[serde(default = "default_fetch_timeout")]
    pub jwks_fetch_timeout: Dur,
    /// Verified tokens remembered (by hash, until they expire) so polls skip signature checks.
    #[serde(default = "default_token_cache")]
    pub token_cache_size: usize,
    /// Forward the caller's bearer token to the backend (besides the X-Sluice-* headers).
    #[serde(default)]
    pub forward_token: bool,
    /// Optional map organisation id → agent ids it may use; other agents answer 404.
    /// Organisations not listed may use any agent (the backend decides).
    #[serde(default)]
    pub org_agents: std::collections::BTreeMap<String, Vec<String>>,
    /// Organisation that requests are attributed to when auth is disabled.
    #[serde(default = "default_dev_org")]
    pub dev_organization: String,
    /// User that requests are attributed to when auth is disabled.
    #[serde(default = "default_dev_user")]
    pub dev_user: String,
}

fn default_role() -> String {
    "org:admin".into()
}
fn default_leeway() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_jwks_ttl() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_refetch_cooldown() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_fetch_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_token_cache() -> usize {
    10_000
}

fn default_dev_org() -> String {
    "org_dev".into()
}
fn default_dev_user() -> String {
    "user_dev".into()
}

/// The protocol an agent backend speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamDialect {
    /// AgentFlow: `POST /agents/{id}/run`, answered with AgentFlow SSE events.
    Agentflow,
    /// Dialect A streaming: `POST {invoke_path}`, answered with the AI SDK UI-message stream.
    UiMessage,
    /// Dialect A without streaming: `POST {invoke_path}` with `X-Stream-Response: false`, then
    /// `GET {conversation_path}?threadId=` until the run ends.
    Poll,
}

/// Which conversation id an AgentFlow backend is sent for a dialect-B run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConversationIds {
    /// Sluice's thread id (a UUID, unique per organisation): two organisations that choose the
    /// same `conversation_id` never reach one backend conversation.
    #[default]
    Thread,
    /// The client's own `conversation_id`, unchanged: only for backends that scope
    /// conversations by the `X-Sluice-Org-Id` header themselves.
    Client,
}

/// `[upstream]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    /// Base URL(s) of the agent backend; several are used in turn (round robin).
    pub urls: Vec<String>,
    /// What the backend speaks: `agentflow`, `ui-message` or `poll`.
    pub dialect: UpstreamDialect,
    /// Time allowed to open a connection to the backend.
    pub connect_timeout: Dur,
    /// A run whose backend stays silent this long ends with `timeout` (for `poll`: the longest
    /// a single request may take).
    pub idle_timeout: Dur,
    /// A run that lasts longer than this ends with `timeout`.
    pub run_timeout: Dur,
    /// Largest single SSE event accepted from the backend; a larger one ends the run with `error`.
    pub max_event_bytes: usize,
    /// `ui-message` and `poll`: the backend's invoke route.
    pub invoke_path: String,
    /// `poll`: the backend's conversation route (`?threadId=` is appended).
    pub conversation_path: String,
    /// `poll`: first interval between polls, and the interval after a poll that saw a change.
    pub poll_interval_min: Dur,
    /// `poll`: longest interval between polls.
    pub poll_interval_max: Dur,
    /// `poll`: the interval grows by this factor after each poll that saw no change.
    pub poll_backoff: f64,
    /// `poll`: a run still in progress after this long ends with `timeout` (`run_timeout`
    /// applies too: the shorter wins).
    pub poll_timeout: Dur,
    /// `poll`: most requests in flight at once to one backend (or route), over all its runs.
    pub poll_max_connections: usize,
    /// `poll`: this many failed polls in a row end the run with `error`.
    pub poll_max_failures: u32,
    /// `poll`: the largest conversation snapshot read from the backend (a larger one fails the
    /// poll); with `poll_max_connections`, it bounds what polls in flight hold.
    pub poll_max_snapshot_bytes: usize,
    /// Other backends for some agents: the first route whose `agents` matches the agent id
    /// takes the run; other agents go to `urls`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<UpstreamRoute>,
    /// `POST /agents/{id}/run`: the `conversation_id` the backend sees, `thread` (Sluice's
    /// thread id, scoped per organisation) or `client` (the client's, passed through).
    pub conversation_ids: ConversationIds,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        UpstreamSection {
            urls: vec!["http://127.0.0.1:7070".into()],
            dialect: UpstreamDialect::Agentflow,
            connect_timeout: Dur(Duration::from_secs(5)),
            idle_timeout: Dur(Duration::from_secs(60)),
            run_timeout: Dur(Duration::from_secs(15 * 60)),
            max_event_bytes: 1024 * 1024,
            invoke_path: "/api/invokeAgent".into(),
            conversation_path: "/api/getConversation".into(),
            poll_interval_min: Dur(Duration::from_millis(250)),
            poll_interval_max: Dur(Duration::from_secs(5)),
            poll_backoff: 1.5,
            poll_timeout: Dur(Duration::from_secs(15 * 60)),
            poll_max_connections: 64,
            poll_max_failures: 5,
            poll_max_snapshot_bytes: 16 * 1024 * 1024,
            routes: Vec::new(),
            conversation_ids: ConversationIds::Thread,
        }
    }
}

/// `[[upstream.routes]]`: a backend for the agents matching `agents`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamRoute {
    /// Agent ids, or patterns with `*` (any run of characters), e.g. `["7", "legacy-*"]`.
    pub agents: Vec<String>,
    /// Base URL(s) of this backend.
    pub urls: Vec<String>,
    /// What it speaks.
    pub dialect: UpstreamDialect,
    /// Its invoke route (default: `upstream.invoke_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_path: Option<String>,
    /// Its conversation route (default: `upstream.conversation_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_path: Option<String>,
}

/// Whether agent id `agent` matches `pattern` (`*` matches any run of characters, including
/// none; everything else matches itself). Pure.
pub fn agent_matches(pattern: &str, agent: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = agent.strip_prefix(first) else {
        return false;
    };
    let pieces: Vec<&str> = parts.collect();
    let Some((last, middle)) = pieces.split_last() else {
        return rest.is_empty();
    };
    for piece in middle {
        match rest.find(piece) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// `[limits]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Largest `POST /api/chat` body accepted: the AI SDK sends the whole chat history with
    /// every turn, of which only the last message is kept (the rest is parsed one message at a
    /// time and dropped). Never less than `max_body_bytes`, never more than
    /// `max_body_bytes_in_flight` ([`LimitsSection::chat_body_limit`]).
    pub max_chat_body_bytes: usize,
    /// Most events one run may hold; the run ends with `error` when it would exceed this.
    pub max_events_per_run: u64,
    /// Most payload bytes one run may hold; the run ends with `error` when it would exceed this.
    pub max_bytes_per_run: u64,
    /// Most bytes held in all (event payloads with their overhead, run records with their user
    /// messages, thread records, rendered frames and kept folds); finished runs are evicted
    /// first, then new runs are refused with 503 above 90 %.
    pub max_total_bytes: u64,
    /// Most bytes of request bodies held at once, in all (being read, or until handled); a
    /// body that would pass it is refused with 503 `overloaded`.
    pub max_body_bytes_in_flight: u64,
    /// `[limits.per_org]`: what one organisation may take.
    pub per_org: PerOrgSection,
}

impl LimitsSection {
    /// The largest `POST /api/chat` body: `max_chat_body_bytes`, at least `max_body_bytes`
    /// and at most `max_body_bytes_in_flight`.
    pub fn chat_body_limit(&self) -> usize {
        let in_flight = usize::try_from(self.max_body_bytes_in_flight).unwrap_or(usize::MAX);
        self.max_chat_body_bytes
            .max(self.max_body_bytes)
            .min(in_flight)
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_body_bytes: 1024 * 1024,
            max_chat_body_bytes: 8 * 1024 * 1024,
            max_events_per_run: 100_000,
            max_bytes_per_run: 32 * 1024 * 1024,
            max_total_bytes: 512 * 1024 * 1024,
            max_body_bytes_in_flight: 64 * 1024 * 1024,
            per_org: PerOrgSection::default(),
        }
    }
}

/// `[limits.per_org]`: quotas per organisation, refused with `429 quota_exceeded`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PerOrgSection {
    /// Most runs in progress at once.
    pub max_running_runs: u64,
    /// Most bytes an organisation's runs and threads may hold; a new run at this is refused
    /// once the organisation's own finished runs were evicted to make room. Unset: half of
    /// `limits.max_total_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Most SSE streams open at once, per instance.
    pub max_streams: u64,
    /// Most long-polls waiting at once, per instance.
    pub max_long_polls: u64,
    /// `Retry-After` sent with `429 quota_exceeded`.
    pub retry_after: Dur,
    /// Per-organisation overrides, by organisation id (`[limits.per_org.overrides."org_…"]`);
    /// each key left out takes the value above.
    pub overrides: BTreeMap<String, OrgOverride>,
}

impl Default for PerOrgSection {
    fn default() -> Self {
        PerOrgSection {
            max_running_runs: 1_000,
            max_bytes: None,
            max_streams: 4_096,
            max_long_polls: 4_096,
            retry_after: Dur(Duration::from_secs(5)),
            overrides: BTreeMap::new(),
        }
    }
}

/// One organisation's quotas (`[limits.per_org.overrides."org_…"]`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrgOverride {
    /// See [`PerOrgSection::max_running_runs`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_running_runs: Option<u64>,
    /// See [`PerOrgSection::max_bytes`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// See [`PerOrgSection::max_streams`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u64>,
    /// See [`PerOrgSection::max_long_polls`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_long_polls: Option<u64>,
}

impl LimitsSection {
    /// The quotas, resolved: defaults filled in and overrides applied.
    pub fn quotas(&self) -> Quotas {
        let p = &self.per_org;
        let default = OrgQuota {
            max_running_runs: p.max_running_runs,
            max_bytes: p.max_bytes.unwrap_or(self.max_total_bytes / 2),
            max_streams: p.max_streams,
            max_long_polls: p.max_long_polls,
        };
        let overrides = p
            .overrides
            .iter()
            .map(|(org, o)| {
                let quota = OrgQuota {
                    max_running_runs: o.max_running_runs.unwrap_or(default.max_running_runs),
                    max_bytes: o.max_bytes.unwrap_or(default.max_bytes),
                    max_streams: o.max_streams.unwrap_or(default.max_streams),
                    max_long_polls: o.max_long_polls.unwrap_or(default.max_long_polls),
                };
                (org.clone(), quota)
            })
            .collect();
        Quotas {
            default,
            overrides,
            retry_after: p.retry_after.0,
        }
    }
}

/// Which store implementation holds the runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// Embedded, in this process.
    Memory,
    /// Shared by many instances through Redis or Valkey (`[store.redis]`).
    Redis,
}

/// `[store]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `"memory"` (the embedded store).
    pub backend: StoreBackend,
    /// How long a finished run is kept (it may go sooner under memory pressure).
    pub retention: Dur,
    /// How long a thread's record (organisation, agent, backend thread, which seqs its evicted
    /// runs held) is kept once its runs are all evicted: the conversation can be continued
    /// and its old cursors answer `410` until then.
    pub thread_retention: Dur,
    /// `Retry-After` sent with 503 when the store is full.
    pub full_retry_after: Dur,
    /// `[store.redis]`: used when `backend = "redis"`.
    pub redis: RedisSection,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            backend: StoreBackend::Memory,
            retention: Dur(Duration::from_secs(3600)),
            thread_retention: Dur(Duration::from_secs(7 * 86_400)),
            full_retry_after: Dur(Duration::from_secs(5)),
            redis: RedisSection::default(),
        }
    }
}

/// `[store.redis]`: the shared store (Redis 7+ or Valkey 7.2+, standalone).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://` for TLS).
    pub url: Secret,
    /// Prefix of every key and channel (several deployments can share one Redis).
    pub key_prefix: String,
    /// Longest wait for a connection to Redis.
    pub connect_timeout: Dur,
    /// Longest wait for one answer from Redis; past it the request fails with 503
    /// `store_unavailable`.
    pub response_timeout: Dur,
    /// How long an instance's claim on a run it ingests lasts without renewal: an instance that
    /// dies has its runs taken over by another within about this long.
    pub lease_ttl: Dur,
    /// How often leases are renewed (well under `lease_ttl`).
    pub lease_renew: Dur,
    /// How often each instance looks for runs whose lease expired.
    pub takeover_scan: Dur,
    /// Events kept per watched run in each instance's cache of recent events, so live readers
    /// are served without a Redis read each.
    pub tail_events: usize,
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection {
            url: Secret("redis://127.0.0.1:6379".into()),
            key_prefix: "sl".into(),
            connect_timeout: Dur(Duration::from_secs(1)),
            response_timeout: Dur(Duration::from_secs(1)),
            lease_ttl: Dur(Duration::from_secs(10)),
            lease_renew: Dur(Duration::from_secs(3)),
            takeover_scan: Dur(Duration::from_secs(1)),
            tail_events: 1024,
        }
    }
}

/// `[stream]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSection {
    /// Interval between SSE keep-alive comments while a stream is quiet.
    pub keepalive_interval: Dur,
    /// Longest `wait` a long-poll may ask for.
    pub long_poll_max: Dur,
    /// The SSE `retry:` hint sent at the start of every stream (client reconnection delay).
    pub retry_hint: Dur,
    /// A client that takes no data for this long is cut (it reconnects with its cursor).
    pub stuck_reader_timeout: Dur,
}

impl Default for StreamSection {
    fn default() -> Self {
        StreamSection {
            keepalive_interval: Dur(Duration::from_secs(15)),
            long_poll_max: Dur(Duration::from_secs(30)),
            retry_hint: Dur(Duration::from_secs(2)),
            stuck_reader_timeout: Dur(Duration::from_secs(30)),
        }
    }
}

/// A validated backend base URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `https`?
    pub tls: bool,
    /// Host name or address, as written.
    pub host: String,
    /// Port (80/443 when not written).
    pub port: u16,
    /// Path prefix without a trailing slash (`""` for none).
    pub base_path: String,
}

impl UpstreamUrl {
    /// Parse `http(s)://host[:port][/prefix]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("`{s}` is not a URL ({e})"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("`{s}` must start with http:// or https://")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{s}` has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if uri.query().is_some() {
            return Err(format!("`{s}` must not have a query string"));
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl {
            tls,
            host,
            port,
            base_path,
        })
    }

    /// Plain http to a host that is not loopback (`localhost`, `127.0.0.0/8`, `::1`).
    pub fn is_insecure_remote(&self) -> bool {
        let loopback = self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        !self.tls && !loopback
    }

    /// `host:port` for connecting.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Value for the `Host` header.
    pub fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.base_path)
    }
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parse and validate configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Check the values that parse but may still be wrong.
    /// What a valid configuration may still get wrong, as sentences for the operator
    /// (`sluice check` prints them; `serve` logs them).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let admin_on_loopback = self
            .server
            .admin_listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !admin_on_loopback {
            out.push(format!(
                "server.admin_listen {} is not loopback: /metrics, /healthz and /readyz are \
                 reachable from the network{}",
                self.server.admin_listen,
                if self.server.admin_token.is_set() {
                    " (/metrics needs server.admin_token)"
                } else {
                    "; bind it to 127.0.0.1 or set server.admin_token to protect /metrics"
                }
            ));
        }
        out
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_addr("server.listen", &self.server.listen)?;
        check_addr("server.admin_listen", &self.server.admin_listen)?;
        if self.server.threads == 0 || self.server.threads > 256 {
            return Err(invalid("server.threads", "must be between 1 and 256"));
        }
        self.validate_auth()?;
        if self.auth.dev_organization.trim().is_empty() {
            return Err(invalid("auth.dev_organization", "must not be empty"));
        }
        if self.auth.dev_user.trim().is_empty() {
            return Err(invalid("auth.dev_user", "must not be empty"));
        }
        if self.upstream.urls.is_empty() {
            return Err(invalid("upstream.urls", "name at least one backend URL"));
        }
        for url in &self.upstream.urls {
            UpstreamUrl::parse(url).map_err(|m| invalid("upstream.urls", m))?;
        }
        positive("upstream.connect_timeout", self.upstream.connect_timeout)?;
        positive("upstream.idle_timeout", self.upstream.idle_timeout)?;
        positive("upstream.run_timeout", self.upstream.run_timeout)?;
        self.validate_upstream_routes()?;
        if self.upstream.max_event_bytes < 1024 {
            return Err(invalid("upstream.max_event_bytes", "must be at least 1024"));
        }
        if self.limits.max_body_bytes < 1024 {
            return Err(invalid("limits.max_body_bytes", "must be at least 1024"));
        }
        if self.limits.max_body_bytes_in_flight < self.limits.max_body_bytes as u64 {
            return Err(invalid(
                "limits.max_body_bytes_in_flight",
                "must be at least limits.max_body_bytes",
            ));
        }
        if self.limits.max_events_per_run == 0 {
            return Err(invalid("limits.max_events_per_run", "must be at least 1"));
        }
        if self.limits.max_bytes_per_run < self.upstream.max_event_bytes as u64 {
            return Err(invalid(
                "limits.max_bytes_per_run",
                "must be at least upstream.max_event_bytes",
            ));
        }
        if self.limits.max_total_bytes < self.limits.max_bytes_per_run {
            return Err(invalid(
                "limits.max_total_bytes",
                "must be at least limits.max_bytes_per_run",
            ));
        }
        let p = &self.limits.per_org;
        let overrides = p.overrides.iter().map(|(org, o)| {
            (
                "limits.per_org.overrides",
                format!("{org:?}: "),
                [o.max_running_runs, o.max_streams, o.max_long_polls],
                o.max_bytes,
            )
        });
        let counts = [p.max_running_runs, p.max_streams, p.max_long_polls].map(Some);
        let all = std::iter::once(("limits.per_org", String::new(), counts, p.max_bytes));
        for (key, org, counts, bytes) in all.chain(overrides) {
            if counts.contains(&Some(0)) {
                return Err(invalid(
                    key,
                    format!(
                        "{org}max_running_runs, max_streams and max_long_polls must be at least 1"
                    ),
                ));
            }
            if bytes.is_some_and(|b| b < self.limits.max_bytes_per_run) {
                return Err(invalid(
                    key,
                    format!("{org}max_bytes must be at least limits.max_bytes_per_run"),
                ));
            }
        }
        if p.retry_after.0 < Duration::from_secs(1) {
            return Err(invalid("limits.per_org.retry_after", "must be at least 1s"));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        positive("server.drain_timeout", self.server.drain_timeout)?;
        if let Some(bad) = self
            .server
            .cors_origins
            .iter()
            .find(|o| !crate::api::cors::valid_origin(o))
        {
            return Err(invalid(
                "server.cors_origins",
                format!("{bad:?} is not an origin: use scheme://host[:port] (e.g. https://app.example.com), or \"*\""),
            ));
        }
        positive("store.retention", self.store.retention)?;
        positive("store.thread_retention", self.store.thread_retention)?;
        if self.store.full_retry_after.0 < Duration::from_secs(1) {
            return Err(invalid("store.full_retry_after", "must be at least 1s"));
        }
        self.validate_redis()?;
        positive(
            "stream.stuck_reader_timeout",
            self.stream.stuck_reader_timeout,
        )?;
        if self.stream.keepalive_interval.0 < Duration::from_millis(100) {
            return Err(invalid(
                "stream.keepalive_interval",
                "must be at least 100ms",
            ));
        }
        Ok(())
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        let r = &self.store.redis;
        if self.store.backend == StoreBackend::Redis {
            let url = r.url.0.as_str();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(
                    "store.redis.url",
                    "must start with redis:// or rediss://",
                ));
            }
        }
        let prefix_ok = !r.key_prefix.is_empty()
            && r.key_prefix.len() <= 64
            && r.key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if !prefix_ok {
            return Err(invalid(
                "store.redis.key_prefix",
                "must be 1-64 characters of letters, digits, '-', '_', '.' or ':'",
            ));
        }
        positive("store.redis.connect_timeout", r.connect_timeout)?;
        positive("store.redis.response_timeout", r.response_timeout)?;
        if r.lease_ttl.0 < Duration::from_millis(500) {
            return Err(invalid("store.redis.lease_ttl", "must be at least 500ms"));
        }
        if r.lease_renew.0.is_zero() || r.lease_renew.0 * 2 > r.lease_ttl.0 {
            return Err(invalid(
                "store.redis.lease_renew",
                "must be positive and at most half of store.redis.lease_ttl",
            ));
        }
        positive("store.redis.takeover_scan", r.takeover_scan)?;
        if r.tail_events == 0 {
            return Err(invalid("store.redis.tail_events", "must be at least 1"));
        }
        Ok(())
    }

    fn validate_upstream_routes(&self) -> Result<(), ConfigError> {
        let u = &self.upstream;
        for (key, path) in [
            ("upstream.invoke_path", &u.invoke_path),
            ("upstream.conversation_path", &u.conversation_path),
        ] {
            check_path(key, path)?;
        }
        positive("upstream.poll_interval_min", u.poll_interval_min)?;
        if u.poll_interval_max.0 < u.poll_interval_min.0 {
            return Err(invalid(
                "upstream.poll_interval_max",
                "must be at least upstream.poll_interval_min",
            ));
        }
        if !(1.0..=10.0).contains(&u.poll_backoff) {
            return Err(invalid(
                "upstream.poll_backoff",
                "must be between 1.0 and 10.0",
            ));
        }
        positive("upstream.poll_timeout", u.poll_timeout)?;
        if u.poll_max_connections == 0 {
            return Err(invalid(
                "upstream.poll_max_connections",
                "must be at least 1",
            ));
        }
        if u.poll_max_snapshot_bytes < 1024 {
            return Err(invalid(
                "upstream.poll_max_snapshot_bytes",
                "must be at least 1024",
            ));
        }
        if u.poll_max_failures == 0 {
            return Err(invalid("upstream.poll_max_failures", "must be at least 1"));
        }
        for route in &u.routes {
            if route.agents.is_empty() || route.agents.iter().any(|a| a.is_empty()) {
                return Err(invalid(
                    "upstream.routes.agents",
                    "name at least one agent id or pattern, none empty",
                ));
            }
            if route.urls.is_empty() {
                return Err(invalid(
                    "upstream.routes.urls",
                    "name at least one backend URL",
                ));
            }
            for url in &route.urls {
                UpstreamUrl::parse(url).map_err(|m| invalid("upstream.routes.urls", m))?;
            }
            if let Some(p) = &route.invoke_path {
                check_path("upstream.routes.invoke_path", p)?;
            }
            if let Some(p) = &route.conversation_path {
                check_path("upstream.routes.conversation_path", p)?;
            }
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.required_role.trim().is_empty() {
            return Err(invalid("auth.required_role", "must not be empty"));
        }
        if !a.jwks_url.is_empty() {
            let url = UpstreamUrl::parse(&a.jwks_url).map_err(|m| invalid("auth.jwks_url", m))?;
            if url.is_insecure_remote() && !a.allow_insecure_jwks {
                return Err(invalid(
                    "auth.jwks_url",
                    format!(
                        "`{}` is plain http to a host that is not loopback: anyone on that path \
                         could serve keys and mint tokens for every organisation. Use https://, \
                         or set auth.allow_insecure_jwks = true to accept that risk",
                        a.jwks_url
                    ),
                ));
            }
        }
        positive("auth.jwks_ttl", a.jwks_ttl)?;
        positive("auth.jwks_fetch_timeout", a.jwks_fetch_timeout)?;
        if a.mode != AuthMode::Jwt {
            return Ok(());
        }
        if a.issuer.trim().is_empty() {
            return Err(invalid("auth.issuer", "is required when mode = \"jwt\""));
        }
        let sources = [
            !a.jwks_url.is_empty(),
            !a.jwks_file.is_empty(),
            a.hs256_secret.is_set(),
        ];
        match sources.iter().filter(|s| **s).count() {
            1 => {}
            0 => {
                return Err(invalid(
                    "auth.jwks_url",
                    "mode = \"jwt\" needs one key source: jwks_url, jwks_file or hs256_secret",
                ))
            }
            _ => {
                return Err(invalid(
                    "auth.jwks_url",
                    "give only one of jwks_url, jwks_file and hs256_secret",
                ))
            }
        }
        if a.hs256_secret.is_set() && a.hs256_secret.0.len() < 32 {
            return Err(invalid("auth.hs256_secret", "must be at least 32 bytes"));
        }
        Ok(())
    }

    /// The validated backend URLs.
    pub fn upstream_urls(&self) -> Vec<UpstreamUrl> {
        self.upstream
            .urls
            .iter()
            .filter_map(|u| UpstreamUrl::parse(u).ok())
            .collect()
    }

    /// The effective configuration as TOML, secrets redacted (there are none yet).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn check_addr(key: &'static str, value: &str) -> Result<(), ConfigError> {
    value.parse::<SocketAddr>().map(|_| ()).map_err(|_| {
        invalid(
            key,
            format!("`{value}` is not an address like 127.0.0.1:8080"),
        )
    })
}

fn check_path(key: &'static str, path: &str) -> Result<(), ConfigError> {
    if path.starts_with('/') && !path.contains(['?', '#', ' ']) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("`{path}` must be a path starting with /"),
        ))
    }
}

fn positive(key: &'static str, d: Dur) -> Result<(), ConfigError> {
    if d.0.is_zero() {
        Err(invalid(key, "must be greater than zero"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../config/sluice.toml");

    #[test]
    fn shipped_file_parses_and_equals_the_defaults() {
        let shipped = Config::parse(SHIPPED).expect("config/sluice.toml is valid");
        let minimal = Config::parse(
            "[auth]\nmode = \"jwt\"\nissuer = \"https://your-app.clerk.accounts.dev\"\n\
             jwks_url = \"https://your-app.clerk.accounts.dev/.well-known/jwks.json\"\n",
        )
        .unwrap();
        assert_eq!(shipped.to_toml(), minimal.to_toml());
    }

    #[test]
    fn shipped_file_names_every_key() {
        // Every key of the effective config appears in the shipped file with a comment above it.
        let effective = Config::parse(SHIPPED).unwrap().to_toml();
        for line in effective.lines() {
            if let Some((key, _)) = line.split_once(" = ") {
                let key = key.trim();
                let pos = SHIPPED
                    .lines()
                    .position(|l| l.trim_start().starts_with(&format!("{key} =")))
                    .unwrap_or_else(|| panic!("key `{key}` missing from config/sluice.toml"));
                let above = SHIPPED.lines().nth(pos.saturating_sub(1)).unwrap_or("");
                assert!(
                    above.trim_start().starts_with('#'),
                    "key `{key}` has no comment"
                );
            }
        }
    }

    #[test]
    fn jwt_mode_needs_an_issuer_and_exactly_one_key_source() {
        let base = "[auth]\nmode = \"jwt\"\n";
        let err = Config::parse(&format!("{base}jwks_file = \"k.json\"\n")).unwrap_err();
        assert!(err.to_string().contains("auth.issuer"), "{err}");
        let with_iss = format!("{base}issuer = \"https://i\"\n");
        let err = Config::parse(&with_iss).unwrap_err();
        assert!(err.to_string().contains("key source"), "{err}");
        let both = format!("{with_iss}jwks_file = \"k\"\njwks_url = \"https://x/j\"\n");
        assert!(Config::parse(&both)
            .unwrap_err()
            .to_string()
            .contains("only one"));
        let short = format!("{with_iss}hs256_secret = \"short\"\n");
        let err = Config::parse(&short).unwrap_err();
        assert!(err.to_string().contains("auth.hs256_secret"), "{err}");
        let ok = format!("{with_iss}hs256_secret = \"{}\"\n", "s".repeat(32));
        let c = Config::parse(&ok).unwrap();
        // The secret never shows in the effective config or debug output.
        assert!(!c.to_toml().contains("sss"), "{}", c.to_toml());
        assert!(c.to_toml().contains("<redacted>"));
        assert!(!format!("{c:?}").contains("sss"));
    }

    #[test]
    fn an_admin_listener_beyond_loopback_is_warned_about() {
        let conf = |server: &str| {
            Config::parse(&format!("[auth]\nmode = \"disabled\"\n[server]\n{server}")).unwrap()
        };
        assert!(conf("").warnings().is_empty());
        assert!(conf("admin_listen = \"[::1]:9090\"\n")
            .warnings()
            .is_empty());
        let open = conf("admin_listen = \"0.0.0.0:9090\"\n").warnings();
        assert_eq!(open.len(), 1);
        assert!(open[0].contains("0.0.0.0:9090") && open[0].contains("set server.admin_token"));
        let guarded = conf("admin_listen = \"10.1.2.3:9090\"\nadmin_token = \"t0ken\"\n");
        let warned = guarded.warnings();
        assert!(
            warned[0].contains("/metrics needs server.admin_token"),
            "{warned:?}"
        );
        // The token never shows.
        assert!(!guarded.to_toml().contains("t0ken"));
    }

    #[test]
    fn a_jwks_over_plain_http_must_stay_on_loopback() {
        let conf = |url: &str, extra: &str| {
            Config::parse(&format!(
                "[auth]\nmode = \"jwt\"\nissuer = \"https://i\"\njwks_url = \"{url}\"\n{extra}"
            ))
        };
        for url in [
            "http://keys.example.com/jwks.json",
            "http://10.0.0.7:8080/jwks",
            "http://[2001:db8::1]/jwks",
        ] {
            let err = conf(url, "").unwrap_err().to_string();
            assert!(
                err.contains("auth.jwks_url") && err.contains("allow_insecure_jwks"),
                "{url}: {err}"
            );
            // Accepted when the operator says so.
            assert!(conf(url, "allow_insecure_jwks = true\n").is_ok(), "{url}");
        }
        for url in [
            "https://keys.example.com/jwks.json",
            "http://127.0.0.1:9000/jwks",
            "http://127.8.9.10/jwks",
            "http://localhost:8080/jwks",
            "http://LOCALHOST/jwks",
            "http://[::1]:8080/jwks",
        ] {
            assert!(conf(url, "").is_ok(), "{url}");
        }
    }

    #[test]
    fn auth_mode_is_required() {
        let err = Config::parse("[server]\nthreads = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth"), "{err}");
    }

    #[test]
    fn the_chat_body_limit_lies_between_the_body_limit_and_the_bodies_in_flight() {
        let mut l = LimitsSection::default();
        assert_eq!(l.chat_body_limit(), 8 * 1024 * 1024);
        l.max_body_bytes_in_flight = 2 * 1024 * 1024;
        assert_eq!(l.chat_body_limit(), 2 * 1024 * 1024);
        l.max_body_bytes_in_flight = 64 * 1024 * 1024;
        l.max_body_bytes = 16 * 1024 * 1024;
        assert_eq!(l.chat_body_limit(), 16 * 1024 * 1024);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = Config::parse("[auth]\nmode = \"disabled\"\n[server]\nlisten_addr = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
        let err = Config::parse("[auth]\nmode = \"disabled\"\n[nope]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
            ("[upstream]\nurls = [\"ftp://x\"]\n", "upstream.urls"),
            ("[upstream]\nurls = []\n", "upstream.urls"),
            (
                "[upstream]\nidle_timeout = \"0s\"\n",
                "upstream.idle_timeout",
            ),
            (
                "[limits]\nmax_total_bytes = 2048\n",
                "limits.max_total_bytes",
            ),
            ("[server]\nthreads = 0\n", "server.threads"),
        ];
        for (extra, key) in cases {
            let text = format!("[auth]\nmode = \"disabled\"\n{extra}");
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{extra:?}: {err}");
        }
        let err =
            Config::parse("[auth]\nmode = \"disabled\"\n[upstream]\nrun_timeout = \"soon\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("run_timeout") && err.contains("soon"), "{err}");
        let err = Config::parse("[auth]\nmode = \"open\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mode") || err.contains("open"), "{err}");
    }

    #[test]
    fn upstream_dialects_and_routes() {
        let c = Config::parse(
            "[auth]\nmode = \"disabled\"\n[upstream]\ndialect = \"poll\"\n\
             [[upstream.routes]]\nagents = [\"legacy-*\", \"7\"]\nurls = [\"http://10.0.0.1:80\"]\n\
             dialect = \"ui-message\"\ninvoke_path = \"/v2/invoke\"\n",
        )
        .unwrap();
        assert_eq!(c.upstream.dialect, UpstreamDialect::Poll);
        assert_eq!(c.upstream.routes[0].dialect, UpstreamDialect::UiMessage);
        assert_eq!(
            c.upstream.routes[0].invoke_path.as_deref(),
            Some("/v2/invoke")
        );
        assert!(c.to_toml().contains("[[upstream.routes]]"));
        let bad = [
            ("dialect = \"grpc\"\n", "grpc"),
            ("invoke_path = \"api\"\n", "upstream.invoke_path"),
            ("poll_backoff = 0.5\n", "upstream.poll_backoff"),
            (
                "poll_interval_max = \"10ms\"\n",
                "upstream.poll_interval_max",
            ),
            (
                "poll_max_connections = 0\n",
                "upstream.poll_max_connections",
            ),
            (
                "[[upstream.routes]]\nagents = []\nurls = [\"http://x\"]\ndialect = \"poll\"\n",
                "upstream.routes.agents",
            ),
            (
                "[[upstream.routes]]\nagents = [\"a\"]\nurls = [\"ftp://x\"]\ndialect = \"poll\"\n",
                "upstream.routes.urls",
            ),
        ];
        for (extra, key) in bad {
            let text = format!("[auth]\nmode = \"disabled\"\n[upstream]\n{extra}");
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{extra:?}: {err}");
        }
    }

    #[test]
    fn agent_patterns() {
        for (p, a, want) in [
            ("7", "7", true),
            ("7", "70", false),
            ("*", "", true),
            ("*", "anything", true),
            ("legacy-*", "legacy-bot", true),
            ("legacy-*", "legacy-", true),
            ("legacy-*", "new-bot", false),
            ("*-bot", "support-bot", true),
            ("*-bot", "bot", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
            ("a*a", "aa", true),
        ] {
            assert_eq!(agent_matches(p, a), want, "{p} ~ {a}");
        }
    }

    #[test]
    fn upstream_urls_parse() {
        let u = UpstreamUrl::parse("https://agents.example.com/v1/").unwrap();
        assert_eq!((u.tls, u.port, u.base_path.as_str()), (true, 443, "/v1"));
        assert_eq!(u.authority(), "agents.example.com");
        let u = UpstreamUrl::parse("http://127.0.0.1:7070").unwrap();
        assert_eq!(u.address(), "127.0.0.1:7070");
        assert_eq!(u.authority(), "127.0.0.1:7070");
        assert_eq!(u.base_path, "");
    }
}
