//! Token verification cost: a fresh RS256 token (full signature check, cache
//! disabled) against a cached one (SHA-256 of the token and a map lookup).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use jsonwebtoken::Algorithm;
use serde_json::json;
use sluice::auth::claims::Policy;
use sluice::auth::keys::KeySet;
use sluice::auth::testkeys;
use sluice::auth::verify::Verifier;

const ISS: &str = "https://example.clerk.accounts.dev";
const NOW: u64 = 1_700_000_000;

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
}

criterion_group!(benches, bench);
criterion_main!(benches);
