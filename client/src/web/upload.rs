//! Files sent from the page. The browser hands the file to this server
//! (over loopback), which stages it in the home (`HOME/web-uploads/ID/`)
//! and sends it like `huddle send-file` does: sealed on this device,
//! uploaded with progress, resumable. A staged file outlives the server:
//! stopped in the middle (Ctrl-C, a cancel), it is listed as paused when
//! `huddle web` starts again and resumes from where the DS stopped.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Semaphore;
use tokio_stream::StreamExt as _;

use super::api::{ApiError, ApiResult};
use super::worker::Worker;
use super::{App, MAX_STAGED_UPLOADS, MAX_UPLOADS, MAX_UPLOAD_BYTES};
use crate::client::media::safe_name;
use crate::error::{ClientError, Result};
use crate::Progress;

/// What is kept beside a staged file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    group: String,
    name: String,
    caption: String,
}

/// Where a staged file is.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum State_ {
    /// Waiting for one of the [`MAX_UPLOADS`] slots.
    Queued,
    Sending,
    /// Stopped (cancelled, or found at start); resumable.
    Paused,
    Failed {
        error: String,
    },
}

#[derive(Debug)]
struct Staged {
    meta: Meta,
    dir: PathBuf,
    size: u64,
    state: State_,
    cancel: Arc<AtomicBool>,
}

impl Staged {
    fn file(&self) -> PathBuf {
        self.dir.join(safe_name(&self.meta.name))
    }

    fn json(&self, id: &str) -> Value {
        let mut v = json!({
            "kind": "upload",
            "id": id,
            "group": self.meta.group,
            "name": self.meta.name,
            "size": self.size,
        });
        if let (Some(o), Ok(Value::Object(s))) =
            (v.as_object_mut(), serde_json::to_value(&self.state))
        {
            o.extend(s);
        }
        v
    }
}

/// The staged files, by id.
#[derive(Debug)]
pub(super) struct Uploads {
    staged: std::sync::Mutex<HashMap<String, Staged>>,
    slots: Arc<Semaphore>,
}

impl Uploads {
    pub(super) fn new() -> Self {
        Uploads {
            staged: std::sync::Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(MAX_UPLOADS)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Staged>> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists what an earlier run left staged, as paused.
    pub(super) fn recover(&self, app: &App) -> Result<()> {
        let root = root(app);
        let Ok(dirs) = std::fs::read_dir(&root) else {
            return Ok(());
        };
        let mut staged = self.lock();
        for d in dirs.flatten() {
            let dir = d.path();
            let id = d.file_name().to_string_lossy().into_owned();
            let meta: Option<Meta> = std::fs::read(dir.join("meta.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let Some(meta) = meta else {
                // Staging never finished: nothing to resume.
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            let size = std::fs::metadata(dir.join(safe_name(&meta.name)))
                .map(|m| m.len())
                .unwrap_or(0);
            staged.insert(
                id,
                Staged {
                    meta,
                    dir,
                    size,
                    state: State_::Paused,
                    cancel: Arc::new(AtomicBool::new(false)),
                },
            );
        }
        Ok(())
    }
}

fn root(app: &App) -> PathBuf {
    app.home.dir().join("web-uploads")
}

#[derive(Debug, Deserialize)]
pub(super) struct FileQuery {
    name: String,
    #[serde(default)]
    caption: String,
}

/// `POST /api/groups/GROUP/files?name=NAME`: the body is the file. Stages
/// it and starts sending; the progress comes on the event stream.
pub(super) async fn receive(
    State(app): State<Arc<App>>,
    Path(group): Path<String>,
    Query(q): Query<FileQuery>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let group = app
        .actions
        .read(move |c| Ok(c.resolve_group(&group)?.to_string()))
        .await?;
    if app.uploads.lock().len() >= MAX_STAGED_UPLOADS {
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_STAGED_UPLOADS} files are waiting to be sent already"),
        ));
    }
    let name = safe_name(&q.name);
    let id = hex::encode(rand::random::<[u8; 8]>());
    let dir = root(&app).join(&id);
    let staged = stage(&dir, &name, body).await;
    let size = match staged {
        Ok(n) => n,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
    };
    let meta = Meta {
        group,
        name,
        caption: q.caption,
    };
    let written = serde_json::to_vec(&meta)
        .map_err(|e| ClientError::Io(e.to_string()))
        .and_then(|b| crate::home::write_file(&dir.join("meta.json"), &b, 0o600));
    if let Err(e) = written {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(e.into());
    }
    app.uploads.lock().insert(
        id.clone(),
        Staged {
            meta,
            dir,
            size,
            state: State_::Queued,
            cancel: Arc::new(AtomicBool::new(false)),
        },
    );
    start(&app, &id);
    Ok(Json(json!({ "upload": id, "size": size })))
}

/// Writes the request body to `dir/name`, up to [`MAX_UPLOAD_BYTES`].
async fn stage(dir: &FsPath, name: &str, body: Body) -> ApiResult<u64> {
    let io = |e: std::io::Error| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("staging the file: {e}"),
        )
    };
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    let mut f = tokio::fs::File::create(dir.join(name)).await.map_err(io)?;
    let mut n = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("the upload broke off: {e}"),
            )
        })?;
        n += piece.len() as u64;
        if n > MAX_UPLOAD_BYTES {
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "files larger than {} cannot be sent from the page",
                    crate::event::human_size(MAX_UPLOAD_BYTES)
                ),
            ));
        }
        f.write_all(&piece).await.map_err(io)?;
    }
    f.sync_all().await.map_err(io)?;
    Ok(n)
}

/// Sends staged file `id` in the background, once a slot is free.
fn start(app: &Arc<App>, id: &str) {
    let cancel = {
        let mut staged = app.uploads.lock();
        let Some(s) = staged.get_mut(id) else {
            return;
        };
        s.state = State_::Queued;
        s.cancel.store(false, Ordering::SeqCst);
        app.publish(&s.json(id));
        s.cancel.clone()
    };
    let (app, id) = (app.clone(), id.to_owned());
    tokio::spawn(async move {
        let Ok(_slot) = app.uploads.slots.clone().acquire_owned().await else {
            return;
        };
        let (meta, file) = {
            let mut staged = app.uploads.lock();
            let Some(s) = staged.get_mut(&id) else {
                return;
            };
            if cancel.load(Ordering::SeqCst) {
                s.state = State_::Paused;
                app.publish(&s.json(&id));
                return;
            }
            s.state = State_::Sending;
            app.publish(&s.json(&id));
            (s.meta.clone(), s.file())
        };
        let result = send(&app, &id, &meta, &file, cancel.clone()).await;
        let mut staged = app.uploads.lock();
        match result {
            Ok(event) => {
                if let Some(s) = staged.remove(&id) {
                    let _ = std::fs::remove_dir_all(&s.dir);
                }
                app.publish(
                    &json!({"kind": "upload", "id": id, "group": meta.group, "state": "done"}),
                );
                app.publish_event(&event);
            }
            Err(e) => {
                if let Some(s) = staged.get_mut(&id) {
                    s.state = if cancel.load(Ordering::SeqCst) {
                        State_::Paused
                    } else {
                        State_::Failed {
                            error: e.to_string(),
                        }
                    };
                    app.publish(&s.json(&id));
                }
            }
        }
    });
}

/// One attempt at sending a staged file, on a connection of its own.
async fn send(
    app: &Arc<App>,
    id: &str,
    meta: &Meta,
    file: &FsPath,
    cancel: Arc<AtomicBool>,
) -> Result<crate::Event> {
    let worker = Worker::start(app.home.clone(), "huddle-upload")?;
    let mut progress = PageProgress {
        app: app.clone(),
        id: id.to_owned(),
        group: meta.group.clone(),
        cancel,
        sent: 0,
        total: 0,
        resumed_at: 0,
        started: Instant::now(),
        told: None,
    };
    let (group, file, caption) = (meta.group.clone(), file.to_owned(), meta.caption.clone());
    worker
        .run(move |c| {
            Box::pin(async move { c.send_file(&group, &file, &caption, &mut progress).await })
        })
        .await
}

/// Progress passed to the page a few times a second; cancelling stops the
/// transfer at its next chunk.
struct PageProgress {
    app: Arc<App>,
    id: String,
    group: String,
    cancel: Arc<AtomicBool>,
    sent: u64,
    total: u64,
    resumed_at: u64,
    started: Instant,
    told: Option<Instant>,
}

impl PageProgress {
    fn tell(&mut self) {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            (self.sent - self.resumed_at) as f64 / secs
        } else {
            0.0
        };
        self.app.publish(&json!({
            "kind": "upload",
            "id": self.id,
            "group": self.group,
            "state": "sending",
            "sent": self.sent,
            "size": self.total,
            "rate": rate.round(),
        }));
        self.told = Some(Instant::now());
    }
}

impl Progress for PageProgress {
    fn start(&mut self, _: &str, total: u64, done: u64) {
        self.total = total;
        self.sent = done;
        self.resumed_at = done;
        self.started = Instant::now();
        self.tell();
    }

    fn advance(&mut self, n: u64) -> bool {
        self.sent += n;
        if self.told.is_none_or(|t| t.elapsed().as_millis() >= 250) {
            self.tell();
        }
        !self.cancel.load(Ordering::SeqCst)
    }

    fn finish(&mut self) {
        self.tell();
    }
}

/// `GET /api/uploads`: what is staged, and in which state.
pub(super) async fn list(State(app): State<Arc<App>>) -> Json<Value> {
    let staged = app.uploads.lock();
    Json(Value::Array(
        staged.iter().map(|(id, s)| s.json(id)).collect(),
    ))
}

/// `DELETE /api/uploads/ID`: stops a file being sent (it stays, paused);
/// a file that is not being sent is dropped.
pub(super) async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let mut staged = app.uploads.lock();
    let Some(s) = staged.get(&id) else {
        return Err(ApiError(StatusCode::NOT_FOUND, "no such upload".into()));
    };
    if matches!(s.state, State_::Sending | State_::Queued) {
        s.cancel.store(true, Ordering::SeqCst);
        return Ok(StatusCode::ACCEPTED);
    }
    if let Some(s) = staged.remove(&id) {
        let _ = std::fs::remove_dir_all(&s.dir);
        app.publish(
            &json!({"kind": "upload", "id": id, "group": s.meta.group, "state": "dropped"}),
        );
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/uploads/ID/resume`: sends a paused or failed file again,
/// from where the DS stopped.
pub(super) async fn resume(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    {
        let staged = app.uploads.lock();
        let Some(s) = staged.get(&id) else {
            return Err(ApiError(StatusCode::NOT_FOUND, "no such upload".into()));
        };
        if matches!(s.state, State_::Sending | State_::Queued) {
            return Ok(StatusCode::ACCEPTED);
        }
    }
    start(&app, &id);
    Ok(StatusCode::ACCEPTED)
}
