//! Who may use the local server: checks run on every request before any
//! handler, and the headers every response carries.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::App;

/// The page's Content-Security-Policy: its own scripts, styles, pictures
/// and media only; nothing inline, nothing from elsewhere, never framed.
pub(super) const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob:; media-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

impl App {
    /// The cookie that carries the token after the first visit. Cookies
    /// are not kept apart by port, so the port is in its name: two homes
    /// served on two ports do not overwrite each other's.
    pub(super) fn cookie_name(&self) -> String {
        format!("huddle_web_{}", self.port)
    }

    /// Whether `host` (a `Host` header) names this server. Any other name
    /// is a page of another site resolving its own name to 127.0.0.1.
    fn host_ok(&self, host: &str) -> bool {
        let p = self.port;
        host == format!("127.0.0.1:{p}") || host == format!("localhost:{p}")
    }

    /// Whether `origin` (an `Origin` header) is this server's page.
    fn origin_ok(&self, origin: &str) -> bool {
        let p = self.port;
        origin == format!("http://127.0.0.1:{p}") || origin == format!("http://localhost:{p}")
    }

    /// Whether `given` is the access token (compared in constant time).
    pub(super) fn token_is(&self, given: &str) -> bool {
        let (a, b) = (given.as_bytes(), self.token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The token a request presents: the cookie, or `Authorization:
    /// Bearer` (for scripts).
    fn presented_token(&self, headers: &HeaderMap) -> bool {
        let name = self.cookie_name();
        let in_cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .any(|(k, v)| k == name && self.token_is(v));
        let in_header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| self.token_is(t));
        in_cookie || in_header
    }
}

/// A refusal: status and one line saying why.
pub(super) fn refuse(status: StatusCode, why: &str) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{why}\n"),
    )
        .into_response();
    secure(r.headers_mut());
    r
}

/// Runs before every handler: the `Host`, where the request comes from,
/// the token, and the server's limit on requests in flight.
pub(super) async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if !host.is_some_and(|h| app.host_ok(h)) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "this server answers only to 127.0.0.1",
        );
    }
    if let Some(o) = headers.get(header::ORIGIN) {
        if !o.to_str().is_ok_and(|o| app.origin_ok(o)) {
            return refuse(
                StatusCode::FORBIDDEN,
                "requests from other sites are refused",
            );
        }
    }
    // Browsers say where a request comes from; only this page itself, or
    // the user typing the address, may use the server.
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return refuse(
                StatusCode::FORBIDDEN,
                "requests from other sites are refused",
            );
        }
    }
    // The first visit: the URL's token becomes a cookie, and the address
    // bar loses the token.
    if req.uri().path() == "/" {
        let given = req
            .uri()
            .query()
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("token="));
        if let Some(t) = given {
            if !app.token_is(t) {
                return refuse(StatusCode::UNAUTHORIZED, "wrong access token");
            }
            let cookie = format!(
                "{}={}; Path=/; HttpOnly; SameSite=Strict",
                app.cookie_name(),
                app.token
            );
            let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            secure(r.headers_mut());
            return r;
        }
    }
    if !app.presented_token(req.headers()) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "no access token: open the URL `huddle web` printed",
        );
    }
    let Ok(permit) = app.requests.clone().try_acquire_owned() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "too many requests at once");
    };
    let mut r = next.run(req).await;
    drop(permit);
    secure(r.headers_mut());
    r
}

/// Headers every response carries (a handler's own win).
fn secure(h: &mut HeaderMap) {
    let defaults = [
        (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (k, v) in defaults {
        if !h.contains_key(&k) {
            h.insert(k, HeaderValue::from_static(v));
        }
    }
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
}
