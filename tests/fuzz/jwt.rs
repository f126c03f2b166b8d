//! Targets `jwt` and `jwks`: what the gateway reads from a client's `Authorization` header (the
//! token's segments, its header and its claims: `sluice::auth::verify::Verifier` through its
//! public API, `sluice::auth::claims`) and from a JWKS document (`KeySet::from_jwks`).
//!
//! `jwt` reads its input four ways, all verified with an HS256 key set at a fixed clock and a
//! policy chosen by the input: as the whole `Authorization` value; as the claims of a token
//! signed with the key (so that the claims are reached); as `header JSON \n claims JSON` of a
//! signed token; and as choices for a generated header and claims, signed or not. Properties:
//! - nothing panics;
//! - every refusal has a known metric reason and a 401/403 status, a sanitised `alg`, and never
//!   names an unknown key (a secret set takes any `kid`); its `WWW-Authenticate` value is a
//!   well-formed header value;
//! - a token is accepted only if its signature is the key's HMAC of its first two segments,
//!   its header names `HS256` (no `crit`, `typ` absent or `JWT`), and its claims parse and pass
//!   `claims::check` giving the same principal (so the policy is never bypassed);
//! - conversely a well-formed token (canonical header, valid signature, claims that pass
//!   `check` with `exp`, `sub`, `iss` in the types jsonwebtoken reads) is accepted;
//! - verifying the same token again (now from the cache) gives the same answer, reason
//!   included;
//! - `Claims` parsing and `check` on the raw input never panic, and an accepted principal
//!   satisfies the time rules, the issuer and the role.

use aws_lc_rs::hmac;
use serde_json::{json, Map, Value};
use sluice::auth::claims::{check as check_claims, normalize_role, AuthError, Claims, Policy};
use sluice::auth::keys::KeySet;
use sluice::auth::testkeys::b64url;
use sluice::auth::verify::{bearer_token, Verifier};

use super::engine::{Features, Target};
use super::gen::Gen;

pub const TARGET: Target = Target {
    name: "jwt",
    check,
    dictionary: &[
        b"Bearer ",
        b"bearer ",
        b".",
        b"\"alg\":\"HS256\"",
        b"\"alg\":\"none\"",
        b"\"alg\":\"RS256\"",
        b"\"typ\":\"JWT\"",
        b"\"kid\":",
        b"\"crit\":[]",
        b"\"exp\":",
        b"\"nbf\":",
        b"\"iat\":",
        b"\"iss\":\"https://clerk.example.com\"",
        b"\"sub\":\"user_1\"",
        b"\"aud\":",
        b"\"azp\":",
        b"\"v\":2",
        b"\"o\":{\"id\":\"org_1\",\"rol\":\"admin\"}",
        b"\"org_id\":\"org_1\"",
        b"\"org_role\":\"org:admin\"",
        b"\"sts\":\"pending\"",
        b"1750000000",
        b"1750000100",
        b"1.5e9",
        b"null",
        b"\n",
        b"\"",
        b"{}",
    ],
    max_len: 4096,
    must_see: &[
        "accepted",
        "refused expired",
        "refused bad_signature",
        "refused unsupported_algorithm",
        "refused malformed_token",
        "refused malformed_header",
        "refused missing_token",
        "refused insufficient_role",
        "refused no_organization",
        "refused wrong_issuer",
        "refused pending_session",
        "refused not_yet_valid",
        "refused issued_in_future",
        "refused missing_subject",
        "claims ok",
    ],
};

const SECRET: &[u8] = b"fuzzing-secret-fuzzing-secret-0123456789";
const NOW: u64 = 1_750_000_000;
const ISSUER: &str = "https://clerk.example.com";

fn sign(signing_input: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET);
    b64url(hmac::sign(&key, signing_input.as_bytes()).as_ref())
}

/// A policy chosen by the input's first byte: audience and origin checks on or off, the role
/// with or without its prefix, leeway 0 or 5.
fn policy(b: u8) -> Policy {
    let mut p = Policy::new(ISSUER);
    if b & 1 != 0 {
        p.audience = vec!["aud_1".into(), "aud_2".into()];
    }
    if b & 2 != 0 {
        p.allowed_origins = vec!["https://app.example".into()];
    }
    if b & 4 != 0 {
        p.required_role = "admin".into();
    }
    if b & 8 != 0 {
        p.leeway_secs = 0;
    }
    p
}

/// A token whose parts we know.
struct Made {
    token: String,
    header: Vec<u8>,
    claims: Vec<u8>,
    signed: bool,
}

fn make(header: &[u8], claims: &[u8], signed: bool) -> Made {
    let input = format!("{}.{}", b64url(header), b64url(claims));
    let sig = if signed {
        sign(&input)
    } else {
        // Right length, wrong bytes.
        let mut s = sign(&input).into_bytes();
        s[0] = if s[0] == b'A' { b'B' } else { b'A' };
        String::from_utf8(s).unwrap_or_default()
    };
    Made {
        token: format!("{input}.{sig}"),
        header: header.to_vec(),
        claims: claims.to_vec(),
        signed,
    }
}

fn check(input: &[u8], features: &mut Features) -> Result<(), String> {
    let policy = policy(input.first().copied().unwrap_or(0));
    let keys = KeySet::from_hs256_secret(SECRET).map_err(|e| e.to_string())?;
    let verifier = Verifier::new(policy.clone(), 16);

    // 1. The whole input as the header value (and, without the scheme, as the token).
    let text = String::from_utf8_lossy(input);
    let r = verifier.verify(Some(&text), &keys, NOW);
    refusal_is_clean(&r, features)?;
    match bearer_token(Some(&text)) {
        Ok(token) => oracle(&verifier, &keys, token, None, &r, features)?,
        Err(e) if r != Err(e.clone()) => {
            return Err(format!(
                "bearer: the header is {e:?}, but verify gives {r:?}"
            ));
        }
        Err(_) => {}
    }
    let token = text.trim();
    let r = verifier.verify(Some(&format!("Bearer {token}")), &keys, NOW);
    refusal_is_clean(&r, features)?;
    oracle(&verifier, &keys, token, None, &r, features)?;
    if verifier.verify(None, &keys, NOW) != Err(AuthError::MissingToken) {
        return Err("missing: no header is not MissingToken".into());
    }
    features.add("refused missing_token");

    // 2. The input as the claims of a signed token.
    let canonical = br#"{"alg":"HS256","typ":"JWT"}"#;
    verify_made(&verifier, &keys, &make(canonical, input, true), features)?;
    claims_alone(input, &policy, features)?;

    // 3. `header \n claims`.
    if let Some(nl) = input.iter().position(|b| *b == b'\n') {
        let made = make(&input[..nl], &input[nl + 1..], true);
        verify_made(&verifier, &keys, &made, features)?;
    }

    // 4. Generated.
    let mut g = Gen::new(input);
    let header = gen_header(&mut g);
    let claims = gen_claims(&mut g);
    let signed = g.chance(230);
    let made = make(
        header.to_string().as_bytes(),
        claims.to_string().as_bytes(),
        signed,
    );
    verify_made(&verifier, &keys, &made, features)?;
    Ok(())
}

fn verify_made(
    verifier: &Verifier,
    keys: &KeySet,
    made: &Made,
    features: &mut Features,
) -> Result<(), String> {
    let r = verifier.verify(Some(&format!("Bearer {}", made.token)), keys, NOW);
    refusal_is_clean(&r, features)?;
    oracle(verifier, keys, &made.token, Some(made), &r, features)
}

/// A refusal says only fixed, known things.
fn refusal_is_clean(
    r: &Result<sluice::auth::Principal, AuthError>,
    features: &mut Features,
) -> Result<(), String> {
    let Err(e) = r else {
        return Ok(());
    };
    features.add(&format!("refused {}", e.reason()));
    if !AuthError::REASONS.contains(&e.reason()) || !matches!(e.status(), 401 | 403) {
        return Err(format!(
            "refusal: {e:?} has reason {} status {}",
            e.reason(),
            e.status()
        ));
    }
    match e {
        AuthError::UnknownKey(_) | AuthError::KeysUnavailable => {
            return Err(format!("refusal: {e:?} with a secret key set"));
        }
        AuthError::UnsupportedAlgorithm(alg) => {
            let sane = alg == "unrecognized"
                || (!alg.is_empty()
                    && alg.len() <= 16
                    && alg.chars().all(|c| c.is_ascii_alphanumeric()));
            if !sane {
                return Err(format!("refusal: unsanitised alg {alg:?}"));
            }
        }
        _ => {}
    }
    let challenge = e.www_authenticate().unwrap_or_default();
    for text in [challenge.as_str(), e.description()] {
        if text.contains(['\n', '\r', '\\']) || text.matches('"').count() % 2 != 0 {
            return Err(format!("refusal: unsafe header text {text:?}"));
        }
    }
    Ok(())
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        bits = bits << 6 | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    Some(out)
}

/// The jsonwebtoken-side conditions of acceptance that `check` does not cover: `exp` a number
/// jsonwebtoken reads as a u64, `sub` and `iss` strings, and `aud` when an audience is set.
fn jsonwebtoken_reads(claims: &Value, policy: &Policy) -> bool {
    required_missing(claims, policy) == 0
        && claims.get("iss").is_some_and(Value::is_string)
        && claims.get("aud").is_none_or(|a| {
            a.is_string() || a.as_array().is_some_and(|l| l.iter().all(Value::is_string))
        })
}

/// How many of the claims jsonwebtoken requires (`exp`, `sub`, `iss`, and `aud` when an
/// audience is configured) it would not read from `claims`.
fn required_missing(claims: &Value, policy: &Policy) -> usize {
    let strings =
        |v: &Value| v.is_string() || v.as_array().is_some_and(|l| l.iter().all(Value::is_string));
    let exp = match claims.get("exp") {
        Some(Value::Number(n)) => {
            n.is_u64() || n.as_f64().is_some_and(|f| f >= 0.0 && f < u64::MAX as f64)
        }
        _ => false,
    };
    let sub = claims.get("sub").is_some_and(Value::is_string);
    let iss = claims.get("iss").is_some_and(strings);
    let aud = policy.audience.is_empty() || claims.get("aud").is_some_and(strings);
    [exp, sub, iss, aud].iter().filter(|ok| !**ok).count()
}

/// Acceptance implies the key's signature, a sane header and the claim policy; a well-formed
/// token is accepted; a second verification (from the cache) agrees.
fn oracle(
    verifier: &Verifier,
    keys: &KeySet,
    token: &str,
    made: Option<&Made>,
    r: &Result<sluice::auth::Principal, AuthError>,
    features: &mut Features,
) -> Result<(), String> {
    let policy = verifier.policy();
    let segments: Vec<&str> = token.split('.').collect();
    let decoded = match segments[..] {
        [h, c, s] => match (b64url_decode(h), b64url_decode(c), b64url_decode(s)) {
            (Some(h), Some(c), Some(s)) => Some((h, c, s)),
            _ => None,
        },
        _ => None,
    };
    let again = verifier.verify(Some(&format!("Bearer {token}")), keys, NOW);
    if again != *r {
        // Once a finding (jsonwebtoken checked its required claims in `HashSet` order, so the
        // reason varied between calls); presence is now `claims::check`'s, in a fixed order.
        return Err(format!("cache: first {r:?}, then {again:?}"));
    }
    if let Ok(p) = r {
        features.add("accepted");
        let Some((header, claims, sig)) = decoded else {
            return Err(format!(
                "accepted: a token without three base64url segments {token:?}"
            ));
        };
        let want_sig = {
            let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET);
            let (input, _) = token.rsplit_once('.').unwrap_or_default();
            hmac::sign(&key, input.as_bytes()).as_ref().to_vec()
        };
        if sig != want_sig {
            return Err("accepted: a token whose signature is not the key's".into());
        }
        let header: Value = serde_json::from_slice(&header)
            .map_err(|e| format!("accepted: a header that is not JSON: {e}"))?;
        let sane = header["alg"] == "HS256"
            && header.get("crit").is_none()
            && header
                .get("typ")
                .is_none_or(|t| t.as_str().is_some_and(|t| t.eq_ignore_ascii_case("JWT")));
        if !sane {
            return Err(format!("accepted: header {header}"));
        }
        let claims: Claims = serde_json::from_slice(&claims)
            .map_err(|e| format!("accepted: claims that do not parse: {e}"))?;
        let checked = check_claims(&claims, policy, NOW);
        if checked.as_ref() != Ok(p) {
            return Err(format!("accepted: {p:?}, but check says {checked:?}"));
        }
        principal_is_sane(&claims, policy, p)?;
    }
    if let (Some(m), Err(e)) = (made, r) {
        // Must-accept: a canonical header, a valid signature, claims check accepts.
        let header: Option<Value> = serde_json::from_slice(&m.header).ok();
        let canonical = header.as_ref().is_some_and(|h| {
            let o = h.as_object();
            o.is_some_and(|o| {
                o.keys().all(|k| k == "alg" || k == "typ")
                    && o.get("alg") == Some(&json!("HS256"))
                    && o.get("typ").is_none_or(|t| t == "JWT")
            })
        });
        let claims_value: Option<Value> = serde_json::from_slice(&m.claims).ok();
        let claims: Option<Claims> = serde_json::from_slice(&m.claims).ok();
        if let (true, true, Some(v), Some(c)) = (m.signed, canonical, claims_value, claims) {
            if check_claims(&c, policy, NOW).is_ok()
                && jsonwebtoken_reads(&v, policy)
                && token.len() <= sluice::auth::verify::MAX_TOKEN_BYTES
            {
                return Err(format!(
                    "refused-valid: {e:?} for a well-formed token with claims {v}"
                ));
            }
        }
    }
    Ok(())
}

/// What an accepted principal must satisfy, read from the claims directly.
fn principal_is_sane(
    c: &Claims,
    policy: &Policy,
    p: &sluice::auth::Principal,
) -> Result<(), String> {
    let leeway = policy.leeway_secs;
    let exp = c.exp.ok_or("principal: accepted without exp")?;
    let ok = exp.saturating_add(leeway) > NOW
        && c.nbf.is_none_or(|n| n <= NOW + leeway)
        && c.iat.is_none_or(|n| n <= NOW + leeway)
        && c.iss.as_deref() == Some(ISSUER)
        && c.sub.as_deref() == Some(p.user_id.as_str())
        && !p.user_id.is_empty()
        && !p.org_id.is_empty()
        && p.org_role == normalize_role(&policy.required_role)
        && c.sts.as_deref() != Some("pending");
    if !ok {
        return Err(format!("principal: {p:?} accepted from {c:?}"));
    }
    Ok(())
}

/// `Claims` from the raw input, and `check` on them at a few clocks.
fn claims_alone(input: &[u8], policy: &Policy, features: &mut Features) -> Result<(), String> {
    let Ok(c) = serde_json::from_slice::<Claims>(input) else {
        return Ok(());
    };
    features.add("claims ok");
    for now in [0, NOW, u64::MAX] {
        if let Ok(p) = check_claims(&c, policy, now) {
            let leeway = policy.leeway_secs;
            let exp = c.exp.unwrap_or(0);
            if exp.saturating_add(leeway) <= now
                || c.nbf.is_some_and(|n| n > now.saturating_add(leeway))
                || p.org_role != normalize_role(&policy.required_role)
            {
                return Err(format!("check: {p:?} at {now} from {c:?}"));
            }
        }
    }
    Ok(())
}

const CLAIM_STRINGS: &[&str] = &[
    ISSUER,
    "https://evil.example.com",
    "user_1",
    "",
    "org_1",
    "org:admin",
    "admin",
    "org:member",
    "member",
    "pending",
    "active",
    "aud_1",
    "aud_3",
    "https://app.example",
];

const CLAIM_KEYS: &[&str] = &[
    "exp", "nbf", "iat", "iss", "sub", "aud", "azp", "v", "sts", "org_id", "org_role", "org_slug",
    "o", "id", "rol", "slg",
];

fn gen_header(g: &mut Gen) -> Value {
    let mut h = Map::new();
    if !g.chance(10) {
        let alg = g.string(&[
            "HS256", "HS256", "HS256", "hs256", "HS384", "RS256", "none", "None", "ES256", "EdDSA",
        ]);
        h.insert("alg".into(), json!(alg));
    }
    if g.chance(128) {
        let typ = if g.chance(220) {
            json!(g.string(&["JWT", "jwt", "at+jwt"]))
        } else {
            g.number()
        };
        h.insert("typ".into(), typ);
    }
    if g.chance(64) {
        let kid = if g.chance(220) {
            json!(g.string(&["k1", "", "a\u{1}b", &"k".repeat(300)]))
        } else {
            g.number()
        };
        h.insert("kid".into(), kid);
    }
    if g.chance(12) {
        h.insert("crit".into(), json!(["b64"]));
    }
    if g.chance(12) {
        h.insert(
            g.string(&["jwk", "x5c", "cty", "zip"]),
            g.value(1, CLAIM_KEYS, CLAIM_STRINGS),
        );
    }
    Value::Object(h)
}

/// Claims: usually a complete v1 or v2 session token with every field in range, then a few
/// fields changed (out of range, wrong type, removed).
fn gen_claims(g: &mut Gen) -> Value {
    let mut c = json!({
        "iss": ISSUER,
        "sub": "user_1",
        "exp": NOW + 60,
        "iat": NOW - 5,
        "nbf": NOW - 5,
        "azp": "https://app.example",
        "aud": "aud_1",
    });
    if g.chance(128) {
        c["v"] = json!(2);
        c["o"] = json!({"id": "org_1", "rol": "admin", "slg": "acme"});
    } else {
        c["org_id"] = json!("org_1");
        c["org_role"] = json!("org:admin");
        c["org_slug"] = json!("acme");
    }
    for _ in 0..g.below(4) {
        let k = *g.pick(CLAIM_KEYS);
        let Some(obj) = c.as_object_mut() else { break };
        match g.below(6) {
            0 => {
                obj.remove(k);
            }
            1 | 2 => {
                let n = g.number();
                obj.insert(k.into(), n);
            }
            3 => {
                let s = g.string(CLAIM_STRINGS);
                obj.insert(k.into(), json!(s));
            }
            4 => {
                let l: Vec<Value> = (0..g.below(3))
                    .map(|_| json!(g.string(CLAIM_STRINGS)))
                    .collect();
                obj.insert(k.into(), Value::Array(l));
            }
            _ => {
                let v = g.value(2, CLAIM_KEYS, CLAIM_STRINGS);
                obj.insert(k.into(), v);
            }
        }
    }
    c
}

// ---- jwks ----

pub const JWKS: Target = Target {
    name: "jwks",
    check: check_jwks,
    dictionary: &[
        b"{\"keys\":[",
        b"\"kty\":\"RSA\"",
        b"\"kty\":\"EC\"",
        b"\"kty\":\"OKP\"",
        b"\"kty\":\"oct\"",
        b"\"crv\":\"P-256\"",
        b"\"crv\":\"P-384\"",
        b"\"crv\":\"Ed25519\"",
        b"\"alg\":\"RS256\"",
        b"\"alg\":\"ES256\"",
        b"\"alg\":\"HS256\"",
        b"\"use\":\"sig\"",
        b"\"use\":\"enc\"",
        b"\"key_ops\":[\"verify\"]",
        b"\"kid\":\"k1\"",
        b"\"n\":\"",
        b"\"e\":\"AQAB\"",
        b"\"x\":\"",
        b"\"y\":\"",
        b"AAAA",
        b"null",
        b"{}",
        b"]",
    ],
    max_len: 8192,
    must_see: &[
        "jwks ok",
        "jwks invalid",
        "jwks none usable",
        "jwks skipped",
    ],
};

fn check_jwks(input: &[u8], features: &mut Features) -> Result<(), String> {
    jwks_one(input, features)?;
    // Generated: the input's members reordered, duplicated, or given another kid or alg.
    if let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(input) {
        if let Some(Value::Array(keys)) = doc.get("keys") {
            let mut g = Gen::new(input);
            let mut out = Vec::new();
            for _ in 0..g.below(6) {
                if keys.is_empty() {
                    break;
                }
                let mut k = keys[g.below(keys.len())].clone();
                if let Some(o) = k.as_object_mut() {
                    match g.below(6) {
                        0 => {
                            o.remove("kid");
                        }
                        1 => {
                            o.insert("kid".into(), json!(g.string(&["k1", "k2", ""])));
                        }
                        2 => {
                            let alg =
                                g.string(&["RS256", "PS512", "ES256", "ES384", "EdDSA", "HS256"]);
                            o.insert("alg".into(), json!(alg));
                        }
                        3 => {
                            let field =
                                *g.pick(&["n", "e", "x", "y", "crv", "kty", "use", "key_ops"]);
                            let v =
                                g.value(1, &["verify", "sign"], &["verify", "sig", "enc", "AQAB"]);
                            o.insert(field.into(), v);
                        }
                        _ => {}
                    }
                }
                out.push(k);
            }
            let doc = serde_json::to_vec(&json!({"keys": out})).map_err(|e| e.to_string())?;
            jwks_one(&doc, features)?;
        }
    }
    Ok(())
}

fn jwks_one(input: &[u8], features: &mut Features) -> Result<(), String> {
    let max = 1 + input.len() % 4;
    match KeySet::from_jwks(input, max) {
        Ok(set) => {
            features.add("jwks ok");
            features.count("jwks keys", set.len());
            if set.skipped() > 0 {
                features.add("jwks skipped");
            }
            // The members, counted as the JWKS reader reads the document: other members of
            // the object are skipped unchecked (`{"keys":[...],"x":1e400}` is fine).
            #[derive(serde::Deserialize)]
            struct Members {
                keys: Vec<serde::de::IgnoredAny>,
            }
            let members = serde_json::from_slice::<Members>(input)
                .map_err(|e| format!("jwks: accepted a document without a keys array: {e}"))?
                .keys
                .len();
            let kids = set.kids();
            let sorted = kids.windows(2).all(|w| w[0] < w[1]);
            if set.is_empty()
                || set.len() > max
                || set.is_symmetric()
                || set.len() + set.skipped() != members
                || kids.len() > set.len()
                || !sorted
            {
                return Err(format!(
                    "jwks: {} keys, {} skipped, of {members} members (max {max}), kids {kids:?}",
                    set.len(),
                    set.skipped()
                ));
            }
            for kid in &kids {
                if set.find(Some(kid)).is_none() {
                    return Err(format!("jwks: kid {kid:?} listed but not found"));
                }
            }
        }
        Err(sluice::auth::keys::KeyError::InvalidJson) => features.add("jwks invalid"),
        Err(sluice::auth::keys::KeyError::NoUsableKeys) => features.add("jwks none usable"),
        Err(e) => return Err(format!("jwks: {e:?}")),
    }
    Ok(())
}
