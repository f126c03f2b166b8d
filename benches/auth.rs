//! Token verification cost: a fresh RS256 token (full signature check, cache
//! disabled) against a cached one (a keyed 128-bit hash of the token and a
//! lookup in one shard of the cache), and the cost of inserting into a full
//! cache of the default size (one O(1) eviction per insert, no scan).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use jsonwebtoken::Algorithm;
use serde_json::json;
use sluice::auth::claims::{Policy, Principal};
use sluice::auth::keys::KeySet;
use sluice::auth::testkeys;
use sluice::auth::verify::{TokenCache, Verifier};

const ISS: &str = "https://example.clerk.accounts.dev";
const NOW: u64 = 1_700_000_000;

/// The default `auth.token_cache_size`.
const FULL: usize = 10_000;

/// A cache of `FULL` entries filled with every token of `tokens`
/// (`2 × FULL` of them, so that every shard is full).
fn full_cache(tokens: &[String], principal: &Principal) -> TokenCache {
    let cache = TokenCache::new(FULL);
    for t in tokens {
        cache.insert(t, principal.clone(), NOW + 60, NOW);
    }
    assert_eq!(cache.len(), FULL);
    cache
}

fn bench(c: &mut Criterion) {
    let (key, jwk, kid) = testkeys::generate_rsa().expect("RSA key generation");
    let jwks = testkeys::jwks(&[jwk]).to_string();
    let keys = KeySet::from_jwks(jwks.as_bytes(), 16).expect("JWKS");
    let claims = json!({
        "sub": "user_1", "iss": ISS, "exp": NOW + 60, "iat": NOW, "nbf": NOW - 5,
        "azp": "http://localhost:3000", "sid": "sess_1", "v": 2, "sts": "active",
        "o": {"id": "org_1", "rol": "admin", "slg": "acme", "per": "manage,read", "fpm": "3"}
    });
    let token = testkeys::mint(&claims, &key, Algorithm::RS256, Some(&kid)).expect("mint");
    let header = format!("Bearer {token}");

    let mut policy = Policy::new(ISS);
    policy.allowed_origins = vec!["http://localhost:3000".into()];

    let uncached = Verifier::new(policy.clone(), 0);
    assert!(uncached.verify(Some(&header), &keys, NOW).is_ok());
    c.bench_function("auth/verify_rs256_fresh", |b| {
        b.iter(|| uncached.verify(black_box(Some(header.as_str())), &keys, NOW))
    });

    let cached = Verifier::new(policy, 1024);
    assert!(cached.verify(Some(&header), &keys, NOW).is_ok());
    c.bench_function("auth/verify_rs256_cached", |b| {
        b.iter(|| cached.verify(black_box(Some(header.as_str())), &keys, NOW))
    });

    // Inserts of new tokens into a full cache of the default size
    // (`auth.token_cache_size`): every insert evicts. Twice as many distinct
    // tokens as the capacity, inserted round-robin (all of them once to fill
    // every shard), so each one has left its shard before it comes round
    // again. Token-sized keys: the keyed hash of the token is part of the
    // cost, as in a real insert.
    let principal = cached.verify(Some(&header), &keys, NOW).expect("verified");
    let tokens: Vec<String> = (0..2 * FULL).map(|i| format!("{token}{i:05}")).collect();
    let cache = full_cache(&tokens, &principal);
    let mut next = 0;
    c.bench_function("auth/cache_insert_full_10000", |b| {
        b.iter(|| {
            let t = &tokens[next];
            next = (next + 1) % tokens.len();
            cache.insert(black_box(t), principal.clone(), NOW + 60, NOW);
        })
    });
    assert!(cache.len() <= FULL);
    insert_only_cost(c, &principal);
}

/// The same full-cache insert with short tokens, so that the cache's own work
/// (locking, eviction, map and list updates) is not hidden by hashing ~900 bytes.
fn insert_only_cost(c: &mut Criterion, principal: &Principal) {
    let tokens: Vec<String> = (0..2 * FULL).map(|i| format!("t{i}")).collect();
    let cache = full_cache(&tokens, principal);
    let mut next = 0;
    c.bench_function("auth/cache_insert_full_10000_short_token", |b| {
        b.iter(|| {
            let t = &tokens[next];
            next = (next + 1) % tokens.len();
            cache.insert(black_box(t), principal.clone(), NOW + 60, NOW);
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
