//! Cross-origin requests from browser apps on other origins (`server.cors_origins`): the
//! answer to a preflight, and the headers every answer to a listed origin carries. Pure.
//!
//! Credentials travel in the `Authorization` header, never in cookies, so no answer allows
//! credentials, and `*` (any origin) is as safe as the tokens are.

use super::{ApiError, Reply};

/// Request headers a browser may send: the token, the JSON body, a resume cursor, poll mode.
const ALLOW_HEADERS: &str = "authorization, content-type, last-event-id, x-stream-response";

/// Answer headers a browser app may read.
const EXPOSE_HEADERS: &str = "x-thread-id, x-run-id, x-sluice-reattached, retry-after";

/// How long a browser may keep a preflight's answer, in seconds.
const MAX_AGE_SECS: u32 = 600;

/// The origins allowed to call the API from a browser.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cors {
    origins: Vec<String>,
    any: bool,
}

impl Cors {
    /// From `server.cors_origins` (exact origins such as `https://app.example.com`, or `*`).
    pub fn new(origins: &[String]) -> Cors {
        Cors {
            any: origins.iter().any(|o| o == "*"),
            origins: origins
                .iter()
                .filter(|o| *o != "*")
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether any origin is allowed at all.
    pub fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// Whether a browser on `origin` may call the API.
    pub fn allows(&self, origin: &str) -> bool {
        self.any || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }

    /// The headers every answer to a request from `origin` carries (none for a request with no
    /// `Origin`, or when cross-origin calls are off). An unlisted origin gets only `Vary`, so
    /// that a cache never serves one origin's answer to another.
    pub fn headers(&self, origin: Option<&str>) -> Vec<(&'static str, String)> {
        let Some(origin) = origin.filter(|_| self.enabled()) else {
            return Vec::new();
        };
        let mut headers = vec![("vary", "origin".to_string())];
        if self.allows(origin) {
            headers.push(("access-control-allow-origin", origin.to_string()));
            headers.push(("access-control-expose-headers", EXPOSE_HEADERS.into()));
        }
        headers
    }

    /// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method`) from `origin`:
    /// `204` with what may be sent, or `403 origin_not_allowed`.
    pub fn preflight(&self, origin: Option<&str>) -> Reply {
        match origin {
            Some(o) if self.allows(o) => {
                let mut reply = Reply::empty(204);
                reply.headers = self.headers(origin);
                reply.headers.extend([
                    ("access-control-allow-methods", "GET, POST".to_string()),
                    ("access-control-allow-headers", ALLOW_HEADERS.to_string()),
                    ("access-control-max-age", MAX_AGE_SECS.to_string()),
                ]);
                reply
            }
            _ => {
                let mut reply = ApiError::OriginNotAllowed(origin.unwrap_or("").into()).reply();
                reply.headers.extend(self.headers(origin));
                reply
            }
        }
    }
}

/// Whether `value` is a valid `server.cors_origins` entry: `*`, or `scheme://host[:port]`
/// with nothing after it.
pub fn valid_origin(value: &str) -> bool {
    if value == "*" {
        return true;
    }
    let Some((scheme, rest)) = value.split_once("://") else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' '])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> Cors {
        Cors::new(&origins.iter().map(|o| o.to_string()).collect::<Vec<_>>())
    }

    fn header<'a>(headers: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn listed_origins_get_the_cors_headers_and_others_do_not() {
        let c = cors(&["https://app.example.com/", "http://localhost:3000"]);
        let h = c.headers(Some("https://app.example.com"));
        assert_eq!(
            header(&h, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert!(header(&h, "access-control-expose-headers")
            .unwrap()
            .contains("x-thread-id"));
        assert_eq!(header(&h, "vary"), Some("origin"));
        let h = c.headers(Some("https://evil.example.com"));
        assert_eq!(header(&h, "access-control-allow-origin"), None);
        assert_eq!(header(&h, "vary"), Some("origin"));
        assert!(c.headers(None).is_empty());
        // Off: nothing at all.
        assert!(cors(&[])
            .headers(Some("https://app.example.com"))
            .is_empty());
        // Any origin.
        let h = cors(&["*"]).headers(Some("https://x.test"));
        assert_eq!(
            header(&h, "access-control-allow-origin"),
            Some("https://x.test")
        );
    }

    #[test]
    fn preflights_allow_what_the_ai_sdk_sends_or_are_refused() {
        let c = cors(&["http://localhost:3000"]);
        let ok = c.preflight(Some("http://localhost:3000"));
        assert_eq!(ok.status, 204);
        let allowed = header(&ok.headers, "access-control-allow-headers").unwrap();
        for h in ["authorization", "content-type", "last-event-id"] {
            assert!(allowed.contains(h), "{allowed}");
        }
        assert_eq!(
            header(&ok.headers, "access-control-allow-methods"),
            Some("GET, POST")
        );
        let no = c.preflight(Some("http://localhost:4000"));
        assert_eq!(no.status, 403);
        assert_eq!(header(&no.headers, "access-control-allow-origin"), None);
        assert_eq!(c.preflight(None).status, 403);
    }

    #[test]
    fn origins_are_scheme_host_and_port_only() {
        for ok in [
            "*",
            "https://app.example.com",
            "http://localhost:3000",
            "https://a.b/",
        ] {
            assert!(valid_origin(ok), "{ok}");
        }
        for bad in [
            "",
            "app.example.com",
            "https://",
            "https://a.b/path",
            "ftp://a.b",
            "https://a.b?x",
            "https://u@a.b",
        ] {
            assert!(!valid_origin(bad), "{bad}");
        }
    }
}
