//! Verification keys: a [`KeySet`] built from a JWKS document (asymmetric
//! keys) or from an explicitly configured HS256 secret.
//!
//! Each key is bound to exactly one [`Algorithm`], pinned from the JWK `alg`
//! member when present, otherwise derived from the key type (RSA → RS256,
//! EC P-256 → ES256, EC P-384 → ES384, OKP Ed25519 → EdDSA). The verifier
//! accepts a token only when its header `alg` equals the algorithm of the key
//! it selects, so `none`, HS256-signed-with-the-public-key and RS/ES mix-ups
//! are impossible. A JWKS never yields symmetric keys: `oct` members are
//! skipped, and only [`KeySet::from_hs256_secret`] makes an HMAC set.
//!
//! Parsing is tolerant: a JWKS member of an unknown type, with `use` other
//! than `sig`, with `key_ops` lacking `verify`, with an algorithm that does
//! not fit its type, or with unusable key material is skipped, not fatal.

use std::collections::HashMap;
use std::fmt;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use serde::Deserialize;

/// Minimum HS256 secret length in bytes (RFC 7518 §3.2: at least the hash size).
pub const MIN_HS256_SECRET_LEN: usize = 32;

/// Why a key set could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The document is not JSON of the form `{"keys": [...]}`.
    InvalidJson,
    /// The document has no key usable for verifying signatures. Callers
    /// refreshing a JWKS should keep their previous keys.
    NoUsableKeys,
    /// The HS256 secret is shorter than [`MIN_HS256_SECRET_LEN`] bytes.
    WeakSecret,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyError::InvalidJson => "JWKS is not a JSON object with a keys array",
            KeyError::NoUsableKeys => "JWKS has no usable signature verification key",
            KeyError::WeakSecret => "HS256 secret must be at least 32 bytes",
        })
    }
}

impl std::error::Error for KeyError {}

/// Verification keys, each bound to one algorithm, looked up by `kid`.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    no_kid: Option<(DecodingKey, Algorithm)>,
    symmetric: bool,
    skipped: usize,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    /// An empty asymmetric set (e.g. before the first JWKS fetch): every
    /// lookup misses with [`crate::auth::claims::AuthError::UnknownKey`].
    pub fn empty() -> Self {
        Self::default()
    }

    /// Build a set from a JWKS document, keeping at most `max_keys` usable
    /// keys (later ones are counted as skipped). Keys without `kid` are
    /// allowed; only the first of them is kept.
    pub fn from_jwks(json: &[u8], max_keys: usize) -> Result<KeySet, KeyError> {
        let raw: RawJwks = serde_json::from_slice(json).map_err(|_| KeyError::InvalidJson)?;
        let mut set = KeySet::default();
        for value in raw.keys {
            if set.len() >= max_keys {
                set.skipped += 1;
                continue;
            }
            let Some((kid, key, alg)) = usable_key(value) else {
                set.skipped += 1;
                continue;
            };
            let slot_taken = match &kid {
                Some(k) => set.by_kid.contains_key(k),
                None => set.no_kid.is_some(),
            };
            if slot_taken {
                set.skipped += 1;
                continue;
            }
            match kid {
                Some(k) => {
                    set.by_kid.insert(k, (key, alg));
                }
                None => set.no_kid = Some((key, alg)),
            }
        }
        if set.is_empty() {
            return Err(KeyError::NoUsableKeys);
        }
        Ok(set)
    }

    /// A symmetric set holding one HS256 secret (development only; must be
    /// configured explicitly). Tokens may carry any `kid` or none.
    pub fn from_hs256_secret(secret: &[u8]) -> Result<KeySet, KeyError> {
        if secret.len() < MIN_HS256_SECRET_LEN {
            return Err(KeyError::WeakSecret);
        }
        Ok(KeySet {
            by_kid: HashMap::new(),
            no_kid: Some((DecodingKey::from_secret(secret), Algorithm::HS256)),
            symmetric: true,
            skipped: 0,
        })
    }

    /// The key for a token's `kid` and the one algorithm it accepts.
    ///
    /// - `Some(kid)`: the key with that `kid`; failing that, the only key
    ///   of a one-key set whose key has no `kid`.
    /// - `None`: the only key of a one-key set; otherwise no match.
    pub fn find(&self, kid: Option<&str>) -> Option<(&DecodingKey, Algorithm)> {
        let only = || {
            if self.len() != 1 {
                return None;
            }
            self.no_kid
                .as_ref()
                .or_else(|| self.by_kid.values().next())
                .map(|(k, a)| (k, *a))
        };
        match kid {
            Some(k) => match self.by_kid.get(k) {
                Some((key, alg)) => Some((key, *alg)),
                None if self.by_kid.is_empty() => only(),
                None => None,
            },
            None => only(),
        }
    }

    /// True for an HS256 secret set, false for a JWKS set.
    pub fn is_symmetric(&self) -> bool {
        self.symmetric
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.by_kid.len() + usize::from(self.no_kid.is_some())
    }

    /// True when the set has no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of JWKS members that were skipped (unusable, duplicate or over the cap).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The `kid`s of the keys (sorted), for logging.
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.by_kid.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }
}

fn usable_key(value: serde_json::Value) -> Option<(Option<String>, DecodingKey, Algorithm)> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    let common = &jwk.common;
    match &common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(_) => return None,
    }
    if let Some(ops) = &common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return None;
        }
    }
    let pinned = common.key_algorithm;
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => match pinned {
            None => Algorithm::RS256,
            Some(KeyAlgorithm::RS256) => Algorithm::RS256,
            Some(KeyAlgorithm::RS384) => Algorithm::RS384,
            Some(KeyAlgorithm::RS512) => Algorithm::RS512,
            Some(KeyAlgorithm::PS256) => Algorithm::PS256,
            Some(KeyAlgorithm::PS384) => Algorithm::PS384,
            Some(KeyAlgorithm::PS512) => Algorithm::PS512,
            Some(_) => return None,
        },
        AlgorithmParameters::EllipticCurve(p) => {
            let (alg, pin) = match p.curve {
                EllipticCurve::P256 => (Algorithm::ES256, KeyAlgorithm::ES256),
                EllipticCurve::P384 => (Algorithm::ES384, KeyAlgorithm::ES384),
                _ => return None,
            };
            if pinned.is_some_and(|a| a != pin) {
                return None;
            }
            alg
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 || pinned.is_some_and(|a| a != KeyAlgorithm::EdDSA)
            {
                return None;
            }
            Algorithm::EdDSA
        }
        // Symmetric keys are never taken from a JWKS; unknown types are skipped.
        _ => return None,
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    if !material_fits(&key, alg) {
        return None;
    }
    Some((common.key_id.clone(), key, alg))
}

/// Cheap sanity checks of the key material, so that a broken JWKS member is
/// skipped at load time rather than failing every verification.
fn material_fits(key: &DecodingKey, alg: Algorithm) -> bool {
    match (key.kind(), alg) {
        (DecodingKeyKind::RsaModulusExponent { n, e }, _) => {
            let bits = bit_len(n);
            (2048..=8192).contains(&bits) && bit_len(e) >= 2
        }
        (DecodingKeyKind::SecretOrDer(point), Algorithm::ES256) => point.len() == 65,
        (DecodingKeyKind::SecretOrDer(point), Algorithm::ES384) => point.len() == 97,
        (DecodingKeyKind::SecretOrDer(x), Algorithm::EdDSA) => x.len() == 32,
        _ => false,
    }
}

fn bit_len(big_endian: &[u8]) -> usize {
    match big_endian.iter().position(|b| *b != 0) {
        Some(i) => (big_endian.len() - i) * 8 - big_endian[i].leading_zeros() as usize,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testkeys;
    use serde_json::json;

    fn jwks(keys: Vec<serde_json::Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": keys })).unwrap()
    }

    #[test]
    fn parses_rsa_ec_okp_and_skips_the_rest() {
        let (_, rsa, rsa_kid) = testkeys::generate_rsa().unwrap();
        let (_, ec, ec_kid) = testkeys::generate_ec().unwrap();
        let (_, ed, ed_kid) = testkeys::generate_ed25519().unwrap();
        let mut enc = rsa.clone();
        enc["use"] = json!("enc");
        enc["kid"] = json!("enc-key");
        let mut ops = rsa.clone();
        ops["key_ops"] = json!(["encrypt"]);
        ops["kid"] = json!("ops-key");
        let mut mislabeled = ec.clone();
        mislabeled["alg"] = json!("RS256");
        mislabeled["kid"] = json!("mislabeled");
        let mut short_rsa = rsa.clone();
        short_rsa["n"] = json!("AQAB");
        short_rsa["kid"] = json!("short");
        let doc = jwks(vec![
            rsa.clone(),
            ec,
            ed,
            json!({"kty": "oct", "k": "c2VjcmV0", "kid": "oct"}),
            json!({"kty": "weird", "kid": "weird"}),
            json!({"kty": "RSA", "kid": "broken"}),
            json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA", "kid": "p521"}),
            json!(42),
            enc,
            ops,
            mislabeled,
            short_rsa,
            rsa, // duplicate kid
        ]);
        let set = KeySet::from_jwks(&doc, 16).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.skipped(), 10);
        assert!(!set.is_symmetric());
        assert_eq!(set.find(Some(&rsa_kid)).unwrap().1, Algorithm::RS256);
        assert_eq!(set.find(Some(&ec_kid)).unwrap().1, Algorithm::ES256);
        assert_eq!(set.find(Some(&ed_kid)).unwrap().1, Algorithm::EdDSA);
        assert!(set.find(Some("oct")).is_none());
        assert!(set.find(None).is_none(), "no kid with several keys");
        let mut kids = vec![rsa_kid.as_str(), ec_kid.as_str(), ed_kid.as_str()];
        kids.sort_unstable();
        assert_eq!(set.kids(), kids);
    }

    #[test]
    fn pins_alg_and_caps() {
        let (_, mut rsa, kid) = testkeys::generate_rsa().unwrap();
        rsa["alg"] = json!("PS384");
        let set = KeySet::from_jwks(&jwks(vec![rsa.clone()]), 8).unwrap();
        assert_eq!(set.find(Some(&kid)).unwrap().1, Algorithm::PS384);
        // without alg: RS256
        rsa.as_object_mut().unwrap().remove("alg");
        let set = KeySet::from_jwks(&jwks(vec![rsa.clone()]), 8).unwrap();
        assert_eq!(set.find(Some(&kid)).unwrap().1, Algorithm::RS256);
        // single key: a token without kid, or with a different kid, does not
        // match a kid'd key unless it is the only key and kid-less
        assert!(set.find(None).is_some());
        assert!(set.find(Some("other")).is_none());
        rsa.as_object_mut().unwrap().remove("kid");
        let set = KeySet::from_jwks(&jwks(vec![rsa.clone()]), 8).unwrap();
        assert!(set.find(None).is_some());
        assert!(set.find(Some("other")).is_some());

        let many: Vec<_> = (0..5)
            .map(|i| {
                let mut k = rsa.clone();
                k["kid"] = json!(format!("k{i}"));
                k
            })
            .collect();
        let set = KeySet::from_jwks(&jwks(many), 3).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.skipped(), 2);
    }

    #[test]
    fn errors() {
        assert_eq!(
            KeySet::from_jwks(b"not json", 8).unwrap_err(),
            KeyError::InvalidJson
        );
        assert_eq!(
            KeySet::from_jwks(b"{}", 8).unwrap_err(),
            KeyError::InvalidJson
        );
        assert_eq!(
            KeySet::from_jwks(b"[]", 8).unwrap_err(),
            KeyError::InvalidJson
        );
        assert_eq!(
            KeySet::from_jwks(br#"{"keys":[]}"#, 8).unwrap_err(),
            KeyError::NoUsableKeys
        );
        assert_eq!(
            KeySet::from_jwks(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, 8).unwrap_err(),
            KeyError::NoUsableKeys
        );
        let (_, rsa, _) = testkeys::generate_rsa().unwrap();
        assert_eq!(
            KeySet::from_jwks(&jwks(vec![rsa]), 0).unwrap_err(),
            KeyError::NoUsableKeys
        );
        assert_eq!(
            KeySet::from_hs256_secret(b"short").unwrap_err(),
            KeyError::WeakSecret
        );
    }

    #[test]
    fn hs256_set() {
        let set = KeySet::from_hs256_secret(&[7u8; 32]).unwrap();
        assert!(set.is_symmetric());
        assert_eq!(set.len(), 1);
        assert_eq!(set.find(None).unwrap().1, Algorithm::HS256);
        assert_eq!(set.find(Some("any")).unwrap().1, Algorithm::HS256);
        let empty = KeySet::empty();
        assert!(empty.is_empty() && !empty.is_symmetric());
        assert!(empty.find(None).is_none() && empty.find(Some("k")).is_none());
    }
}
