//! Token verification: from an `Authorization` header value to a verified
//! [`Principal`], plus the bounded cache of already-verified tokens.
//!
//! Order of checks (signature before any claim, as Clerk does):
//! 1. `Bearer <token>` parsing (scheme case-insensitive, one token);
//! 2. cache lookup by a keyed 128-bit hash of the token (hit only while `exp > now`);
//! 3. header, unverified: `alg` must name a known algorithm (`none` never),
//!    `typ` if present must be `JWT`, no `crit`; the algorithm's family must
//!    match the key set (no HS token against a JWKS and vice versa);
//! 4. key by `kid` (miss → [`AuthError::UnknownKey`], so the caller can
//!    refetch the JWKS once); header `alg` must equal the key's algorithm;
//! 5. `jsonwebtoken::decode` with a `Validation` for exactly that algorithm:
//!    signature, then presence of `exp`, `sub` and `iss` (and `aud` when an
//!    audience is configured), `iss` value and `aud` value. Its clock checks
//!    are off: all time policy is in [`claims::check`], with the caller's
//!    `now`, so it is testable;
//! 6. [`claims::check`]: time rules, issuer, audience, `azp`, subject,
//!    pending session, organisation and role;
//! 7. cache insert.
//!
//! The cache ([`TokenCache`]) never stores a token, only its keyed 128-bit
//! hash and the verified [`Principal`]; it answers only while `exp > now`
//! and for at most [`CACHE_MAX_TTL_SECS`] after a verification, and
//! [`TokenCache::clear`] empties it after a key revocation. It is split into
//! up to 16 shards, each behind its own mutex and picked by bits of the keyed
//! hash; each shard keeps its entries in insertion order, so an insert into
//! a full shard evicts its oldest entry in O(1), without scanning (see
//! [`TokenCache`]).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, Algorithm, AlgorithmFamily, Validation};

use super::claims::{self, AuthError, Claims, Policy, Principal};
use super::keys::KeySet;

/// Tokens longer than this are refused without parsing (Clerk's are ~1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Longest `kid` considered; a longer one makes the token malformed.
const MAX_KID_BYTES: usize = 256;

/// A cached verification is reused for at most this long, even when the
/// token lives longer, so that a key removed from the JWKS (or a changed
/// policy) stops being honoured within one JWKS refresh period (Clerk: 5 min).
pub const CACHE_MAX_TTL_SECS: u64 = 300;

/// Extract the token from an `Authorization` header value: `Bearer <token>`
/// with a case-insensitive scheme and exactly one non-empty token.
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.ok_or(AuthError::MissingToken)?;
    let value = value.trim_matches([' ', '\t']);
    let (scheme, rest) = value.split_once(' ').ok_or(AuthError::MalformedHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedHeader);
    }
    let token = rest.trim_start_matches(' ');
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AuthError::MalformedHeader);
    }
    Ok(token)
}

/// Verifies bearer tokens against a [`Policy`], with a [`TokenCache`].
#[derive(Debug)]
pub struct Verifier {
    policy: Policy,
    cache: TokenCache,
}

impl Verifier {
    /// A verifier for `policy` caching up to `cache_capacity` verified
    /// tokens (0 disables the cache).
    pub fn new(policy: Policy, cache_capacity: usize) -> Self {
        Verifier {
            policy,
            cache: TokenCache::new(cache_capacity),
        }
    }

    /// The claim policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The cache of verified tokens.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Verify the `Authorization` header value (`None` when absent) at time
    /// `now_secs` (unix seconds) with `keys`.
    pub fn verify(
        &self,
        authorization: Option<&str>,
        keys: &KeySet,
        now_secs: u64,
    ) -> Result<Principal, AuthError> {
        let token = bearer_token(authorization)?;
        self.verify_token(token, keys, now_secs)
    }

    /// Verify a bare compact JWT (e.g. taken from a cookie) at `now_secs`.
    pub fn verify_token(
        &self,
        token: &str,
        keys: &KeySet,
        now_secs: u64,
    ) -> Result<Principal, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::MalformedToken);
        }
        if let Some(principal) = self.cache.get(token, now_secs) {
            return Ok(principal);
        }
        let header = parse_header(token)?;
        let unsupported = || AuthError::UnsupportedAlgorithm(header.alg_name.clone());
        let is_hmac = header.alg.family() == AlgorithmFamily::Hmac;
        if is_hmac != keys.is_symmetric() {
            return Err(unsupported());
        }
        let (key, key_alg) = keys
            .find(header.kid.as_deref())
            .ok_or_else(|| AuthError::UnknownKey(header.kid.clone()))?;
        if key_alg != header.alg {
            return Err(unsupported());
        }
        let data = decode::<Claims>(token, key, &self.validation(key_alg))
            .map_err(|e| map_error(e.kind(), &header.alg_name))?;
        let principal = claims::check(&data.claims, &self.policy, now_secs)?;
        if let Some(exp) = data.claims.exp {
            self.cache.insert(token, principal.clone(), exp, now_secs);
        }
        Ok(principal)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        // Time policy lives in claims::check (with the caller's clock); the
        // crate only has to insist that `exp` is present and numeric.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.leeway = self.policy.leeway_secs;
        v.set_issuer(&[self.policy.issuer.as_str()]);
        // jsonwebtoken requires only `exp` (as a non-negative integer): it checks its required
        // claims in the order of a `HashSet`, so with several a token missing two of them got
        // a reason that varied from call to call (found by the `jwt` fuzz target). `iss`,
        // `sub` and `aud` are claims::check's to enforce, in its fixed order.
        v.set_required_spec_claims(&["exp"]);
        if self.policy.audience.is_empty() {
            // Clerk: `aud` is checked only when configured.
            v.validate_aud = false;
        } else {
            v.set_audience(&self.policy.audience);
        }
        v
    }
}

fn map_error(kind: &ErrorKind, alg_name: &str) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidSubject => AuthError::MissingSubject,
        ErrorKind::MissingRequiredClaim(c) => match c.as_str() {
            "sub" => AuthError::MissingSubject,
            "iss" => AuthError::WrongIssuer,
            "aud" => AuthError::WrongAudience,
            _ => AuthError::MalformedToken,
        },
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => AuthError::UnsupportedAlgorithm(alg_name.to_string()),
        ErrorKind::InvalidToken
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::MalformedToken,
        // Key material the crypto backend refuses: nothing verifies.
        _ => AuthError::BadSignature,
    }
}

/// The unverified header members Sluice looks at.
struct TokenHeader {
    alg: Algorithm,
    /// The header `alg`, sanitised for logs (see [`sanitize_alg`]).
    alg_name: String,
    kid: Option<String>,
}

fn parse_header(token: &str) -> Result<TokenHeader, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::MalformedToken);
    };
    if header.is_empty() || payload.is_empty() {
        return Err(AuthError::MalformedToken);
    }
    let bytes = b64url_decode(header).ok_or(AuthError::MalformedToken)?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::MalformedToken)?;
    let obj = value.as_object().ok_or(AuthError::MalformedToken)?;
    let alg_raw = obj
        .get("alg")
        .and_then(|a| a.as_str())
        .ok_or(AuthError::MalformedToken)?;
    let alg_name = sanitize_alg(alg_raw);
    if alg_raw.eq_ignore_ascii_case("none") {
        return Err(AuthError::UnsupportedAlgorithm(alg_name));
    }
    let alg: Algorithm = alg_raw
        .parse()
        .map_err(|_| AuthError::UnsupportedAlgorithm(alg_name.clone()))?;
    match obj.get("typ") {
        None => {}
        Some(t) if t.as_str().is_some_and(|t| t.eq_ignore_ascii_case("JWT")) => {}
        Some(_) => return Err(AuthError::MalformedToken),
    }
    // RFC 7515 §4.1.11: we understand no extension, so any `crit` is fatal.
    if obj.contains_key("crit") {
        return Err(AuthError::MalformedToken);
    }
    let kid = match obj.get("kid") {
        None => None,
        Some(k) => {
            let k = k.as_str().ok_or(AuthError::MalformedToken)?;
            if k.len() > MAX_KID_BYTES || k.chars().any(char::is_control) {
                return Err(AuthError::MalformedToken);
            }
            Some(k.to_string())
        }
    };
    Ok(TokenHeader { alg, alg_name, kid })
}

/// The header `alg` when it is a short alphanumeric name, else a placeholder,
/// so that what ends up in errors and logs is bounded and harmless.
fn sanitize_alg(alg: &str) -> String {
    if !alg.is_empty() && alg.len() <= 16 && alg.chars().all(|c| c.is_ascii_alphanumeric()) {
        alg.to_string()
    } else {
        "unrecognized".to_string()
    }
}

/// Base64url without padding (RFC 7515 §2); `None` on any other input.
fn b64url_decode(input: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        }))
    }
    let bytes = input.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let [_, b0, b1, b2] = n.to_be_bytes();
        out.extend_from_slice(&[b0, b1, b2][..chunk.len() - 1]);
    }
    Some(out)
}

/// Most shards a [`TokenCache`] is split into.
const CACHE_SHARDS: usize = 16;

/// A small cache gets fewer shards, so that each holds at least this many
/// entries (a shard fills up on its own: many tiny shards would start
/// evicting long before the whole cache is full).
const MIN_SHARD_CAPACITY: usize = 64;

/// "No slot" in a shard's insertion-order list.
const NIL: usize = usize::MAX;

/// A bounded, thread-safe cache of verified tokens.
///
/// **Keys.** A token is keyed by a 128-bit keyed hash (two SipHash-1-3 with
/// secret random keys, a PRF: nobody without the keys can make a token
/// collide with a cached one, nor choose which shard it lands in); the token
/// itself is never stored. A hit costs about 0.7 µs on a ~900-byte token,
/// where a SHA-256 of it took about 6 µs on CPUs without SHA instructions.
///
/// **Validity.** An entry is returned only while `now < exp` and for at most
/// [`CACHE_MAX_TTL_SECS`] after its insertion; a lookup that finds it expired
/// drops it. Call [`TokenCache::clear`] after revoking a key.
///
/// **Structure.** The capacity is split over up to 16 shards (a power of
/// two, fewer for a small cache so that every shard holds at least 64
/// entries, and never more shards than entries; the per-shard capacities
/// add up to exactly the total). Bits of the keyed hash pick the shard, and
/// each shard has its own mutex, so concurrent lookups of different tokens
/// rarely wait for each other. A shard is a map from key to slot plus the
/// slots in a doubly-linked list in insertion order (FIFO). Shards fill up
/// independently, so the first evictions come a little before the whole
/// cache is full: with 16 shards of 625, typically after about 9,350
/// distinct tokens, and 10,000 distinct tokens leave about 9,850 cached.
///
/// **Eviction, O(1).** An insert of a new token first drops the shard's
/// oldest entry if it has expired (opportunistic clean-up), then, if the
/// shard is still full, drops its oldest entry. So an insert removes at most
/// one entry, found at the head of the list: nothing is scanned, and the work
/// does not grow with the capacity (the map and list operations are O(1),
/// amortised as for any hash map). Every entry lives at most
/// [`CACHE_MAX_TTL_SECS`], so the oldest insertion is usually among the first
/// to expire; an expired entry behind a live one stays (and is never
/// returned) until it reaches the head, is looked up, or the cache is
/// cleared. Inserting a token already cached (verified again) refreshes its
/// entry and moves it to the back.
pub struct TokenCache {
    capacity: usize,
    /// Empty when `capacity` is 0; otherwise a power-of-two count.
    shards: Box<[Mutex<Shard>]>,
    keys: [std::collections::hash_map::RandomState; 2],
}

impl std::fmt::Debug for TokenCache {
    // Counts only: neither keys nor principals.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("capacity", &self.capacity)
            .field("shards", &self.shards.len())
            .field("len", &self.len())
            .finish()
    }
}

/// One shard: at most `capacity` entries, kept in a slab (`slots`, dense:
/// `slots.len()` is the entry count) linked in insertion order from `head`
/// (oldest) to `tail` (newest), and `map` from key to slot index.
struct Shard {
    capacity: usize,
    map: HashMap<u128, usize>,
    slots: Vec<Slot>,
    head: usize,
    tail: usize,
}

struct Slot {
    key: u128,
    principal: Principal,
    /// Already capped at insertion time + [`CACHE_MAX_TTL_SECS`].
    exp: u64,
    prev: usize,
    next: usize,
}

impl Shard {
    fn new(capacity: usize) -> Self {
        let prealloc = capacity.min(256);
        Shard {
            capacity,
            map: HashMap::with_capacity(prealloc),
            slots: Vec::with_capacity(prealloc),
            head: NIL,
            tail: NIL,
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn clear(&mut self) {
        self.map.clear();
        self.slots.clear();
        self.head = NIL;
        self.tail = NIL;
    }

    fn get(&mut self, key: u128, now_secs: u64) -> Option<Principal> {
        let idx = *self.map.get(&key)?;
        let slot = &self.slots[idx];
        if slot.exp > now_secs {
            return Some(slot.principal.clone());
        }
        self.remove(idx);
        None
    }

    /// Insert (or refresh) `key`; `exp` is already capped and `> now_secs`.
    /// Returns the key of the entry evicted to make room, if any: at most
    /// one, always the oldest.
    fn insert(&mut self, key: u128, principal: Principal, exp: u64, now_secs: u64) -> Option<u128> {
        if let Some(&idx) = self.map.get(&key) {
            let slot = &mut self.slots[idx];
            slot.principal = principal;
            slot.exp = exp;
            self.unlink(idx);
            self.push_back(idx);
            return None;
        }
        let mut evicted = None;
        if self.head != NIL && self.slots[self.head].exp <= now_secs {
            evicted = Some(self.remove(self.head));
        }
        if self.slots.len() >= self.capacity && self.head != NIL {
            // Not reached after the removal above (len < capacity then).
            evicted = Some(self.remove(self.head));
        }
        let idx = self.slots.len();
        self.slots.push(Slot {
            key,
            principal,
            exp,
            prev: NIL,
            next: NIL,
        });
        self.push_back(idx);
        self.map.insert(key, idx);
        evicted
    }

    /// Remove the entry in slot `idx` and return its key. The last slot moves
    /// into the hole, so the slab stays dense.
    fn remove(&mut self, idx: usize) -> u128 {
        self.unlink(idx);
        let removed = self.slots.swap_remove(idx);
        self.map.remove(&removed.key);
        if idx < self.slots.len() {
            let (key, prev, next) = {
                let moved = &self.slots[idx];
                (moved.key, moved.prev, moved.next)
            };
            match prev {
                NIL => self.head = idx,
                p => self.slots[p].next = idx,
            }
            match next {
                NIL => self.tail = idx,
                n => self.slots[n].prev = idx,
            }
            self.map.insert(key, idx);
        }
        removed.key
    }

    fn unlink(&mut self, idx: usize) {
        let (prev, next) = (self.slots[idx].prev, self.slots[idx].next);
        match prev {
            NIL => self.head = next,
            p => self.slots[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n].prev = prev,
        }
    }

    fn push_back(&mut self, idx: usize) {
        self.slots[idx].prev = self.tail;
        self.slots[idx].next = NIL;
        match self.tail {
            NIL => self.head = idx,
            t => self.slots[t].next = idx,
        }
        self.tail = idx;
    }
}

/// How many shards a cache of `capacity` gets: a power of two, at most
/// [`CACHE_SHARDS`], fewer when shards would hold under
/// [`MIN_SHARD_CAPACITY`] entries; 0 for a disabled cache.
fn shard_count(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let wanted = (capacity / MIN_SHARD_CAPACITY).clamp(1, CACHE_SHARDS);
    1 << wanted.ilog2()
}

impl TokenCache {
    /// A cache of at most `capacity` tokens; 0 disables caching.
    pub fn new(capacity: usize) -> Self {
        Self::with_shards(capacity, shard_count(capacity))
    }

    /// A cache of at most `capacity` tokens over `shards` shards, rounded
    /// down to a power of two and to at most `capacity` (so that every shard
    /// holds at least one entry).
    fn with_shards(capacity: usize, shards: usize) -> Self {
        let n = match shards.min(capacity) {
            0 => 0,
            n => 1 << n.ilog2(),
        };
        let shards = (0..n)
            .map(|i| Mutex::new(Shard::new(capacity / n + usize::from(i < capacity % n))))
            .collect();
        TokenCache {
            capacity,
            shards,
            keys: [Default::default(), Default::default()],
        }
    }

    fn key(&self, token: &str) -> u128 {
        use std::hash::BuildHasher;
        let [a, b] = &self.keys;
        (u128::from(a.hash_one(token.as_bytes())) << 64) | u128::from(b.hash_one(token.as_bytes()))
    }

    /// The shard holding `key` (low bits of the keyed hash; the shard count
    /// is a power of two and the cache is enabled).
    fn shard_index(&self, key: u128) -> usize {
        (key as usize) & (self.shards.len() - 1)
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, Shard> {
        let mutex = &self.shards[index];
        match mutex.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                // A panic mid-update may have left the list half-linked: a
                // cache can always start again empty.
                let mut guard = poisoned.into_inner();
                guard.clear();
                mutex.clear_poison();
                guard
            }
        }
    }

    /// The principal of a cached token still valid at `now_secs` (an entry
    /// found expired is dropped).
    pub fn get(&self, token: &str, now_secs: u64) -> Option<Principal> {
        if self.capacity == 0 {
            return None;
        }
        let key = self.key(token);
        self.lock(self.shard_index(key)).get(key, now_secs)
    }

    /// Remember a verified token until `exp`, or [`CACHE_MAX_TTL_SECS`]
    /// from `now_secs` if sooner (ignored if `exp` is already past). Evicts
    /// at most one entry, the oldest of the token's shard (see the type's
    /// documentation).
    pub fn insert(&self, token: &str, principal: Principal, exp: u64, now_secs: u64) {
        if self.capacity == 0 || exp <= now_secs {
            return;
        }
        let exp = exp.min(now_secs.saturating_add(CACHE_MAX_TTL_SECS));
        let key = self.key(token);
        self.lock(self.shard_index(key))
            .insert(key, principal, exp, now_secs);
    }

    /// The total capacity (the sum of the shards' capacities).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of entries (including expired ones not yet dropped), counted
    /// shard by shard: not a snapshot when other threads insert meanwhile.
    pub fn len(&self) -> usize {
        (0..self.shards.len()).map(|i| self.lock(i).len()).sum()
    }

    /// True when the cache holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drop every entry (e.g. after a key revocation), shard by shard: every
    /// entry inserted before the call is gone when it returns.
    pub fn clear(&self) {
        for i in 0..self.shards.len() {
            self.lock(i).clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testkeys::{self, b64url, mint, unsigned};
    use jsonwebtoken::{encode, EncodingKey, Header};
    use proptest::prelude::*;
    use serde_json::{json, Value};
    use std::sync::OnceLock;

    const ISS: &str = "https://example.clerk.accounts.dev";
    const NOW: u64 = 1_700_000_000;

    struct Fixture {
        rsa: testkeys::GeneratedKey,
        ec: testkeys::GeneratedKey,
        ed: testkeys::GeneratedKey,
        rsa2: testkeys::GeneratedKey,
        keys: KeySet,
    }

    fn fx() -> &'static Fixture {
        static FX: OnceLock<Fixture> = OnceLock::new();
        FX.get_or_init(|| {
            let rsa = testkeys::generate_rsa().unwrap();
            let ec = testkeys::generate_ec().unwrap();
            let ed = testkeys::generate_ed25519().unwrap();
            let rsa2 = testkeys::generate_rsa().unwrap(); // not in the JWKS
            let doc = testkeys::jwks(&[rsa.1.clone(), ec.1.clone(), ed.1.clone()]);
            let keys = KeySet::from_jwks(doc.to_string().as_bytes(), 16).unwrap();
            Fixture {
                rsa,
                ec,
                ed,
                rsa2,
                keys,
            }
        })
    }

    fn v1_claims(role: &str) -> Value {
        json!({
            "sub": "user_1", "iss": ISS, "exp": NOW + 60, "iat": NOW, "nbf": NOW - 5,
            "azp": "http://localhost:3000", "sid": "sess_1",
            "org_id": "org_1", "org_role": role, "org_slug": "acme",
            "org_permissions": ["org:admin:example"]
        })
    }

    fn v2_claims(rol: &str) -> Value {
        json!({
            "sub": "user_1", "iss": ISS, "exp": NOW + 60, "iat": NOW, "nbf": NOW - 5,
            "azp": "http://localhost:3000", "sid": "sess_1", "jti": "j", "v": 2,
            "fva": [7, -1], "sts": "active", "fea": "o:agents",
            "o": {"id": "org_1", "rol": rol, "slg": "acme", "per": "manage,read", "fpm": "3"}
        })
    }

    fn rs(claims: &Value) -> String {
        let (k, _, kid) = &fx().rsa;
        mint(claims, k, Algorithm::RS256, Some(kid)).unwrap()
    }

    fn bearer(t: &str) -> String {
        format!("Bearer {t}")
    }

    fn verifier() -> Verifier {
        Verifier::new(Policy::new(ISS), 0)
    }

    fn run(v: &Verifier, token: &str) -> Result<Principal, AuthError> {
        v.verify(Some(&bearer(token)), &fx().keys, NOW)
    }

    fn admin() -> Principal {
        Principal {
            user_id: "user_1".into(),
            org_id: "org_1".into(),
            org_role: "org:admin".into(),
            org_slug: Some("acme".into()),
        }
    }

    fn with(mut claims: Value, key: &str, value: Value) -> Value {
        claims[key] = value;
        claims
    }

    fn without(mut claims: Value, key: &str) -> Value {
        claims.as_object_mut().unwrap().remove(key);
        claims
    }

    #[test]
    fn v1_and_v2_admins_accepted_with_every_key_type() {
        let v = verifier();
        assert_eq!(run(&v, &rs(&v1_claims("org:admin"))), Ok(admin()));
        assert_eq!(run(&v, &rs(&v2_claims("admin"))), Ok(admin()));
        let (k, _, kid) = &fx().ec;
        let t = mint(&v2_claims("admin"), k, Algorithm::ES256, Some(kid)).unwrap();
        assert_eq!(run(&v, &t), Ok(admin()));
        let (k, _, kid) = &fx().ed;
        let t = mint(&v1_claims("org:admin"), k, Algorithm::EdDSA, Some(kid)).unwrap();
        assert_eq!(run(&v, &t), Ok(admin()));
        // Clerk's extra header member `oiat` and lowercase scheme / typ
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(fx().rsa.2.clone());
        h.typ = Some("jwt".into());
        h.extras.insert("oiat", NOW);
        let t = encode(&h, &v2_claims("admin"), &fx().rsa.0).unwrap();
        assert_eq!(
            v.verify(Some(&format!("bearer  {t}")), &fx().keys, NOW),
            Ok(admin())
        );
        assert_eq!(
            v.verify(Some(&format!("BEARER {t}")), &fx().keys, NOW),
            Ok(admin())
        );
        // no typ at all is fine
        h.typ = None;
        let t = encode(&h, &v2_claims("admin"), &fx().rsa.0).unwrap();
        assert_eq!(run(&v, &t), Ok(admin()));
    }

    #[test]
    fn authorization_failures_are_403() {
        let v = verifier();
        let e = run(&v, &rs(&v1_claims("org:member"))).unwrap_err();
        assert_eq!((e.clone(), e.status()), (AuthError::InsufficientRole, 403));
        assert_eq!(
            run(&v, &rs(&v2_claims("member"))),
            Err(AuthError::InsufficientRole)
        );
        let no_org = without(without(v1_claims("org:admin"), "org_id"), "org_role");
        let e = run(&v, &rs(&no_org)).unwrap_err();
        assert_eq!((e.clone(), e.status()), (AuthError::NoOrganization, 403));
        let no_org = without(v2_claims("admin"), "o");
        assert_eq!(run(&v, &rs(&no_org)), Err(AuthError::NoOrganization));
        let pending = with(without(v2_claims("admin"), "o"), "sts", json!("pending"));
        assert_eq!(run(&v, &rs(&pending)), Err(AuthError::PendingSession));
        let pending = with(v2_claims("admin"), "sts", json!("pending"));
        assert_eq!(run(&v, &rs(&pending)), Err(AuthError::PendingSession));
    }

    #[test]
    fn time_claims_use_the_given_clock_and_leeway() {
        let v = verifier(); // leeway 5
        let c = v1_claims("org:admin");
        let t = rs(&c);
        let keys = &fx().keys;
        let h = bearer(&t);
        assert!(v.verify(Some(&h), keys, NOW + 64).is_ok(), "exp + 4");
        assert_eq!(v.verify(Some(&h), keys, NOW + 65), Err(AuthError::Expired));
        assert_eq!(
            v.verify(Some(&h), keys, NOW + 10_000),
            Err(AuthError::Expired)
        );
        // nbf = NOW - 5 (iat removed so that only nbf is in play)
        let h2 = bearer(&rs(&without(c.clone(), "iat")));
        assert!(v.verify(Some(&h2), keys, NOW - 10).is_ok(), "nbf - 5");
        assert_eq!(
            v.verify(Some(&h2), keys, NOW - 11),
            Err(AuthError::NotYetValid)
        );
        // iat in the future, nbf absent
        let c = with(without(c, "nbf"), "iat", json!(NOW + 6));
        assert_eq!(run(&v, &rs(&c)), Err(AuthError::IssuedInFuture));
        let c = with(c, "iat", json!(NOW + 5));
        assert!(run(&v, &rs(&c)).is_ok());
        // a wider leeway accepts what the default refuses
        let mut p = Policy::new(ISS);
        p.leeway_secs = 30;
        let wide = Verifier::new(p, 0);
        assert!(wide.verify(Some(&h), keys, NOW + 89).is_ok());
        assert_eq!(
            wide.verify(Some(&h), keys, NOW + 90),
            Err(AuthError::Expired)
        );
        // exp is required; a non-numeric exp is malformed
        let no_exp = without(v1_claims("org:admin"), "exp");
        assert_eq!(run(&v, &rs(&no_exp)), Err(AuthError::MalformedToken));
        let bad_exp = with(v1_claims("org:admin"), "exp", json!("tomorrow"));
        assert_eq!(run(&v, &rs(&bad_exp)), Err(AuthError::MalformedToken));
        let neg_exp = with(v1_claims("org:admin"), "exp", json!(-1));
        assert_eq!(run(&v, &rs(&neg_exp)), Err(AuthError::MalformedToken));
    }

    #[test]
    fn issuer_subject_azp_audience() {
        let v = verifier();
        let c = with(v1_claims("org:admin"), "iss", json!("https://evil.example"));
        assert_eq!(run(&v, &rs(&c)), Err(AuthError::WrongIssuer));
        let c = without(v1_claims("org:admin"), "iss");
        assert_eq!(run(&v, &rs(&c)), Err(AuthError::WrongIssuer));
        let c = without(v1_claims("org:admin"), "sub");
        assert_eq!(run(&v, &rs(&c)), Err(AuthError::MissingSubject));
        let c = with(v1_claims("org:admin"), "sub", json!(""));
        assert_eq!(run(&v, &rs(&c)), Err(AuthError::MissingSubject));

        let mut p = Policy::new(ISS);
        p.allowed_origins = vec!["https://app.example.com".into()];
        let vo = Verifier::new(p, 0);
        let c = v1_claims("org:admin"); // azp http://localhost:3000
        assert_eq!(run(&vo, &rs(&c)), Err(AuthError::WrongAuthorizedParty));
        let c2 = without(c.clone(), "azp");
        assert_eq!(run(&vo, &rs(&c2)), Err(AuthError::WrongAuthorizedParty));
        let c3 = with(c, "azp", json!("https://app.example.com"));
        assert_eq!(run(&vo, &rs(&c3)), Ok(admin()));

        // aud ignored when not configured (the crate would refuse it by default)
        let ca = with(v1_claims("org:admin"), "aud", json!("someone-else"));
        assert_eq!(run(&v, &rs(&ca)), Ok(admin()));
        let mut p = Policy::new(ISS);
        p.audience = vec!["sluice".into()];
        let va = Verifier::new(p, 0);
        assert_eq!(run(&va, &rs(&ca)), Err(AuthError::WrongAudience));
        let c = v1_claims("org:admin");
        assert_eq!(run(&va, &rs(&c)), Err(AuthError::WrongAudience));
        let c = with(c, "aud", json!(["x", "sluice"]));
        assert_eq!(run(&va, &rs(&c)), Ok(admin()));
        let c = with(c, "aud", json!("sluice"));
        assert_eq!(run(&va, &rs(&c)), Ok(admin()));
    }

    fn flip_char_at(token: &str, part: usize) -> String {
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let p = &mut parts[part];
        let i = p.len() / 2;
        let c = p.as_bytes()[i];
        let flipped = if c == b'A' { 'B' } else { 'A' };
        p.replace_range(i..=i, &flipped.to_string());
        parts.join(".")
    }

    #[test]
    fn tampering_is_detected() {
        let v = verifier();
        for t in [
            rs(&v1_claims("org:admin")),
            mint(
                &v1_claims("org:admin"),
                &fx().ec.0,
                Algorithm::ES256,
                Some(&fx().ec.2),
            )
            .unwrap(),
            mint(
                &v1_claims("org:admin"),
                &fx().ed.0,
                Algorithm::EdDSA,
                Some(&fx().ed.2),
            )
            .unwrap(),
        ] {
            assert_eq!(run(&v, &flip_char_at(&t, 2)), Err(AuthError::BadSignature));
            assert_eq!(run(&v, &flip_char_at(&t, 1)), Err(AuthError::BadSignature));
            // a member's payload grafted onto an admin's signature
            let member = rs(&v1_claims("org:member"));
            let parts: Vec<&str> = t.split('.').collect();
            let graft = format!(
                "{}.{}.{}",
                parts[0],
                member.split('.').nth(1).unwrap(),
                parts[2]
            );
            assert_eq!(run(&v, &graft), Err(AuthError::BadSignature));
            // signature removed
            let stripped = format!("{}.{}.", parts[0], parts[1]);
            assert!(matches!(
                run(&v, &stripped),
                Err(AuthError::BadSignature | AuthError::MalformedToken)
            ));
        }
        // signed by a key that is not in the JWKS but claiming a known kid
        let t = mint(
            &v1_claims("org:admin"),
            &fx().rsa2.0,
            Algorithm::RS256,
            Some(&fx().rsa.2),
        );
        assert_eq!(run(&v, &t.unwrap()), Err(AuthError::BadSignature));
    }

    #[test]
    fn alg_none_is_refused() {
        let v = verifier();
        let claims = v1_claims("org:admin");
        for alg in ["none", "None", "NONE", "nOnE"] {
            for kid in [None, Some(fx().rsa.2.as_str())] {
                let mut h = json!({"alg": alg, "typ": "JWT"});
                if let Some(k) = kid {
                    h["kid"] = json!(k);
                }
                let t = unsigned(&h, &claims);
                assert_eq!(
                    run(&v, &t),
                    Err(AuthError::UnsupportedAlgorithm(alg.into()))
                );
                // with a copied signature as well
                let sig = rs(&claims).rsplit('.').next().unwrap().to_string();
                assert_eq!(
                    run(&v, &format!("{t}{sig}")),
                    Err(AuthError::UnsupportedAlgorithm(alg.into()))
                );
            }
        }
        let t = unsigned(&json!({"alg": "HS1"}), &claims);
        assert_eq!(
            run(&v, &t),
            Err(AuthError::UnsupportedAlgorithm("HS1".into()))
        );
        let t = unsigned(&json!({"alg": "\"evil\nheader"}), &claims);
        assert_eq!(
            run(&v, &t),
            Err(AuthError::UnsupportedAlgorithm("unrecognized".into()))
        );
        let t = unsigned(&json!({"typ": "JWT"}), &claims);
        assert_eq!(run(&v, &t), Err(AuthError::MalformedToken));
    }

    #[test]
    fn hs256_with_the_public_key_as_secret_is_refused() {
        let v = verifier();
        let (rsa_key, rsa_jwk, kid) = &fx().rsa;
        let der = testkeys::rsa_public_key_der(rsa_key).unwrap();
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            b64url(&der)
        );
        let secrets: Vec<Vec<u8>> = vec![
            der,
            pem.into_bytes(),
            rsa_jwk.to_string().into_bytes(),
            rsa_jwk["n"].as_str().unwrap().as_bytes().to_vec(),
        ];
        for secret in secrets {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                for k in [Some(kid.as_str()), None] {
                    let t = mint(
                        &v1_claims("org:admin"),
                        &EncodingKey::from_secret(&secret),
                        alg,
                        k,
                    )
                    .unwrap();
                    assert_eq!(
                        run(&v, &t),
                        Err(AuthError::UnsupportedAlgorithm(format!("{alg:?}")))
                    );
                }
            }
        }
    }

    #[test]
    fn cross_family_confusion_is_refused() {
        let v = verifier();
        // ES256 token pointing at the RSA key, RS256 token pointing at the EC key
        let t = mint(
            &v1_claims("org:admin"),
            &fx().ec.0,
            Algorithm::ES256,
            Some(&fx().rsa.2),
        );
        assert_eq!(
            run(&v, &t.unwrap()),
            Err(AuthError::UnsupportedAlgorithm("ES256".into()))
        );
        let t = mint(
            &v1_claims("org:admin"),
            &fx().rsa.0,
            Algorithm::RS256,
            Some(&fx().ec.2),
        );
        assert_eq!(
            run(&v, &t.unwrap()),
            Err(AuthError::UnsupportedAlgorithm("RS256".into()))
        );
        // same family, other algorithm than the pinned one
        let t = mint(
            &v1_claims("org:admin"),
            &fx().rsa.0,
            Algorithm::PS256,
            Some(&fx().rsa.2),
        );
        assert_eq!(
            run(&v, &t.unwrap()),
            Err(AuthError::UnsupportedAlgorithm("PS256".into()))
        );
        let t = mint(
            &v1_claims("org:admin"),
            &fx().rsa.0,
            Algorithm::RS512,
            Some(&fx().rsa.2),
        );
        assert_eq!(
            run(&v, &t.unwrap()),
            Err(AuthError::UnsupportedAlgorithm("RS512".into()))
        );
    }

    #[test]
    fn unknown_kid_then_accepted_after_rotation() {
        let v = verifier();
        let (k, jwk, kid) = &fx().rsa2;
        let t = mint(&v1_claims("org:admin"), k, Algorithm::RS256, Some(kid)).unwrap();
        assert_eq!(run(&v, &t), Err(AuthError::UnknownKey(Some(kid.clone()))));
        // several keys and no kid: no guess
        let t2 = mint(&v1_claims("org:admin"), &fx().rsa.0, Algorithm::RS256, None).unwrap();
        assert_eq!(run(&v, &t2), Err(AuthError::UnknownKey(None)));
        let rotated = testkeys::jwks(&[fx().rsa.1.clone(), jwk.clone()]);
        let keys = KeySet::from_jwks(rotated.to_string().as_bytes(), 16).unwrap();
        assert_eq!(v.verify(Some(&bearer(&t)), &keys, NOW), Ok(admin()));
        // a single-key set accepts a token without kid
        let single = testkeys::jwks(&[fx().rsa.1.clone()]);
        let single = KeySet::from_jwks(single.to_string().as_bytes(), 16).unwrap();
        assert_eq!(v.verify(Some(&bearer(&t2)), &single, NOW), Ok(admin()));
    }

    #[test]
    fn header_and_garbage() {
        let v = verifier();
        let keys = &fx().keys;
        let good = rs(&v1_claims("org:admin"));
        assert_eq!(v.verify(None, keys, NOW), Err(AuthError::MissingToken));
        for h in [
            "",
            "Bearer",
            "Bearer ",
            "Bearer    ",
            "Basic dXNlcjpwYXNz",
            "Token abc",
            &format!("Basic {good}"),
            &format!("Bearer {good} extra"),
            &format!("Bearer\t{good}"),
            &format!("Bearer {good}\nX: y"),
            &format!("Bearer{good}"),
        ] {
            assert_eq!(
                v.verify(Some(h), keys, NOW),
                Err(AuthError::MalformedHeader),
                "{h:?}"
            );
        }
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        let not_json = format!("{}.{}.sig", b64url(b"not json"), b64url(b"{}"));
        let not_object = format!("{}.{}.sig", b64url(b"[1]"), b64url(b"{}"));
        let bad_payload = format!("{}.@@@.sig", good.split('.').next().unwrap());
        let kid_not_string = unsigned(&json!({"alg": "RS256", "kid": 5}), &json!({}));
        let long_kid = unsigned(&json!({"alg": "RS256", "kid": "k".repeat(300)}), &json!({}));
        let jws_typ = unsigned(&json!({"alg": "RS256", "typ": "JWS"}), &json!({}));
        let crit = unsigned(&json!({"alg": "RS256", "crit": ["exp"]}), &json!({}));
        for t in [
            "abc",
            "a.b",
            "a.b.c",
            "...",
            "a.b.c.d",
            ".payload.sig",
            "é.é.é",
            "eyJ.eyJ.sig",
            huge.as_str(),
            not_json.as_str(),
            not_object.as_str(),
            kid_not_string.as_str(),
            long_kid.as_str(),
            jws_typ.as_str(),
            crit.as_str(),
            &format!("{good}.x"),
            &good[..good.len() / 2],
        ] {
            let r = run(&v, t);
            assert!(
                matches!(r, Err(AuthError::MalformedToken)),
                "{t:.60}: {r:?}"
            );
        }
        assert!(matches!(
            run(&v, &bad_payload),
            Err(AuthError::BadSignature | AuthError::MalformedToken)
        ));
    }

    #[test]
    fn hs256_mode() {
        let secret = [42u8; 32];
        let keys = KeySet::from_hs256_secret(&secret).unwrap();
        let v = verifier();
        let hs = EncodingKey::from_secret(&secret);
        for kid in [None, Some("dev")] {
            let t = mint(&v2_claims("admin"), &hs, Algorithm::HS256, kid).unwrap();
            assert_eq!(v.verify(Some(&bearer(&t)), &keys, NOW), Ok(admin()));
        }
        let t = mint(
            &v2_claims("admin"),
            &EncodingKey::from_secret(&[1u8; 32]),
            Algorithm::HS256,
            None,
        );
        assert_eq!(
            v.verify(Some(&bearer(&t.unwrap())), &keys, NOW),
            Err(AuthError::BadSignature)
        );
        let t = mint(&v2_claims("admin"), &hs, Algorithm::HS512, None).unwrap();
        assert_eq!(
            v.verify(Some(&bearer(&t)), &keys, NOW),
            Err(AuthError::UnsupportedAlgorithm("HS512".into()))
        );
        let t = rs(&v2_claims("admin"));
        assert_eq!(
            v.verify(Some(&bearer(&t)), &keys, NOW),
            Err(AuthError::UnsupportedAlgorithm("RS256".into()))
        );
        let t = unsigned(&json!({"alg": "none"}), &v2_claims("admin"));
        assert_eq!(
            v.verify(Some(&bearer(&t)), &keys, NOW),
            Err(AuthError::UnsupportedAlgorithm("none".into()))
        );
    }

    #[test]
    fn cache_skips_verification_until_exp() {
        let v = Verifier::new(Policy::new(ISS), 16);
        let t = rs(&v1_claims("org:admin")); // exp NOW + 60
        let h = bearer(&t);
        let empty = KeySet::empty();
        assert_eq!(
            v.verify(Some(&h), &empty, NOW),
            Err(AuthError::UnknownKey(Some(fx().rsa.2.clone())))
        );
        assert_eq!(v.verify(Some(&h), &fx().keys, NOW), Ok(admin()));
        assert_eq!(v.cache().len(), 1);
        // now served from the cache: no key needed
        assert_eq!(v.verify(Some(&h), &empty, NOW + 30), Ok(admin()));
        assert_eq!(v.verify(Some(&h), &empty, NOW + 59), Ok(admin()));
        // never past exp (even inside the leeway, which needs a real verification)
        assert!(matches!(
            v.verify(Some(&h), &empty, NOW + 60),
            Err(AuthError::UnknownKey(_))
        ));
        assert_eq!(v.verify(Some(&h), &fx().keys, NOW + 62), Ok(admin()));
        assert_eq!(
            v.cache().len(),
            0,
            "entries past exp are dropped, not re-inserted"
        );
        // a different token (one byte changed) misses the cache
        assert_eq!(v.verify(Some(&h), &fx().keys, NOW), Ok(admin()));
        let tampered = flip_char_at(&t, 2);
        assert_eq!(run(&v, &tampered), Err(AuthError::BadSignature));
        // failures are not cached
        let member = rs(&v1_claims("org:member"));
        assert_eq!(run(&v, &member), Err(AuthError::InsufficientRole));
        assert_eq!(v.cache().len(), 1);
        // capacity 0 disables the cache
        let v0 = verifier();
        assert_eq!(v0.verify(Some(&h), &fx().keys, NOW), Ok(admin()));
        assert!(v0.cache().is_empty());
        assert!(v0.verify(Some(&h), &empty, NOW).is_err());
    }

    #[test]
    fn token_cache_bounds_and_expiry() {
        let c = TokenCache::new(3);
        let p = admin();
        c.insert("t1", p.clone(), 100, 0);
        c.insert("t2", p.clone(), 200, 0);
        c.insert("t3", p.clone(), 300, 0);
        assert_eq!(c.len(), 3);
        c.insert("t4", p.clone(), 400, 0); // full, nothing expired: evicts t1 (soonest)
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("t1", 0), None);
        assert!(c.get("t2", 0).is_some() && c.get("t4", 0).is_some());
        c.insert("t5", p.clone(), 500, 250); // t2 expired at 250: purged first
        assert_eq!(c.len(), 3);
        assert!(c.get("t3", 250).is_some() && c.get("t4", 250).is_some());
        assert_eq!(c.get("t3", 300), None);
        assert_eq!(c.get("t5", 499).map(|p| p.org_id), Some("org_1".into()));
        c.insert("t6", p.clone(), 10, 10); // already expired: ignored
        assert_eq!(c.get("t6", 0), None);
        c.clear();
        assert!(c.is_empty());
        // when full, one entry goes (the oldest, expired here), not every
        // expired one: no scan; "b" stays until looked up or evicted
        c.insert("a", p.clone(), 100, 0);
        c.insert("b", p.clone(), 110, 0);
        c.insert("c", p.clone(), 400, 0);
        c.insert("d", p.clone(), 500, 200);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("a", 0), None);
        assert_eq!(c.get("b", 200), None, "expired: never returned, dropped");
        assert_eq!(c.len(), 2);
        c.clear();
        // keys are digests, never the token
        c.insert("long-lived", p.clone(), u64::MAX, 1_000);
        assert!(c
            .get("long-lived", 1_000 + CACHE_MAX_TTL_SECS - 1)
            .is_some());
        assert_eq!(c.get("long-lived", 1_000 + CACHE_MAX_TTL_SECS), None);
        c.insert("secret-token", p, 100, 0);
        let dump = format!("{:?}", c);
        assert!(!dump.contains("secret-token"));
    }

    fn user(n: usize) -> Principal {
        Principal {
            user_id: format!("user_{n}"),
            ..admin()
        }
    }

    /// Checks a shard's structure and returns its keys, oldest first.
    fn shard_order(s: &Shard) -> Vec<u128> {
        assert!(s.slots.len() <= s.capacity, "beyond the shard's capacity");
        assert_eq!(s.map.len(), s.slots.len());
        let mut order = Vec::new();
        let (mut prev, mut idx) = (NIL, s.head);
        while idx != NIL {
            let slot = &s.slots[idx];
            assert_eq!(slot.prev, prev, "broken back link");
            assert_eq!(s.map.get(&slot.key), Some(&idx), "map and slab disagree");
            order.push(slot.key);
            assert!(order.len() <= s.slots.len(), "cycle in the list");
            (prev, idx) = (idx, slot.next);
        }
        assert_eq!(s.tail, prev);
        assert_eq!(order.len(), s.slots.len(), "slot not in the list");
        order
    }

    fn check_structure(c: &TokenCache) {
        let mut total = 0;
        for i in 0..c.shards.len() {
            total += shard_order(&c.lock(i)).len();
        }
        assert!(total <= c.capacity());
        assert_eq!(total, c.len());
    }

    #[test]
    fn shard_layout() {
        let layout = |c: &TokenCache| -> Vec<usize> {
            (0..c.shards.len()).map(|i| c.lock(i).capacity).collect()
        };
        assert_eq!(layout(&TokenCache::new(0)), Vec::<usize>::new());
        assert_eq!(layout(&TokenCache::new(1)), vec![1]);
        assert_eq!(layout(&TokenCache::new(127)), vec![127]);
        assert_eq!(layout(&TokenCache::new(128)), vec![64, 64]);
        assert_eq!(layout(&TokenCache::new(10_000)), vec![625; 16]);
        assert_eq!(TokenCache::new(1 << 20).shards.len(), CACHE_SHARDS);
        // 1001 / 64 = 15 shards wanted: 8, the power of two below
        assert_eq!(layout(&TokenCache::new(1001))[..2], [126, 125]);
        // fewer entries than shards: never an empty shard, the total is exact
        for capacity in 0..=70 {
            for shards in [1, 2, 3, 4, 8, 16, 32, 64] {
                let l = layout(&TokenCache::with_shards(capacity, shards));
                assert_eq!(l.iter().sum::<usize>(), capacity);
                assert!(l.len() <= shards && l.len() <= capacity);
                assert!(l.len().is_power_of_two() || capacity == 0);
                assert!(l.iter().all(|&n| n >= 1));
                assert!(l.iter().max().unwrap_or(&0) - l.iter().min().unwrap_or(&0) <= 1);
            }
        }
        let dump = format!("{:?}", TokenCache::new(10_000));
        assert!(dump.contains("capacity: 10000") && dump.contains("shards: 16"));
    }

    #[test]
    fn insert_into_a_full_shard_evicts_exactly_the_oldest() {
        let p = admin();
        let mut s = Shard::new(4);
        // inserted first but expiring last: FIFO evicts it anyway (there is
        // no search for the entry closest to expiry)
        assert_eq!(s.insert(1, p.clone(), 1_000, 0), None);
        assert_eq!(s.insert(2, p.clone(), 100, 0), None);
        assert_eq!(s.insert(3, p.clone(), 200, 0), None);
        assert_eq!(s.insert(4, p.clone(), 300, 0), None);
        assert_eq!(s.insert(5, p.clone(), 400, 0), Some(1));
        assert_eq!(shard_order(&s), [2, 3, 4, 5]);
        // every entry expired: still exactly one removal per insert
        assert_eq!(s.insert(6, p.clone(), 900, 500), Some(2));
        assert_eq!(shard_order(&s), [3, 4, 5, 6]);
        assert_eq!(s.insert(7, p.clone(), 900, 500), Some(3));
        assert_eq!(shard_order(&s), [4, 5, 6, 7]);
        // refreshing a cached key evicts nothing and moves it to the back
        assert_eq!(s.insert(4, p.clone(), 900, 500), None);
        assert_eq!(shard_order(&s), [5, 6, 7, 4]);
        // not full, oldest expired: dropped on the next insert (only it)
        assert_eq!(s.get(6, 500), Some(p.clone()));
        assert_eq!(s.get(5, 500), None); // expired at 400: dropped by the lookup
        assert_eq!(shard_order(&s), [6, 7, 4]);
        assert_eq!(s.insert(8, p.clone(), 950, 500), None);
        assert_eq!(shard_order(&s), [6, 7, 4, 8]);
        assert_eq!(s.insert(9, p.clone(), 950, 920), Some(6));
        assert_eq!(shard_order(&s), [7, 4, 8, 9]);
        // capacity 1: each new key replaces the previous one
        let mut one = Shard::new(1);
        assert_eq!(one.insert(1, p.clone(), 10, 0), None);
        assert_eq!(one.insert(2, p.clone(), 10, 0), Some(1));
        assert_eq!(shard_order(&one), [2]);
        // the slab never grows past the capacity (no reallocation once full)
        let mut big = Shard::new(1_000);
        for k in 0..10_000u128 {
            let evicted = big.insert(k, p.clone(), 10, 0);
            assert_eq!(evicted, k.checked_sub(1_000));
        }
        assert_eq!(big.slots.len(), 1_000);
        assert_eq!(shard_order(&big), (9_000..10_000).collect::<Vec<_>>());
    }

    #[test]
    fn removal_from_the_middle_keeps_the_order() {
        let p = admin();
        let mut s = Shard::new(8);
        for k in 0..8u128 {
            s.insert(k, p.clone(), if k % 3 == 1 { 50 } else { 100 }, 0);
        }
        for k in [4, 1, 7] {
            assert_eq!(s.get(k, 60), None); // 1, 4 and 7 expired at 50
        }
        assert_eq!(shard_order(&s), [0, 2, 3, 5, 6]);
        assert_eq!(s.remove(s.head), 0);
        assert_eq!(s.remove(s.tail), 6);
        assert_eq!(shard_order(&s), [2, 3, 5]);
        s.insert(9, p.clone(), 100, 60);
        assert_eq!(shard_order(&s), [2, 3, 5, 9]);
        s.clear();
        assert_eq!(shard_order(&s), Vec::<u128>::new());
        s.insert(1, p, 100, 0);
        assert_eq!(shard_order(&s), [1]);
    }

    #[test]
    fn expired_entries_are_never_returned() {
        let c = TokenCache::new(10_000);
        assert_eq!(c.shards.len(), 16);
        for i in 0..1_000u64 {
            c.insert(&format!("tok-{i}"), user(i as usize), 1_000 + i, 900);
        }
        check_structure(&c);
        for now in [900, 1_000, 1_250, 1_999, 2_000, 5_000] {
            for i in 0..1_000u64 {
                let hit = c.get(&format!("tok-{i}"), now);
                // exp is capped at 900 + CACHE_MAX_TTL_SECS
                let exp = (1_000 + i).min(900 + CACHE_MAX_TTL_SECS);
                if exp > now {
                    assert_eq!(hit, Some(user(i as usize)), "tok-{i} at {now}");
                } else {
                    assert_eq!(hit, None, "tok-{i} at {now}");
                }
            }
            check_structure(&c);
        }
        // every lookup of an expired entry dropped it
        assert!(c.is_empty());
        // and a lookup with an earlier clock after that finds nothing either
        assert_eq!(c.get("tok-999", 900), None);
    }

    #[test]
    fn small_capacities_still_cache() {
        let p = admin();
        for capacity in 1..=40 {
            // one shard below 2 × MIN_SHARD_CAPACITY: strict FIFO over all
            let c = TokenCache::new(capacity);
            for i in 0..3 * capacity {
                c.insert(&format!("t{i}"), p.clone(), 100, 0);
                assert!(c.len() <= capacity);
            }
            for i in 0..3 * capacity {
                assert_eq!(c.get(&format!("t{i}"), 0).is_some(), i >= 2 * capacity);
            }
            // more shards than a tiny capacity would allow: still bounded,
            // and the token just inserted is always found
            let c = TokenCache::with_shards(capacity, 16);
            for i in 0..5 * capacity {
                let t = format!("t{i}");
                c.insert(&t, p.clone(), 100, 0);
                assert_eq!(c.get(&t, 0), Some(p.clone()));
                assert!(c.len() <= capacity);
            }
            check_structure(&c);
        }
    }

    #[test]
    fn a_poisoned_shard_starts_again_empty() {
        let c = TokenCache::new(4);
        c.insert("t", admin(), 100, 0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = c.shards[0].lock();
            panic!("poison the shard");
        }));
        assert!(r.is_err() && c.shards[0].is_poisoned());
        assert_eq!(c.get("t", 0), None);
        assert!(!c.shards[0].is_poisoned());
        c.insert("t", admin(), 100, 0);
        assert_eq!(c.get("t", 0), Some(admin()));
    }

    #[test]
    fn concurrent_inserts_stay_bounded_and_correct() {
        let c = std::sync::Arc::new(TokenCache::new(200));
        assert_eq!(c.shards.len(), 2);
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        let n = (i * 7 + t * 13) % 500;
                        let tok = format!("tok-{n}");
                        if i % 3 == 0 {
                            if let Some(p) = c.get(&tok, 10) {
                                assert_eq!(p, user(n));
                            }
                        } else {
                            c.insert(&tok, user(n), 100, 10);
                        }
                        assert!(c.len() <= 200);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        check_structure(&c);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert { tok: usize, exp_in: u64 },
        Get { tok: usize },
        Tick { secs: u64 },
        Rewind { secs: u64 },
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0usize..48, 0u64..400).prop_map(|(tok, exp_in)| Op::Insert { tok, exp_in }),
            6 => (0usize..48).prop_map(|tok| Op::Get { tok }),
            2 => (0u64..80).prop_map(|secs| Op::Tick { secs }),
            1 => (0u64..40).prop_map(|secs| Op::Rewind { secs }),
            1 => Just(Op::Clear),
        ]
    }

    /// The same FIFO policy written naively (a `Vec` per shard, linear
    /// searches), to compare the slab and list against.
    struct FifoModel {
        /// Per shard: its capacity and its (key, principal, exp), oldest first.
        shards: Vec<(usize, Vec<ModelEntry>)>,
    }

    type ModelEntry = (u128, Principal, u64);

    impl FifoModel {
        fn get(&mut self, shard: usize, key: u128, now: u64) -> Option<Principal> {
            let entries = &mut self.shards[shard].1;
            let pos = entries.iter().position(|e| e.0 == key)?;
            if entries[pos].2 > now {
                return Some(entries[pos].1.clone());
            }
            entries.remove(pos);
            None
        }

        fn insert(&mut self, shard: usize, key: u128, p: Principal, exp: u64, now: u64) {
            let (capacity, entries) = &mut self.shards[shard];
            if let Some(pos) = entries.iter().position(|e| e.0 == key) {
                entries.remove(pos);
            } else {
                if entries.first().is_some_and(|e| e.2 <= now) {
                    entries.remove(0);
                }
                if entries.len() >= *capacity {
                    entries.remove(0);
                }
            }
            entries.push((key, p, exp));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random insert/get/clock sequences against two models: the
        /// security contract (a hit is the principal of the token's latest
        /// insert, while `now < exp` capped at insert + max TTL; never beyond
        /// the capacity) and the exact FIFO policy per shard.
        #[test]
        fn cache_matches_the_models(
            capacity in 0usize..24,
            shards in prop_oneof![Just(1usize), Just(2), Just(4), Just(16)],
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let c = TokenCache::with_shards(capacity, shards);
            let mut fifo = FifoModel {
                shards: (0..c.shards.len()).map(|i| (c.lock(i).capacity, Vec::new())).collect(),
            };
            // token → (principal, capped exp) of its latest accepted insert
            let mut latest: HashMap<usize, (Principal, u64)> = HashMap::new();
            let mut now = NOW;
            let mut version = 0;
            for op in ops {
                match op {
                    Op::Insert { tok, exp_in } => {
                        version += 1;
                        let p = user(tok * 1_000 + version);
                        let exp = now + exp_in;
                        c.insert(&format!("tok-{tok}"), p.clone(), exp, now);
                        if exp > now {
                            let capped = exp.min(now + CACHE_MAX_TTL_SECS);
                            latest.insert(tok, (p.clone(), capped));
                            if capacity > 0 {
                                let key = c.key(&format!("tok-{tok}"));
                                fifo.insert(c.shard_index(key), key, p, capped, now);
                            }
                        }
                    }
                    Op::Get { tok } => {
                        let got = c.get(&format!("tok-{tok}"), now);
                        if let Some(p) = &got {
                            let (want, exp) = latest.get(&tok).expect("hit never inserted");
                            prop_assert_eq!(p, want, "a stale or foreign principal");
                            prop_assert!(now < *exp, "an expired hit");
                        }
                        if capacity == 0 {
                            prop_assert_eq!(got, None);
                        } else {
                            let key = c.key(&format!("tok-{tok}"));
                            let want = fifo.get(c.shard_index(key), key, now);
                            prop_assert_eq!(got, want);
                        }
                    }
                    Op::Tick { secs } => now += secs,
                    Op::Rewind { secs } => now -= secs,
                    Op::Clear => {
                        c.clear();
                        latest.clear();
                        for s in &mut fifo.shards {
                            s.1.clear();
                        }
                        prop_assert!(c.is_empty());
                    }
                }
                prop_assert!(c.len() <= capacity, "beyond capacity");
                check_structure(&c);
                for (i, (_, entries)) in fifo.shards.iter().enumerate() {
                    let keys: Vec<u128> = entries.iter().map(|e| e.0).collect();
                    prop_assert_eq!(shard_order(&c.lock(i)), keys);
                }
            }
        }
    }

    #[test]
    fn errors_never_echo_the_token() {
        let v = verifier();
        let t = rs(&with(v1_claims("org:admin"), "iss", json!("https://evil")));
        let e = run(&v, &t).unwrap_err();
        let text = format!("{} {:?} {}", e, e.www_authenticate(), e.description());
        for part in t.split('.') {
            assert!(!text.contains(part));
        }
        assert!(!text.contains("evil"));
    }

    #[test]
    fn shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Verifier>();
        assert_send_sync::<KeySet>();
        let v = std::sync::Arc::new(Verifier::new(Policy::new(ISS), 64));
        let t = rs(&v1_claims("org:admin"));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (v, h) = (v.clone(), bearer(&t));
                std::thread::spawn(move || v.verify(Some(&h), &fx().keys, NOW))
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), Ok(admin()));
        }
        assert_eq!(v.cache().len(), 1);
    }

    #[test]
    fn b64url_decoder() {
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "\u{fb}\u{ff}",
        ] {
            assert_eq!(b64url_decode(&b64url(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(b64url_decode("Zg=="), None);
        assert_eq!(b64url_decode("Z"), None);
        assert_eq!(b64url_decode("Z+8"), None);
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(Some("Bearer abc.def.ghi")), Ok("abc.def.ghi"));
        assert_eq!(bearer_token(Some("  bearer   abc  ")), Ok("abc"));
        assert_eq!(bearer_token(None), Err(AuthError::MissingToken));
        assert_eq!(
            bearer_token(Some("Bearer a b")),
            Err(AuthError::MalformedHeader)
        );
    }
}
