//! The page's API: JSON over HTTP, and an event stream (server-sent
//! events) of what arrives.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt as _;

use super::{assets, guard, media, upload, App, MAX_HISTORY, MAX_JSON_BODY};
use crate::error::ClientError;

/// Every route, behind [`guard::guard`].
pub(super) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::script))
        .route("/app.css", get(assets::style))
        .route("/api/me", get(me))
        .route("/api/events", get(events))
        .route("/api/groups", get(groups).post(create_group))
        .route(
            "/api/groups/{group}/messages",
            get(messages).post(send_text),
        )
        .route("/api/groups/{group}/read", post(mark_read))
        .route(
            "/api/groups/{group}/members",
            get(members).post(add_members),
        )
        .route("/api/groups/{group}/members/{user}", delete(remove_member))
        .route("/api/groups/{group}/leave", post(leave))
        .route(
            "/api/groups/{group}/files",
            post(upload::receive).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/uploads", get(upload::list))
        .route("/api/uploads/{id}", delete(upload::cancel))
        .route("/api/uploads/{id}/resume", post(upload::resume))
        .route("/api/media/{media}", get(media::serve))
        .route("/api/media/{media}/preview", get(media::preview))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            guard::guard,
        ))
        .with_state(app)
}

/// An API failure: a status and what to tell the user.
#[derive(Debug)]
pub(super) struct ApiError(pub StatusCode, pub String);

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let status = match &e {
            ClientError::Usage(_) | ClientError::NothingToCommit | ClientError::Server(_) => {
                StatusCode::BAD_REQUEST
            }
            ClientError::Policy(_) => StatusCode::FORBIDDEN,
            ClientError::KeyChanged { .. } | ClientError::Busy(_) | ClientError::Contended(_) => {
                StatusCode::CONFLICT
            }
            ClientError::Connect { .. } | ClientError::CertificateMismatch { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ClientError::Integrity(_) | ClientError::Protocol(_) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub(super) type ApiResult<T> = std::result::Result<T, ApiError>;

async fn me(State(app): State<Arc<App>>) -> Json<Value> {
    let who = app.actions.read(|c| Ok(c.whoami())).await;
    let (fingerprint, server) = who.map(|w| (w.fingerprint, w.server)).unwrap_or_default();
    Json(json!({
        "user": app.user,
        "principal": app.principal,
        "fingerprint": fingerprint,
        "server": server,
        "link": app.link.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    }))
}

/// The group list with unread counts and the last message of each.
async fn groups(State(app): State<Arc<App>>) -> ApiResult<Json<Value>> {
    let rows = app
        .actions
        .read(|c| {
            let mut out = Vec::new();
            for g in c.groups()? {
                let unread = c.unread_after(&g.group, c.read_mark(&g.group)?)?;
                let last = c.messages(&g.group, 1)?.pop();
                out.push((g, unread, last));
            }
            Ok(out)
        })
        .await?;
    let out = rows
        .into_iter()
        .map(|(g, unread, last)| {
            json!({
                "group": g.group,
                "name": g.name,
                "state": g.state,
                "members": g.members,
                "unread": unread,
                "last": last.map(|e| app.event_json(&e)),
            })
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

#[derive(Debug, Deserialize)]
struct NewGroup {
    name: String,
}

async fn create_group(
    State(app): State<Arc<App>>,
    Json(req): Json<NewGroup>,
) -> ApiResult<Json<Value>> {
    let name = req.name.trim().to_owned();
    let id = app
        .actions
        .run(move |c| Box::pin(async move { c.create_group(&name).await }))
        .await?;
    app.publish(&json!({"kind": "groups"}));
    Ok(Json(json!({ "group": id.to_string() })))
}

#[derive(Debug, Deserialize)]
struct Page {
    limit: Option<usize>,
    /// Only events before this position (to scroll back).
    before: Option<u64>,
}

async fn messages(
    State(app): State<Arc<App>>,
    Path(group): Path<String>,
    Query(q): Query<Page>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(200).min(MAX_HISTORY);
    let (events, read) = app
        .actions
        .read(move |c| {
            let events = match q.before {
                Some(seq) => c.messages_before(&group, seq, limit)?,
                None => c.messages(&group, limit)?,
            };
            Ok((events, c.read_mark(&group)?))
        })
        .await?;
    Ok(Json(json!({
        "read": read,
        "events": app.events_json(&events),
    })))
}

#[derive(Debug, Deserialize)]
struct Text {
    text: String,
}

async fn send_text(
    State(app): State<Arc<App>>,
    Path(group): Path<String>,
    Json(req): Json<Text>,
) -> ApiResult<Json<Value>> {
    if req.text.trim().is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the message is empty".into(),
        ));
    }
    let e = app
        .actions
        .run(move |c| {
            Box::pin(async move {
                let e = c.send_text(&group, &req.text).await?;
                c.mark_read(&group, e.seq)?;
                Ok(e)
            })
        })
        .await?;
    Ok(Json(app.event_json(&e)))
}

#[derive(Debug, Deserialize)]
struct Seq {
    seq: u64,
}

async fn mark_read(
    State(app): State<Arc<App>>,
    Path(group): Path<String>,
    Json(req): Json<Seq>,
) -> ApiResult<StatusCode> {
    app.actions
        .read(move |c| c.mark_read(&group, req.seq))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The members with their roles and every device's key fingerprint.
async fn members(State(app): State<Arc<App>>, Path(group): Path<String>) -> ApiResult<Json<Value>> {
    let (keys, roles, policy) = app
        .actions
        .read(move |c| {
            Ok((
                c.member_keys(&group)?,
                c.member_roles(&group)?,
                c.policy(&group)?,
            ))
        })
        .await?;
    let me = &app.user;
    let list: Vec<Value> = roles
        .into_iter()
        .map(|(user, devices, role)| {
            let mine: Vec<_> = keys.iter().filter(|k| k.user == user).collect();
            let removable = user != *me
                && policy
                    .as_ref()
                    .is_none_or(|p| p.may_remove(me, &user).is_ok());
            json!({
                "user": user,
                "devices": devices,
                "role": role.to_string(),
                "keys": mine,
                "key_changed": mine.iter().any(|k| k.changed),
                "may_remove": removable,
            })
        })
        .collect();
    let may_add = policy
        .as_ref()
        .is_none_or(|p| p.may(me, huddle_core::policy::Capability::Add));
    Ok(Json(json!({ "members": list, "may_add": may_add })))
}

#[derive(Debug, Deserialize)]
struct Users {
    users: Vec<String>,
}

async fn add_members(
    State(app): State<Arc<App>>,
    Path(group): Path<String>,
    Json(req): Json<Users>,
) -> ApiResult<Json<Value>> {
    let users: Vec<String> = req.users.iter().map(|u| u.trim().to_owned()).collect();
    if users.is_empty() || users.iter().any(String::is_empty) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "name who to add".into()));
    }
    let events = app
        .actions
        .run(move |c| Box::pin(async move { c.add(&group, &users).await }))
        .await?;
    Ok(Json(json!({ "events": app.events_json(&events) })))
}

async fn remove_member(
    State(app): State<Arc<App>>,
    Path((group, user)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let events = app
        .actions
        .run(move |c| Box::pin(async move { c.remove(&group, &[user]).await }))
        .await?;
    Ok(Json(json!({ "events": app.events_json(&events) })))
}

async fn leave(State(app): State<Arc<App>>, Path(group): Path<String>) -> ApiResult<Json<Value>> {
    let left = app
        .actions
        .run(move |c| Box::pin(async move { c.leave(&group).await }))
        .await?;
    app.publish(&json!({"kind": "groups"}));
    Ok(Json(json!({ "left": left })))
}

/// What arrives, as it arrives: events, the connection's state, the
/// progress of files being sent. A stream that falls too far behind is
/// told to reload (`resync`) rather than silently missing events.
async fn events(State(app): State<Arc<App>>) -> Response {
    let Ok(permit) = app.event_streams.clone().try_acquire_owned() else {
        return guard::refuse(StatusCode::SERVICE_UNAVAILABLE, "too many pages open");
    };
    let first = app
        .link
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .to_string();
    let rx = BroadcastStream::new(app.feed.subscribe());
    let stream = tokio_stream::once(Ok::<_, Infallible>(SseEvent::default().data(first))).chain(
        rx.map(move |m| {
            let _held = &permit;
            Ok(match m {
                Ok(s) => SseEvent::default().data(&*s),
                Err(BroadcastStreamRecvError::Lagged(_)) => {
                    SseEvent::default().data(r#"{"kind":"resync"}"#)
                }
            })
        }),
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
