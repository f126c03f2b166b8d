//! Authentication: every client request carries a Clerk-style JWT (`Authorization: Bearer …`),
//! verified before any route work. The pure parts are [`claims`] (claim policy), [`keys`] (key
//! sets and algorithm pinning) and [`verify`] (token verification with a cache of verified
//! tokens); [`jwks`] keeps the keys fresh. [`Authenticator`] ties them to the configuration.
//!
//! A stream already accepted is not cut when its token expires: tokens are checked when a request
//! arrives (each poll, each reconnect), never during a response.

pub mod claims;
pub mod jwks;
pub mod keys;
pub mod testkeys;
pub mod verify;

use std::time::{SystemTime, UNIX_EPOCH};

pub use claims::{AuthError, Policy, Principal};

use crate::config::{AuthMode, AuthSection, UpstreamUrl};
use crate::metrics;
use jwks::{KeySource, KeyStore, KeyTiming};
use verify::Verifier;

/// Who a request comes from, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's organisation.
    pub org_id: String,
    /// The caller.
    pub user_id: String,
    /// The bearer token, kept only when it is to be forwarded to the backend.
    pub token: Option<String>,
}

/// Checks requests as configured.
pub enum Authenticator {
    /// `auth.mode = "disabled"`: everyone is the development organisation and user.
    Disabled {
        /// The fixed caller.
        caller: Caller,
    },
    /// `auth.mode = "jwt"`.
    Jwt(Box<JwtAuth>),
}

/// The parts of JWT authentication.
pub struct JwtAuth {
    /// Token verification and its cache.
    verifier: Verifier,
    /// The keys.
    keys: std::sync::Arc<KeyStore>,
    /// Keep the token to forward it.
    forward_token: bool,
}

impl Authenticator {
    /// Build from `[auth]` (already validated).
    pub fn from_config(a: &AuthSection) -> Self {
        if a.mode == AuthMode::Disabled {
            return Authenticator::Disabled {
                caller: Caller {
                    org_id: a.dev_organization.clone(),
                    user_id: a.dev_user.clone(),
                    token: None,
                },
            };
        }
        let source = if a.hs256_secret.is_set() {
            KeySource::Secret(a.hs256_secret.0.as_bytes().to_vec())
        } else if !a.jwks_file.is_empty() {
            KeySource::File(a.jwks_file.clone().into())
        } else {
            match UpstreamUrl::parse(&a.jwks_url) {
                Ok(url) => KeySource::Url(url),
                // Validation refuses this; an empty secret verifies nothing.
                Err(_) => KeySource::Secret(Vec::new()),
            }
        };
        let policy = Policy {
            issuer: a.issuer.clone(),
            audience: a.audience.clone(),
            allowed_origins: a.allowed_origins.clone(),
            required_role: a.required_role.clone(),
            leeway_secs: a.leeway.0.as_secs(),
        };
        Authenticator::Jwt(Box::new(JwtAuth {
            verifier: Verifier::new(policy, a.token_cache_size),
            keys: std::sync::Arc::new(KeyStore::new(
                source,
                KeyTiming {
                    ttl: a.jwks_ttl.0,
                    cooldown: a.jwks_refetch_cooldown.0,
                    fetch_timeout: a.jwks_fetch_timeout.0,
                },
            )),
            forward_token: a.forward_token,
        }))
    }

    /// Authenticate a request from its `Authorization` header.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let (verifier, keys, forward_token) = match self {
            Authenticator::Disabled { caller } => return Ok(caller.clone()),
            Authenticator::Jwt(jwt) => (&jwt.verifier, &jwt.keys, jwt.forward_token),
        };
        let result = async {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let current = keys.current().await.ok_or(AuthError::KeysUnavailable)?;
            match verifier.verify(authorization, &current, now) {
                Err(AuthError::UnknownKey(kid)) => match keys.refetch_for_unknown_kid().await {
                    Some(fresh) => verifier.verify(authorization, &fresh, now),
                    None => Err(AuthError::UnknownKey(kid)),
                },
                other => other,
            }
        }
        .await;
        match result {
            Ok(p) => Ok(Caller {
                org_id: p.org_id,
                user_id: p.user_id,
                token: forward_token
                    .then(|| verify::bearer_token(authorization).ok().map(str::to_string))
                    .flatten(),
            }),
            Err(e) => {
                metrics::AUTH_FAILURES
                    .with_label_values(&[e.reason()])
                    .inc();
                Err(e)
            }
        }
    }
}
