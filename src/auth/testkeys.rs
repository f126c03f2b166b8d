//! Key and token minting for tests, benchmarks and `sluice demo`: fresh key
//! pairs generated with aws-lc-rs, their public JWK, and signed tokens.
//!
//! Compiled into the main crate (the demo mints its tokens with it), so it
//! uses only normal dependencies (jsonwebtoken, aws-lc-rs, serde_json) and a
//! small local base64url encoder. Nothing here is used to verify tokens.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::Value;

/// A generated key: the private signing key, its public JWK (with `kid`,
/// `alg` and `use: "sig"`), and the `kid`.
pub type GeneratedKey = (EncodingKey, Value, String);

/// Generate an RSA-2048 key pair for RS256.
pub fn generate_rsa() -> Result<GeneratedKey, String> {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|e| e.to_string())?;
    let pkcs8 = pair.as_der().map_err(|e| e.to_string())?;
    // jsonwebtoken signs with an RFC 8017 RSAPrivateKey; PKCS#8 wraps it.
    let pkcs1 = pkcs8_private_key(pkcs8.as_ref()).ok_or("bad PKCS#8 document")?;
    finish(EncodingKey::from_rsa_der(pkcs1), Algorithm::RS256, "rsa")
}

/// Generate an EC P-256 key pair for ES256.
pub fn generate_ec() -> Result<GeneratedKey, String> {
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|e| e.to_string())?;
    finish(
        EncodingKey::from_ec_der(doc.as_ref()),
        Algorithm::ES256,
        "ec",
    )
}

/// Generate an Ed25519 key pair for EdDSA.
pub fn generate_ed25519() -> Result<GeneratedKey, String> {
    let rng = SystemRandom::new();
    let doc = Ed25519KeyPair::generate_pkcs8v1(&rng).map_err(|e| e.to_string())?;
    finish(
        EncodingKey::from_ed_der(doc.as_ref()),
        Algorithm::EdDSA,
        "ed",
    )
}

fn finish(key: EncodingKey, alg: Algorithm, prefix: &str) -> Result<GeneratedKey, String> {
    let kid = random_kid(prefix)?;
    let jwk = Jwk::from_encoding_key(&key, alg).map_err(|e| e.to_string())?;
    let mut value = serde_json::to_value(&jwk).map_err(|e| e.to_string())?;
    value["kid"] = Value::String(kid.clone());
    value["use"] = Value::String("sig".into());
    Ok((key, value, kid))
}

fn random_kid(prefix: &str) -> Result<String, String> {
    let mut bytes = [0u8; 8];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|e| e.to_string())?;
    Ok(format!("test_{prefix}_{}", b64url(&bytes)))
}

/// The public key of an RSA signing key as DER `SubjectPublicKeyInfo` (the
/// bytes inside a `PUBLIC KEY` PEM), e.g. to try algorithm-confusion attacks.
pub fn rsa_public_key_der(key: &EncodingKey) -> Result<Vec<u8>, String> {
    let pair = aws_lc_rs::rsa::KeyPair::from_der(key.as_bytes()).map_err(|e| e.to_string())?;
    let der = pair.public_key().as_der().map_err(|e| e.to_string())?;
    Ok(der.as_ref().to_vec())
}

/// A JWKS document `{"keys": [...]}` from public JWKs.
pub fn jwks(keys: &[Value]) -> Value {
    serde_json::json!({ "keys": keys })
}

/// Sign `claims` with `key` as a compact JWT (header `typ: JWT`, `kid` when given).
pub fn mint(
    claims: &Value,
    key: &EncodingKey,
    alg: Algorithm,
    kid: Option<&str>,
) -> Result<String, String> {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, key).map_err(|e| e.to_string())
}

/// An unsigned compact token `b64url(header).b64url(claims).` — for
/// testing that `alg: none` and other hand-made headers are refused.
pub fn unsigned(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// Base64url without padding (RFC 4648 §5).
pub fn b64url(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// The `privateKey` OCTET STRING of a PKCS#8 `PrivateKeyInfo`.
fn pkcs8_private_key(der: &[u8]) -> Option<&[u8]> {
    let (tag, body, _) = der_tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (_version, _, rest) = der_tlv(body)?;
    let (_algorithm, _, rest) = der_tlv(rest)?;
    let (tag, key, _) = der_tlv(rest)?;
    (tag == 0x04).then_some(key)
}

/// One DER TLV: (tag, contents, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, after) = rest.split_at(n);
        rest = after;
        len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b64url_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, enc) in cases {
            assert_eq!(b64url(plain.as_bytes()), enc);
        }
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn generated_keys_have_public_jwks() {
        let (_, rsa, kid) = generate_rsa().unwrap();
        assert_eq!(rsa["kty"], "RSA");
        assert_eq!(rsa["alg"], "RS256");
        assert_eq!(rsa["kid"], kid.as_str());
        assert!(rsa.get("d").is_none(), "no private member");
        let (_, ec, _) = generate_ec().unwrap();
        assert_eq!(
            (ec["kty"].as_str(), ec["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        let (_, ed, _) = generate_ed25519().unwrap();
        assert_eq!(
            (ed["kty"].as_str(), ed["crv"].as_str()),
            (Some("OKP"), Some("Ed25519"))
        );
    }
}
