//! Routing: method + path → [`Route`]. Pure; route names double as metric labels.

use super::ApiError;

/// A client API route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `POST /api/invokeAgent`
    InvokeAgent,
    /// `GET /api/getConversation`
    GetConversation,
    /// `GET /api/threads/{threadId}/stream`: resume (or replay) a run's UI-message stream.
    ResumeStream,
    /// `POST /api/threads/{threadId}/stop`: stop the thread's run.
    StopRun,
    /// `POST /agents/{id}/run`: the AgentFlow dialect.
    RunAgent,
    /// `POST /api/chat`: an AI SDK `DefaultChatTransport` turn.
    Chat,
    /// `GET /api/chat/{chatId}/stream`: the chat's resume route (`reconnectToStream`).
    ChatStream,
    /// `POST /api/chat/{chatId}/stop`: stop the chat's run.
    ChatStop,
    /// `GET /`: the demo's chat page (served by `sluice demo` only).
    DemoPage,
}

impl Route {
    /// Label for metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Route::InvokeAgent => "invoke_agent",
            Route::GetConversation => "get_conversation",
            Route::ResumeStream => "resume_stream",
            Route::StopRun => "stop_run",
            Route::RunAgent => "run_agent",
            Route::Chat => "chat",
            Route::ChatStream => "chat_stream",
            Route::ChatStop => "chat_stop",
            Route::DemoPage => "demo_page",
        }
    }
}

/// Label for requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// Label for CORS preflights (`OPTIONS` with `Access-Control-Request-Method`), whatever the path.
pub const PREFLIGHT: &str = "cors_preflight";

/// Match a request. Known path with another method → 405 naming the allowed one; unknown → 404.
pub fn route(method: &str, path: &str) -> Result<Route, ApiError> {
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let (route, allowed) = match path {
        "/api/invokeAgent" => (Route::InvokeAgent, "POST"),
        "/api/getConversation" => (Route::GetConversation, "GET"),
        "/api/chat" => (Route::Chat, "POST"),
        "/" => (Route::DemoPage, "GET"),
        _ if thread_of(path, "/stream").is_some() => (Route::ResumeStream, "GET"),
        _ if thread_of(path, "/stop").is_some() => (Route::StopRun, "POST"),
        _ if chat_of(path, "/stream").is_some() => (Route::ChatStream, "GET"),
        _ if chat_of(path, "/stop").is_some() => (Route::ChatStop, "POST"),
        _ if super::agentflow::agent_of(path).is_some() => (Route::RunAgent, "POST"),
        _ => return Err(ApiError::NotFound),
    };
    if method == allowed {
        Ok(route)
    } else {
        Err(ApiError::MethodNotAllowed(allowed))
    }
}

/// The `{threadId}` of `/api/threads/{threadId}{suffix}` (percent-decoded), if `path` is one.
pub fn thread_of(path: &str, suffix: &str) -> Option<String> {
    id_between(path, "/api/threads/", suffix)
}

/// The `{chatId}` of `/api/chat/{chatId}{suffix}` (percent-decoded), if `path` is one.
pub fn chat_of(path: &str, suffix: &str) -> Option<String> {
    id_between(path, "/api/chat/", suffix)
}

/// The one percent-decoded path segment between `prefix` and `suffix`.
pub(crate) fn id_between(path: &str, prefix: &str, suffix: &str) -> Option<String> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let rest = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    let decoded: String = form_urlencoded::parse(format!("t={rest}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())?;
    Some(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_method_and_path() {
        assert_eq!(route("POST", "/api/invokeAgent"), Ok(Route::InvokeAgent));
        assert_eq!(
            route("GET", "/api/getConversation"),
            Ok(Route::GetConversation)
        );
        assert_eq!(
            route("GET", "/api/getConversation/"),
            Ok(Route::GetConversation)
        );
        assert_eq!(
            route("GET", "/api/invokeAgent"),
            Err(ApiError::MethodNotAllowed("POST"))
        );
        assert_eq!(
            route("DELETE", "/api/getConversation"),
            Err(ApiError::MethodNotAllowed("GET"))
        );
        assert_eq!(route("GET", "/"), Ok(Route::DemoPage));
        assert_eq!(route("GET", "/index.html"), Err(ApiError::NotFound));
        assert_eq!(route("POST", "/api/chat"), Ok(Route::Chat));
        assert_eq!(route("POST", "/api/chat/"), Ok(Route::Chat));
        assert_eq!(
            route("GET", "/api/chat"),
            Err(ApiError::MethodNotAllowed("POST"))
        );
        assert_eq!(route("GET", "/api/chat/c-1/stream"), Ok(Route::ChatStream));
        assert_eq!(route("POST", "/api/chat/c-1/stop"), Ok(Route::ChatStop));
        assert_eq!(
            route("POST", "/api/chat/c-1/stream"),
            Err(ApiError::MethodNotAllowed("GET"))
        );
        assert_eq!(
            route("GET", "/api/chat/a/b/stream"),
            Err(ApiError::NotFound)
        );
        assert_eq!(
            chat_of("/api/chat/chat%2F1%20x/stream", "/stream").as_deref(),
            Some("chat/1 x")
        );
        assert_eq!(
            route("GET", "/api/threads/abc/stream"),
            Ok(Route::ResumeStream)
        );
        assert_eq!(
            route("POST", "/api/threads/abc/stream"),
            Err(ApiError::MethodNotAllowed("GET"))
        );
        assert_eq!(
            route("GET", "/api/threads//stream"),
            Err(ApiError::NotFound)
        );
        assert_eq!(
            route("GET", "/api/threads/a/b/stream"),
            Err(ApiError::NotFound)
        );
        assert_eq!(
            thread_of("/api/threads/a%20b/stream", "/stream").as_deref(),
            Some("a b")
        );
        assert_eq!(route("POST", "/api/threads/abc/stop"), Ok(Route::StopRun));
        assert_eq!(
            route("GET", "/api/threads/abc/stop/"),
            Err(ApiError::MethodNotAllowed("POST"))
        );
        assert_eq!(route("POST", "/api/invokeagent"), Err(ApiError::NotFound));
    }
}
