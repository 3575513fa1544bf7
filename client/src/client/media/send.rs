//! Sending a file: sealed chunk by chunk, hashed and uploaded in one pass,
//! resumed where the DS stopped, announced to the group once complete.

use super::{now_ms, Client};
use crate::app::{AppMessage, MediaInfo};
use crate::db;
use crate::error::{ClientError, Result};
use crate::event::Event;
use crate::lock::FileLock;
use crate::preview;
use huddle_core::media::{Header, ItemKey, Layout, Sealer, DEFAULT_CHUNK_SIZE, HEADER_LEN};
use huddle_core::proto::{Request, Response, UploadRequest};
use huddle_core::{GroupId, MediaId};
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{file_err, integrity, random, remember, stalled, Pending, Progress, Quiet};

impl Client {
    /// Encrypts `path`, uploads it to `group` (resuming an earlier attempt
    /// for the same file), and announces it to the group. Returns the
    /// `media` event.
    pub async fn send_file(
        &mut self,
        group: &str,
        path: &Path,
        caption: &str,
        progress: &mut dyn Progress,
    ) -> Result<Event> {
        match self.send_file_once(group, path, caption, progress).await? {
            Some(e) => Ok(e),
            // The file changed since an earlier attempt: it was dropped, and
            // this one starts afresh, with a new key.
            None => self
                .send_file_once(group, path, caption, progress)
                .await?
                .ok_or_else(|| {
                    ClientError::Contended(format!("{} keeps changing", path.display()))
                }),
        }
    }

    /// One attempt of [`Client::send_file`]; `None` if the file turned out
    /// to differ from what an earlier attempt under the same key sealed.
    pub(super) async fn send_file_once(
        &mut self,
        group: &str,
        path: &Path,
        caption: &str,
        progress: &mut dyn Progress,
    ) -> Result<Option<Event>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.sending_group(&id)?;
        // A reader, or a member of an announcement group, uploads nothing.
        self.require(&id, huddle_core::policy::Capability::Upload)?;
        let meta = std::fs::metadata(path).map_err(|e| file_err(path, e))?;
        if !meta.is_file() {
            return Err(ClientError::Usage(format!(
                "{} is not a file",
                path.display()
            )));
        }
        let key = upload_key(&id, path, &meta);
        // One attempt per file and group at a time on a home: its record is
        // read, made and dropped under this lock, so two terminals never
        // both start the same upload, nor one resume what the other just
        // finished and announce it twice.
        let lock = self.upload_lock(&key);
        let Some(lock) = FileLock::try_take(&lock)? else {
            return Err(ClientError::Busy(
                "this file is being sent to this group by another huddle process on this home; it is announced when that one finishes".into(),
            ));
        };
        let pending = match self.pending_upload(&key)? {
            Some(p) => p,
            None => {
                let p = prepare(path, meta.len(), caption).await?;
                db::media::put_upload(&self.db, &key, &p, now_ms())?;
                p
            }
        };
        let mut info = pending.info.clone();
        let media = MediaId(info.media_id);
        let tags_path = self
            .home
            .dir()
            .join("uploads")
            .join(format!("{media}.tags"));
        // The tags go wherever the sealing worker goes, and the lock with
        // them: it is released only once this attempt and its worker have
        // both let go, however the attempt ends (even dropped mid-way).
        let tags = Arc::new(Mutex::new(Tags::open(&tags_path, lock)?));
        let header =
            Header::new(media, id, pending.salt, info.chunk_size, info.size).map_err(integrity)?;
        let sealer = Arc::new(Sealer::new(&ItemKey::from_bytes(info.key), header));
        let req = Request::BeginUpload(UploadRequest {
            group: id,
            media,
            total_len: info.ciphertext_len,
        });
        let (mut send, mut recv, first) = self.net().await?.open(&req).await?;
        let Response::Upload { offset, complete } = first else {
            return Err(ClientError::Protocol(format!("unexpected {first:?}")));
        };
        if complete {
            // Stored by an earlier run whose announcement did not go out.
            let _ = send.finish();
            let sealed =
                seal_and_send(&sealer, path, info.ciphertext_len, None, &tags, &mut Quiet).await?;
            let Sealed::Whole(hash) = sealed else {
                self.drop_upload(&key, &tags_path)?;
                return Ok(None);
            };
            info.hash = hash;
        } else {
            progress.start(&info.name, info.ciphertext_len, offset);
            let r = seal_and_send(&sealer, path, offset, Some(&mut send), &tags, progress).await;
            progress.finish();
            let hash = match r {
                Ok(Sealed::Whole(h)) => h,
                Ok(Sealed::Changed) => {
                    let _ = send.reset(0u32.into());
                    self.drop_upload(&key, &tags_path)?;
                    return Ok(None);
                }
                Err(e) => {
                    // A server that refuses the rest (its disk is full, say)
                    // says why on the stream and stops reading it.
                    if let Some(reason) = refusal(&mut send, &mut recv).await {
                        return Err(self.upload_refused(&key, reason));
                    }
                    // Like a killed sender: the server keeps what arrived.
                    let _ = send.reset(0u32.into());
                    return Err(e);
                }
            };
            stalled(send.write_all(&huddle_core::frame::encode(&hash)))
                .await?
                .map_err(|e| ClientError::Io(format!("upload stream: {e}")))?;
            let _ = send.finish();
            // The DS checks the whole blob's hash before it answers.
            match stalled(crate::net::read_message::<Response>(&mut recv)).await?? {
                Response::Upload { complete: true, .. } => {}
                Response::Error(e) => return Err(self.upload_refused(&key, e)),
                other => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
            }
            info.hash = hash;
        }
        let (_, e) = self
            .send_app(&id, &AppMessage::Media(Box::new(info.clone())))
            .await?;
        remember(&self.db, &id, &info)?;
        self.drop_upload(&key, &tags_path)?;
        e.map(Some)
            .ok_or_else(|| ClientError::Protocol("a media message shows as an event".into()))
    }

    /// Forgets a pending upload (announced, or made void by a change of
    /// its file).
    pub(super) fn drop_upload(&self, key: &str, tags: &Path) -> Result<()> {
        db::media::drop_upload(&self.db, key)?;
        let _ = std::fs::remove_file(tags);
        Ok(())
    }

    /// The server refused the upload under `key` with `e`.
    pub(super) fn upload_refused(
        &self,
        key: &str,
        e: huddle_core::proto::ErrorBody,
    ) -> ClientError {
        if e.code == huddle_core::proto::ErrorCode::IntegrityError {
            // The server discarded it; start afresh next time.
            if let Err(e) = db::media::drop_upload(&self.db, key) {
                return e;
            }
        }
        ClientError::Server(e)
    }

    /// The lock file of the upload identified by `key` ([`upload_key`]):
    /// `HOME/uploads/` and 32 hex digits of its BLAKE3 hash.
    fn upload_lock(&self, key: &str) -> std::path::PathBuf {
        let name = hex::encode(&blake3::hash(key.as_bytes()).as_bytes()[..16]);
        self.home.dir().join("uploads").join(format!("{name}.lock"))
    }

    /// The lock file [`Client::send_file`] holds while it sends `path` to
    /// `group` (for tests that play another process of the home).
    #[doc(hidden)]
    pub fn upload_lock_path(&self, group: &str, path: &Path) -> Result<std::path::PathBuf> {
        let id = self.resolve_group(group)?;
        let meta = std::fs::metadata(path).map_err(|e| file_err(path, e))?;
        Ok(self.upload_lock(&upload_key(&id, path, &meta)))
    }

    pub(super) fn pending_upload(&self, key: &str) -> Result<Option<Pending>> {
        db::media::pending_upload(&self.db, key)
    }
}

/// Identifies an upload of one version of one file to one group.
fn upload_key(group: &GroupId, path: &Path, meta: &std::fs::Metadata) -> String {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{group}:{}:{}:{mtime}", abs.display(), meta.len())
}

/// Chooses key, salt and id, detects the type and makes a preview. The
/// hash is computed while uploading.
async fn prepare(path: &Path, size: u64, caption: &str) -> Result<Pending> {
    let media = MediaId(random());
    let key = random::<32>();
    let salt = random::<32>();
    let chunk_size = DEFAULT_CHUNK_SIZE;
    let layout = Layout::new(chunk_size, size).map_err(integrity)?;
    let mut file = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    let mut sniff = vec![0u8; 8192.min(size as usize)];
    file.read_exact(&mut sniff).map_err(|e| file_err(path, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let mime = preview::mime_of(&sniff, &name);
    let preview = if mime.starts_with("image/") && size <= preview::MAX_SOURCE {
        let p = path.to_owned();
        tokio::task::spawn_blocking(move || preview::thumbnail(&p))
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    Ok(Pending {
        info: MediaInfo {
            media_id: media.0,
            key,
            size,
            ciphertext_len: layout.blob_len(),
            chunk_size,
            hash: [0; 32],
            mime,
            name,
            caption: caption.to_owned(),
            preview,
        },
        salt,
    })
}

/// Why the server stopped reading an upload, if it did: the error it
/// answered with before stopping. None at once if the stream was not
/// stopped (the upload failed on this side).
async fn refusal(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Option<huddle_core::proto::ErrorBody> {
    // Polled once: a stopped stream has resolved already.
    let stopped = tokio::time::timeout(std::time::Duration::ZERO, send.stopped()).await;
    if !matches!(stopped, Ok(Ok(Some(_)))) {
        return None;
    }
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::net::read_message::<Response>(recv),
    )
    .await;
    match answer {
        Ok(Ok(Response::Error(e))) => Some(e),
        _ => None,
    }
}

/// Seals the whole file chunk by chunk, hashing the blob, and sends the
/// part from `offset` on (nothing when `send` is `None`). Returns the BLAKE3
/// hash of the whole blob. The part before `offset` is re-sealed only to
/// hash it: sealing is deterministic for a given key, salt and header.
///
/// A blocking worker reads, seals, records the tag of and hashes each chunk
/// a few chunks ahead of this task, which only hands them to QUIC: the
/// crypto and the network go on at once, on both cores.
async fn seal_and_send(
    sealer: &Arc<Sealer>,
    path: &Path,
    offset: u64,
    mut send: Option<&mut quinn::SendStream>,
    tags: &Arc<Mutex<Tags>>,
    progress: &mut dyn Progress,
) -> Result<Sealed> {
    let header = *sealer.header();
    let layout = header.layout();
    if offset > layout.blob_len() {
        return Err(ClientError::Protocol(
            "the server asked to resume past the end".into(),
        ));
    }
    let head = header.encode();
    if let Some(s) = send.as_deref_mut() {
        if offset < HEADER_LEN as u64 {
            stalled(s.write_all(&head[offset as usize..]))
                .await?
                .map_err(lost)?;
            if !progress.advance(HEADER_LEN as u64 - offset) {
                return Err(interrupted());
            }
        }
    }
    let file = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(SEAL_AHEAD);
    let pool = huddle_io::BufPool::new(POOL_MAX);
    let (sealer, tags, path_buf) = (sealer.clone(), tags.clone(), path.to_owned());
    let sending = send.is_some();
    let worker = tokio::task::spawn_blocking(move || {
        let r = seal_all(
            &sealer,
            file,
            &path_buf,
            &tags,
            sending.then_some(offset),
            &tx,
            &pool,
        );
        let _ = tx.blocking_send(Piece::Done(r));
    });
    let r = forward(&mut rx, send, offset, progress).await;
    // The worker holds the tags (and the upload's lock): an attempt that
    // ends early (stopped, the stream lost) waits for it to notice, so
    // that a resume started at once finds the lock free and the tags file
    // no longer written to.
    drop(rx);
    let _ = worker.await;
    r?.ok_or_else(|| file_err(path, "the sealing worker stopped"))?
}

/// Hands the worker's sealed chunks to the stream (those past `offset`)
/// until it says it is done: its outcome, or `None` if it stopped without
/// one.
async fn forward(
    rx: &mut tokio::sync::mpsc::Receiver<Piece>,
    mut send: Option<&mut quinn::SendStream>,
    offset: u64,
    progress: &mut dyn Progress,
) -> Result<Option<Result<Sealed>>> {
    while let Some(piece) = rx.recv().await {
        let (start, buf) = match piece {
            Piece::Done(r) => return Ok(Some(r)),
            Piece::Chunk(start, buf) => (start, buf),
        };
        let Some(s) = send.as_deref_mut() else {
            continue;
        };
        let skip = offset.saturating_sub(start) as usize;
        let sent = buf.len() - skip;
        let chunk = buf.slice(skip..);
        stalled(s.write_chunk(chunk)).await?.map_err(lost)?;
        if !progress.advance(sent as u64) {
            return Err(interrupted());
        }
    }
    Ok(None)
}

fn lost(e: quinn::WriteError) -> ClientError {
    ClientError::Io(format!("upload stream: {e}"))
}

fn interrupted() -> ClientError {
    ClientError::Interrupted("upload stopped; run it again to resume".into())
}

/// Sealed chunks the worker may run ahead of the network.
const SEAL_AHEAD: usize = 8;

/// What the sealing worker hands over: a sealed chunk to send (with its
/// blob offset), then the outcome.
enum Piece {
    Chunk(u64, bytes::Bytes),
    Done(Result<Sealed>),
}

/// Most sealed-chunk buffers kept for reuse ([`huddle_io::BufPool`]): what
/// QUIC holds unacknowledged comes back once acknowledged, so the worker
/// seals into memory that is already mapped.
const POOL_MAX: usize = 32;

/// Where in its buffer a chunk starts: a cache-line boundary. In a
/// standalone test on this project's machine, 256 KiB reads of a cached
/// file into addresses 8 or 16 bytes past one (where a large `malloc`
/// block starts) cost the kernel's copy about three times as much as
/// aligned ones (0.43 against 0.15 CPU s per GiB).
const CHUNK_ALIGN: usize = 64;

/// The sealing worker: reads, seals, checks the tag of and hashes every
/// chunk; hands over those that end past `send_from` (none when `None`).
fn seal_all(
    sealer: &Sealer,
    mut file: std::fs::File,
    path: &Path,
    tags: &Mutex<Tags>,
    send_from: Option<u64>,
    tx: &tokio::sync::mpsc::Sender<Piece>,
    pool: &Arc<huddle_io::BufPool>,
) -> Result<Sealed> {
    let layout = sealer.header().layout();
    let mut hasher = blake3::Hasher::new();
    hasher.update(&sealer.header().encode());
    for i in 0..layout.chunk_count() {
        let n = layout.plaintext_len(i).map_err(integrity)?;
        // Handed to QUIC without a copy; back in the pool once acknowledged.
        let sealed_len = n + huddle_core::media::TAG_LEN;
        let mut held = pool.take(sealed_len, CHUNK_ALIGN);
        let buf = held.get_mut();
        match file.read_exact(&mut buf[..n]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(file_err(
                    path,
                    "the file is shorter than when the upload began (it changed?)",
                ))
            }
            Err(e) => return Err(file_err(path, e)),
        }
        sealer
            .seal_chunk_in_slice(i, i == layout.last_index(), buf)
            .map_err(integrity)?;
        // Before anything of it is sent: the same key and nonce must never
        // seal other plaintext.
        let tag = &buf[n..];
        if !tags.lock().expect("tags lock").check(i, tag)? {
            return Ok(Sealed::Changed);
        }
        hasher.update(buf);
        let start = layout.chunk_offset(i).map_err(integrity)?;
        let end = start + sealed_len as u64;
        if send_from.is_none_or(|from| end <= from) {
            // Only hashed: the buffer is free again at once.
            continue;
        }
        let chunk = held.into_bytes(0..sealed_len);
        if tx.blocking_send(Piece::Chunk(start, chunk)).is_err() {
            // The sending side gave up; it reports why.
            return Err(ClientError::Interrupted(
                "upload stopped; run it again to resume".into(),
            ));
        }
    }
    Ok(Sealed::Whole(*hasher.finalize().as_bytes()))
}

/// What sealing a file for an upload came to.
enum Sealed {
    /// Every chunk sealed (and sent from the offset on): the blob's hash.
    Whole([u8; 32]),
    /// A chunk sealed to other bytes than under this key before: the file
    /// changed, and nothing of the changed chunk was sent.
    Changed,
}

/// The AEAD tag of each chunk a pending upload has sealed, in order
/// (`HOME/uploads/MEDIA.tags`), each recorded before its chunk is sent.
///
/// A resumed upload seals again under the same key and nonces (that is
/// what lets it continue where the DS stopped). If the file was changed in
/// place since, a chunk would be sealed to other plaintext under a nonce
/// already used, which breaks AES-GCM. A chunk with other plaintext gets
/// another tag: the first mismatch ends the attempt before the chunk goes
/// out, and the upload starts afresh under a new key.
struct Tags {
    file: std::fs::File,
    known: Vec<[u8; huddle_core::media::TAG_LEN]>,
    /// The upload's lock, held as long as its tags are.
    _lock: FileLock,
}

impl Tags {
    fn open(path: &Path, lock: FileLock) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| file_err(path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| file_err(path, e))?;
        let known = bytes
            .chunks_exact(huddle_core::media::TAG_LEN)
            .map(|c| c.try_into().expect("whole records"))
            .collect::<Vec<_>>();
        // A torn last record is dropped.
        file.set_len((known.len() * huddle_core::media::TAG_LEN) as u64)
            .map_err(|e| file_err(path, e))?;
        Ok(Self {
            file,
            known,
            _lock: lock,
        })
    }

    /// Whether chunk `i`'s tag is the one sealed before (recording it if it
    /// is new).
    fn check(&mut self, i: u32, tag: &[u8]) -> Result<bool> {
        let i = i as usize;
        if let Some(known) = self.known.get(i) {
            return Ok(known.as_slice() == tag);
        }
        if i == self.known.len() {
            self.file
                .write_all(tag)
                .map_err(|e| ClientError::io("recording an upload's progress", e))?;
            self.known.push(tag.try_into().expect("a tag"));
        }
        Ok(true)
    }
}
