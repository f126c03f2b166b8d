//! Claim policy for Clerk-style session tokens: the one place that decides
//! whether the (already signature-checked) claims of a token are acceptable.
//!
//! This module is pure: no crypto, no clock. The caller passes `now_secs`.
//! It owns the claim shapes ([`Claims`], Clerk v1 and v2), the configured
//! [`Policy`], the verified identity ([`Principal`]) and the closed set of
//! failures ([`AuthError`]) with their HTTP status, metric reason and
//! `WWW-Authenticate` challenge.
//!
//! Time rules (the same as Clerk's `verifyJwt`, with `leeway` = clock skew):
//! - `exp` is required; expired when `exp + leeway <= now`;
//! - `nbf` (optional): not yet valid when `nbf > now + leeway`;
//! - `iat` (optional): issued in the future when `iat > now + leeway`.

use serde::{Deserialize, Deserializer};

/// Default clock skew tolerated on `exp`, `nbf` and `iat`, in seconds (Clerk's default).
pub const DEFAULT_LEEWAY_SECS: u64 = 5;

/// Default organisation role required to use the gateway.
pub const DEFAULT_REQUIRED_ROLE: &str = "org:admin";

/// The claims Sluice reads from a session token. Every member is optional so
/// that the shape check is done by [`check`], with precise errors; members
/// not listed here are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Claims {
    /// Subject: the user id (`user_…`).
    #[serde(default)]
    pub sub: Option<String>,
    /// Issuer: the Clerk Frontend API URL.
    #[serde(default)]
    pub iss: Option<String>,
    /// Authorized party: the browser origin that requested the token.
    #[serde(default)]
    pub azp: Option<String>,
    /// Expiry (unix seconds). Fractions are rounded down.
    #[serde(default, deserialize_with = "numeric_date_floor")]
    pub exp: Option<u64>,
    /// Not before (unix seconds). Fractions are rounded up.
    #[serde(default, deserialize_with = "numeric_date_ceil")]
    pub nbf: Option<u64>,
    /// Issued at (unix seconds). Fractions are rounded up.
    #[serde(default, deserialize_with = "numeric_date_ceil")]
    pub iat: Option<u64>,
    /// Audience: a string or an array of strings.
    #[serde(default)]
    pub aud: Option<Audience>,
    /// Token version: `2` for Clerk v2 tokens, absent for v1.
    #[serde(default)]
    pub v: Option<u64>,
    /// Session status (v2): `"pending"` sessions are refused.
    #[serde(default)]
    pub sts: Option<String>,
    /// v1: active organisation id.
    #[serde(default)]
    pub org_id: Option<String>,
    /// v1: role in the active organisation, e.g. `org:admin`.
    #[serde(default)]
    pub org_role: Option<String>,
    /// v1: slug of the active organisation.
    #[serde(default)]
    pub org_slug: Option<String>,
    /// v2: active organisation, present only when there is one.
    #[serde(default)]
    pub o: Option<OrgV2>,
}

/// The `o` claim of a Clerk v2 token.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct OrgV2 {
    /// Organisation id (`org_…`).
    #[serde(default)]
    pub id: Option<String>,
    /// Role without the `org:` prefix, e.g. `admin`.
    #[serde(default)]
    pub rol: Option<String>,
    /// Organisation slug.
    #[serde(default)]
    pub slg: Option<String>,
}

/// The `aud` claim: one string or several.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// `"aud": "x"`
    One(String),
    /// `"aud": ["x", "y"]`
    Many(Vec<String>),
}

impl Audience {
    /// True when any audience value is in `allowed`.
    pub fn intersects(&self, allowed: &[String]) -> bool {
        match self {
            Audience::One(a) => allowed.iter().any(|x| x == a),
            Audience::Many(list) => list.iter().any(|a| allowed.iter().any(|x| x == a)),
        }
    }
}

/// What a token must satisfy, from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Exact expected `iss` (the Clerk Frontend API URL).
    pub issuer: String,
    /// Accepted audiences. Empty: `aud` is not checked. Non-empty: the token
    /// must carry an `aud` and one of its values must be listed.
    pub audience: Vec<String>,
    /// Accepted `azp` values (browser origins). Empty: not checked.
    /// Non-empty: `azp` must be present and listed (as current Clerk does).
    pub allowed_origins: Vec<String>,
    /// Required organisation role, compared after normalisation
    /// (`admin` and `org:admin` are the same role).
    pub required_role: String,
    /// Tolerated clock skew on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u64,
}

impl Policy {
    /// A policy for `issuer` with the defaults: no audience or origin check,
    /// role `org:admin`, leeway 5 s.
    pub fn new(issuer: impl Into<String>) -> Self {
        Policy {
            issuer: issuer.into(),
            audience: Vec::new(),
            allowed_origins: Vec::new(),
            required_role: DEFAULT_REQUIRED_ROLE.to_string(),
            leeway_secs: DEFAULT_LEEWAY_SECS,
        }
    }
}

/// The verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `sub`: the user id.
    pub user_id: String,
    /// Active organisation id (v1 `org_id`, v2 `o.id`).
    pub org_id: String,
    /// Normalised role, always with the `org:` prefix (e.g. `org:admin`).
    pub org_role: String,
    /// Organisation slug when the token has one.
    pub org_slug: Option<String>,
}

/// Why a request was not authenticated or not authorised. A closed set:
/// [`AuthError::reason`] is the metric label.
///
/// Status codes: 401 for anything wrong with the credentials; 403 when the
/// token is valid but grants no access (`NoOrganization`, `InsufficientRole`,
/// and `PendingSession` — a pending session is a genuine user who has not yet
/// joined/selected the required organisation, so re-authenticating does not
/// help); 503 for `KeysUnavailable` (the gateway cannot verify anything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header.
    MissingToken,
    /// `Authorization` present but not `Bearer <token>`.
    MalformedHeader,
    /// The token is not a well-formed JWT, or lacks `exp`.
    MalformedToken,
    /// `alg` is `none`, unknown, or not the one bound to the selected key.
    /// Carries the (sanitised) header `alg`.
    UnsupportedAlgorithm(String),
    /// No key for the token's `kid` (the caller may refetch the JWKS once).
    UnknownKey(Option<String>),
    /// The signature does not verify.
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    IssuedInFuture,
    /// `iss` missing or not the configured issuer.
    WrongIssuer,
    /// `aud` missing or not accepted (only when an audience is configured).
    WrongAudience,
    /// `azp` missing or not in the allowed origins (only when configured).
    WrongAuthorizedParty,
    /// `sub` missing or empty.
    MissingSubject,
    /// Clerk v2 `sts: "pending"`.
    PendingSession,
    /// Valid token without an active organisation.
    NoOrganization,
    /// Valid token with an organisation role other than the required one.
    InsufficientRole,
    /// The gateway has no keys to verify with (JWKS never loaded).
    KeysUnavailable,
}

impl AuthError {
    /// Every value [`AuthError::reason`] can return, for pre-registering metric labels.
    pub const REASONS: &'static [&'static str] = &[
        "missing_token",
        "malformed_header",
        "malformed_token",
        "unsupported_algorithm",
        "unknown_key",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "wrong_issuer",
        "wrong_audience",
        "wrong_authorized_party",
        "missing_subject",
        "pending_session",
        "no_organization",
        "insufficient_role",
        "keys_unavailable",
    ];

    /// HTTP status: 401, 403 or 503 (see the type's documentation).
    pub fn status(&self) -> u16 {
        match self {
            AuthError::NoOrganization | AuthError::InsufficientRole | AuthError::PendingSession => {
                403
            }
            AuthError::KeysUnavailable => 503,
            _ => 401,
        }
    }

    /// Snake-case metric label, one of [`AuthError::REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::MalformedHeader => "malformed_header",
            AuthError::MalformedToken => "malformed_token",
            AuthError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            AuthError::UnknownKey(_) => "unknown_key",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::IssuedInFuture => "issued_in_future",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::WrongAuthorizedParty => "wrong_authorized_party",
            AuthError::MissingSubject => "missing_subject",
            AuthError::PendingSession => "pending_session",
            AuthError::NoOrganization => "no_organization",
            AuthError::InsufficientRole => "insufficient_role",
            AuthError::KeysUnavailable => "keys_unavailable",
        }
    }

    /// Human-readable explanation, fixed text: safe inside a quoted header
    /// parameter and in a JSON body (no quotes, backslashes or newlines, and
    /// never any part of the token).
    pub fn description(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing Authorization header",
            AuthError::MalformedHeader => {
                "Authorization header must be Bearer followed by one token"
            }
            AuthError::MalformedToken => "the token is not a well-formed JWT with an exp claim",
            AuthError::UnsupportedAlgorithm(_) => "the token algorithm is not accepted",
            AuthError::UnknownKey(_) => "the token was signed with an unknown key",
            AuthError::BadSignature => "the token signature is invalid",
            AuthError::Expired => "the token has expired",
            AuthError::NotYetValid => "the token is not valid yet",
            AuthError::IssuedInFuture => "the token was issued in the future",
            AuthError::WrongIssuer => "the token issuer is not accepted",
            AuthError::WrongAudience => "the token audience is not accepted",
            AuthError::WrongAuthorizedParty => {
                "the token authorized party is not an allowed origin"
            }
            AuthError::MissingSubject => "the token has no subject",
            AuthError::PendingSession => {
                "the session is pending: join or select an organization first"
            }
            AuthError::NoOrganization => "the token has no active organization",
            AuthError::InsufficientRole => "the organization role does not grant access",
            AuthError::KeysUnavailable => "token verification keys are unavailable",
        }
    }

    /// The `WWW-Authenticate` value for a 401 (RFC 6750): plain `Bearer` when
    /// no token was sent, otherwise `Bearer error="invalid_token",
    /// error_description="…"`. `None` for 403 and 503.
    pub fn www_authenticate(&self) -> Option<String> {
        match self {
            AuthError::MissingToken => Some("Bearer".to_string()),
            e if e.status() == 401 => Some(format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                e.description()
            )),
            _ => None,
        }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.description())
    }
}

impl std::error::Error for AuthError {}

/// Normalise an organisation role: add the `org:` prefix when missing
/// (Clerk v2 `rol` is `admin` for `org:admin`). Surrounding whitespace is not
/// trimmed: roles are compared exactly otherwise.
pub fn normalize_role(role: &str) -> String {
    if role.starts_with("org:") {
        role.to_string()
    } else {
        format!("org:{role}")
    }
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// Apply the claim policy at time `now_secs`. Checks, in order: `exp`,
/// `nbf`, `iat` (with leeway), `iss`, `aud`, `azp`, `sub`, pending session,
/// organisation presence, role. The token must have been signature-checked.
pub fn check(claims: &Claims, policy: &Policy, now_secs: u64) -> Result<Principal, AuthError> {
    let leeway = policy.leeway_secs;
    let exp = claims.exp.ok_or(AuthError::MalformedToken)?;
    if exp.saturating_add(leeway) <= now_secs {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = claims.nbf {
        if nbf > now_secs.saturating_add(leeway) {
            return Err(AuthError::NotYetValid);
        }
    }
    if let Some(iat) = claims.iat {
        if iat > now_secs.saturating_add(leeway) {
            return Err(AuthError::IssuedInFuture);
        }
    }
    if claims.iss.as_deref() != Some(policy.issuer.as_str()) {
        return Err(AuthError::WrongIssuer);
    }
    if !policy.audience.is_empty() {
        match &claims.aud {
            Some(aud) if aud.intersects(&policy.audience) => {}
            _ => return Err(AuthError::WrongAudience),
        }
    }
    if !policy.allowed_origins.is_empty() {
        match claims.azp.as_deref() {
            Some(azp) if policy.allowed_origins.iter().any(|o| o == azp) => {}
            _ => return Err(AuthError::WrongAuthorizedParty),
        }
    }
    let user_id = non_empty(&claims.sub).ok_or(AuthError::MissingSubject)?;
    if claims.sts.as_deref() == Some("pending") {
        return Err(AuthError::PendingSession);
    }

    // v2 (and any later version) nests the organisation under `o`; a missing
    // `v` means v1.
    let (org_id, role, slug) = if claims.v.is_some_and(|v| v >= 2) {
        match &claims.o {
            Some(o) => (non_empty(&o.id), non_empty(&o.rol), non_empty(&o.slg)),
            None => (None, None, None),
        }
    } else {
        (
            non_empty(&claims.org_id),
            non_empty(&claims.org_role),
            non_empty(&claims.org_slug),
        )
    };
    let org_id = org_id.ok_or(AuthError::NoOrganization)?;
    let role = normalize_role(role.ok_or(AuthError::InsufficientRole)?);
    if role != normalize_role(&policy.required_role) {
        return Err(AuthError::InsufficientRole);
    }
    Ok(Principal {
        user_id: user_id.to_string(),
        org_id: org_id.to_string(),
        org_role: role,
        org_slug: slug.map(str::to_string),
    })
}

/// A JSON NumericDate: any non-negative number; negative values become 0,
/// fractions are rounded down (`floor`) or up (`ceil`). Anything else is a
/// deserialisation error (a malformed token).
fn numeric_date<'de, D: Deserializer<'de>>(d: D, ceil: bool) -> Result<Option<u64>, D::Error> {
    let n: Option<serde_json::Number> = Option::deserialize(d)?;
    let Some(n) = n else { return Ok(None) };
    if let Some(u) = n.as_u64() {
        return Ok(Some(u));
    }
    if n.as_i64().is_some() {
        return Ok(Some(0)); // negative integer
    }
    match n.as_f64() {
        Some(f) if f.is_finite() => {
            let r = if ceil { f.ceil() } else { f.floor() };
            // `as` saturates: negatives to 0, huge values to u64::MAX.
            Ok(Some(r as u64))
        }
        _ => Err(serde::de::Error::custom("invalid NumericDate")),
    }
}

fn numeric_date_floor<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    numeric_date(d, false)
}

fn numeric_date_ceil<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    numeric_date(d, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const ISS: &str = "https://example.clerk.accounts.dev";

    fn v1(role: &str) -> Claims {
        Claims {
            sub: Some("user_1".into()),
            iss: Some(ISS.into()),
            exp: Some(1_000),
            org_id: Some("org_1".into()),
            org_role: Some(role.into()),
            org_slug: Some("acme".into()),
            ..Claims::default()
        }
    }

    fn v2(rol: &str) -> Claims {
        Claims {
            sub: Some("user_1".into()),
            iss: Some(ISS.into()),
            exp: Some(1_000),
            v: Some(2),
            o: Some(OrgV2 {
                id: Some("org_1".into()),
                rol: Some(rol.into()),
                slg: Some("acme".into()),
            }),
            ..Claims::default()
        }
    }

    fn admin() -> Principal {
        Principal {
            user_id: "user_1".into(),
            org_id: "org_1".into(),
            org_role: "org:admin".into(),
            org_slug: Some("acme".into()),
        }
    }

    #[test]
    fn v1_and_v2_admin_accepted() {
        let p = Policy::new(ISS);
        assert_eq!(check(&v1("org:admin"), &p, 500), Ok(admin()));
        assert_eq!(check(&v2("admin"), &p, 500), Ok(admin()));
        // an older parser kept the prefix in v2: still the same role
        assert_eq!(check(&v2("org:admin"), &p, 500), Ok(admin()));
    }

    #[test]
    fn members_and_missing_orgs_are_forbidden() {
        let p = Policy::new(ISS);
        assert_eq!(
            check(&v1("org:member"), &p, 500),
            Err(AuthError::InsufficientRole)
        );
        assert_eq!(
            check(&v2("member"), &p, 500),
            Err(AuthError::InsufficientRole)
        );
        let mut c = v1("org:admin");
        c.org_id = None;
        assert_eq!(check(&c, &p, 500), Err(AuthError::NoOrganization));
        let mut c = v1("org:admin");
        c.org_role = None;
        assert_eq!(check(&c, &p, 500), Err(AuthError::InsufficientRole));
        let mut c = v2("admin");
        c.o = None;
        assert_eq!(check(&c, &p, 500), Err(AuthError::NoOrganization));
        // a v2 token is read only through `o`, even when v1 members are present
        let mut c = v2("admin");
        c.o = None;
        c.org_id = Some("org_1".into());
        c.org_role = Some("org:admin".into());
        assert_eq!(check(&c, &p, 500), Err(AuthError::NoOrganization));
        let mut c = v2("admin");
        c.o.as_mut().unwrap().id = Some(String::new());
        assert_eq!(check(&c, &p, 500), Err(AuthError::NoOrganization));
    }

    #[test]
    fn pending_session_refused_with_403() {
        let mut c = v2("admin");
        c.sts = Some("pending".into());
        let e = check(&c, &Policy::new(ISS), 500).unwrap_err();
        assert_eq!(e, AuthError::PendingSession);
        assert_eq!(e.status(), 403);
        c.sts = Some("active".into());
        assert!(check(&c, &Policy::new(ISS), 500).is_ok());
    }

    #[test]
    fn configurable_role() {
        let mut p = Policy::new(ISS);
        p.required_role = "member".into();
        assert!(check(&v2("member"), &p, 500).is_ok());
        assert!(check(&v1("org:member"), &p, 500).is_ok());
        assert_eq!(
            check(&v1("org:admin"), &p, 500),
            Err(AuthError::InsufficientRole)
        );
    }

    #[test]
    fn issuer_subject_audience_azp() {
        let p = Policy::new(ISS);
        let mut c = v1("org:admin");
        c.iss = Some("https://evil.clerk.accounts.dev".into());
        assert_eq!(check(&c, &p, 500), Err(AuthError::WrongIssuer));
        c.iss = None;
        assert_eq!(check(&c, &p, 500), Err(AuthError::WrongIssuer));

        let mut c = v1("org:admin");
        c.sub = Some(String::new());
        assert_eq!(check(&c, &p, 500), Err(AuthError::MissingSubject));
        c.sub = None;
        assert_eq!(check(&c, &p, 500), Err(AuthError::MissingSubject));

        // aud ignored when not configured
        let mut c = v1("org:admin");
        c.aud = Some(Audience::One("other".into()));
        assert!(check(&c, &p, 500).is_ok());
        let mut pa = p.clone();
        pa.audience = vec!["sluice".into()];
        assert_eq!(check(&c, &pa, 500), Err(AuthError::WrongAudience));
        c.aud = None;
        assert_eq!(check(&c, &pa, 500), Err(AuthError::WrongAudience));
        c.aud = Some(Audience::Many(vec!["x".into(), "sluice".into()]));
        assert!(check(&c, &pa, 500).is_ok());
        c.aud = Some(Audience::Many(vec![]));
        assert_eq!(check(&c, &pa, 500), Err(AuthError::WrongAudience));

        let mut po = p.clone();
        po.allowed_origins = vec!["https://app.example.com".into()];
        let mut c = v1("org:admin");
        assert_eq!(check(&c, &po, 500), Err(AuthError::WrongAuthorizedParty));
        c.azp = Some("https://evil.example.com".into());
        assert_eq!(check(&c, &po, 500), Err(AuthError::WrongAuthorizedParty));
        c.azp = Some("https://app.example.com".into());
        assert!(check(&c, &po, 500).is_ok());
        // azp not checked without a list
        c.azp = Some("https://evil.example.com".into());
        assert!(check(&c, &p, 500).is_ok());
    }

    #[test]
    fn leeway_boundaries() {
        let p = Policy::new(ISS); // leeway 5
        let mut c = v1("org:admin");
        c.exp = Some(1_000);
        assert!(check(&c, &p, 1_004).is_ok());
        assert_eq!(check(&c, &p, 1_005), Err(AuthError::Expired));
        c.exp = Some(2_000);
        c.nbf = Some(1_005);
        assert!(check(&c, &p, 1_000).is_ok());
        c.nbf = Some(1_006);
        assert_eq!(check(&c, &p, 1_000), Err(AuthError::NotYetValid));
        c.nbf = None;
        c.iat = Some(1_005);
        assert!(check(&c, &p, 1_000).is_ok());
        c.iat = Some(1_006);
        assert_eq!(check(&c, &p, 1_000), Err(AuthError::IssuedInFuture));
        c.exp = None;
        assert_eq!(check(&c, &p, 1_000), Err(AuthError::MalformedToken));
    }

    #[test]
    fn deserialises_both_versions_and_odd_numbers() {
        let c: Claims = serde_json::from_value(json!({
            "sub": "user_1", "iss": ISS, "exp": 1000.9, "nbf": 10.2, "iat": -5,
            "v": 2, "o": {"id": "org_1", "rol": "admin", "slg": "acme", "per": "read"},
            "fva": [7, -1], "aud": ["a", "b"], "org_slug": null
        }))
        .unwrap();
        assert_eq!(c.exp, Some(1000));
        assert_eq!(c.nbf, Some(11));
        assert_eq!(c.iat, Some(0));
        assert_eq!(c.aud, Some(Audience::Many(vec!["a".into(), "b".into()])));
        assert_eq!(check(&c, &Policy::new(ISS), 500), Ok(admin()));
        assert!(serde_json::from_value::<Claims>(json!({"exp": "soon"})).is_err());
        assert!(serde_json::from_value::<Claims>(json!({"sub": 5})).is_err());
    }

    #[test]
    fn error_surface() {
        let all = [
            AuthError::MissingToken,
            AuthError::MalformedHeader,
            AuthError::MalformedToken,
            AuthError::UnsupportedAlgorithm("none".into()),
            AuthError::UnknownKey(Some("k".into())),
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::IssuedInFuture,
            AuthError::WrongIssuer,
            AuthError::WrongAudience,
            AuthError::WrongAuthorizedParty,
            AuthError::MissingSubject,
            AuthError::PendingSession,
            AuthError::NoOrganization,
            AuthError::InsufficientRole,
            AuthError::KeysUnavailable,
        ];
        let reasons: Vec<_> = all.iter().map(AuthError::reason).collect();
        assert_eq!(reasons, AuthError::REASONS);
        for e in &all {
            let d = e.description();
            assert!(!d.is_empty() && !d.contains(['"', '\\', '\n', '\r']), "{d}");
            match e.status() {
                401 => {
                    let h = e.www_authenticate().unwrap();
                    if *e == AuthError::MissingToken {
                        assert_eq!(h, "Bearer");
                    } else {
                        assert_eq!(
                            h,
                            format!("Bearer error=\"invalid_token\", error_description=\"{d}\"")
                        );
                    }
                }
                403 | 503 => assert_eq!(e.www_authenticate(), None),
                s => panic!("unexpected status {s}"),
            }
        }
        assert_eq!(AuthError::InsufficientRole.status(), 403);
        assert_eq!(AuthError::NoOrganization.status(), 403);
        assert_eq!(AuthError::Expired.status(), 401);
        assert_eq!(AuthError::UnknownKey(None).status(), 401);
    }

    fn time_ok(exp: u64, nbf: Option<u64>, iat: Option<u64>, now: u64, leeway: u64) -> bool {
        // Written independently of `check`, in u128 to avoid overflow.
        let (now, l) = (now as u128, leeway as u128);
        (exp as u128 + l > now)
            && nbf.is_none_or(|n| n as u128 <= now + l)
            && iat.is_none_or(|i| i as u128 <= now + l)
    }

    fn role_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("admin".to_string()),
            Just("member".to_string()),
            Just("org:admin".to_string()),
            Just("org:member".to_string()),
            "[a-z:_]{1,12}",
        ]
    }

    proptest! {
        #[test]
        fn time_rules(
            exp in any::<u64>(),
            nbf in proptest::option::of(any::<u64>()),
            iat in proptest::option::of(any::<u64>()),
            now in any::<u64>(),
            leeway in 0u64..=120,
        ) {
            let mut c = v1("org:admin");
            c.exp = Some(exp);
            c.nbf = nbf;
            c.iat = iat;
            let mut p = Policy::new(ISS);
            p.leeway_secs = leeway;
            let r = check(&c, &p, now);
            prop_assert_eq!(r.is_ok(), time_ok(exp, nbf, iat, now, leeway), "{:?}", r);
            if let Err(e) = r {
                prop_assert!(matches!(
                    e,
                    AuthError::Expired | AuthError::NotYetValid | AuthError::IssuedInFuture
                ));
            }
        }

        #[test]
        fn time_rules_near_now(
            now in 1_000u64..2_000_000_000,
            d_exp in -200i64..200,
            d_nbf in proptest::option::of(-200i64..200),
            d_iat in proptest::option::of(-200i64..200),
            leeway in 0u64..=60,
        ) {
            let at = |d: i64| now.saturating_add_signed(d);
            let mut c = v2("admin");
            c.exp = Some(at(d_exp));
            c.nbf = d_nbf.map(at);
            c.iat = d_iat.map(at);
            let mut p = Policy::new(ISS);
            p.leeway_secs = leeway;
            let l = leeway as i64;
            let expect = d_exp + l > 0
                && d_nbf.is_none_or(|d| d <= l)
                && d_iat.is_none_or(|d| d <= l);
            prop_assert_eq!(check(&c, &p, now).is_ok(), expect);
        }

        #[test]
        fn time_rules_at_the_boundaries(
            now in 1_000u64..2_000_000_000,
            leeway in 0u64..=60,
            k_exp in -2i64..=2,
            k_nbf in proptest::option::of(-2i64..=2),
            k_iat in proptest::option::of(-2i64..=2),
        ) {
            // offsets relative to each rule's boundary: exp = now - leeway + k
            // (accepted iff k > 0), nbf/iat = now + leeway + k (accepted iff k <= 0)
            let l = leeway as i64;
            let mut c = v1("org:admin");
            c.exp = Some(now.saturating_add_signed(k_exp - l));
            c.nbf = k_nbf.map(|k| now.saturating_add_signed(l + k));
            c.iat = k_iat.map(|k| now.saturating_add_signed(l + k));
            let mut p = Policy::new(ISS);
            p.leeway_secs = leeway;
            let r = check(&c, &p, now);
            let expect = if k_exp <= 0 {
                Err(AuthError::Expired)
            } else if k_nbf.is_some_and(|k| k > 0) {
                Err(AuthError::NotYetValid)
            } else if k_iat.is_some_and(|k| k > 0) {
                Err(AuthError::IssuedInFuture)
            } else {
                Ok(())
            };
            prop_assert_eq!(r.map(|_| ()), expect);
        }

        #[test]
        fn role_normalisation(role in role_strategy(), required in role_strategy()) {
            let mut p = Policy::new(ISS);
            p.required_role = required.clone();
            let bare = |r: &str| r.strip_prefix("org:").unwrap_or(r).to_string();
            let expect = bare(&role) == bare(&required);
            let r = check(&v1(&role), &p, 500);
            prop_assert_eq!(r.is_ok(), expect);
            if let Ok(pr) = &r {
                prop_assert!(pr.org_role.starts_with("org:"));
                prop_assert_eq!(bare(&pr.org_role), bare(&role));
            } else {
                prop_assert_eq!(r, Err(AuthError::InsufficientRole));
            }
        }

        #[test]
        fn v1_v2_equivalence(
            bare_role in "[a-z_]{1,10}",
            org in proptest::option::of("org_[a-z0-9]{1,8}"),
            slug in proptest::option::of("[a-z-]{1,8}"),
            sub in proptest::option::of("user_[a-z0-9]{0,8}"),
            pending in any::<bool>(),
            exp in 0u64..2_000,
        ) {
            let p = Policy::new(ISS);
            let mut a = v1(&format!("org:{bare_role}"));
            a.org_id = org.clone();
            a.org_slug = slug.clone();
            a.sub = sub.clone();
            a.exp = Some(exp);
            let mut b = v2(&bare_role);
            b.o = Some(OrgV2 { id: org, rol: Some(bare_role), slg: slug });
            b.sub = sub;
            b.exp = Some(exp);
            if pending {
                a.sts = Some("pending".into());
                b.sts = Some("pending".into());
            }
            prop_assert_eq!(check(&a, &p, 1_000), check(&b, &p, 1_000));
        }
    }
}
