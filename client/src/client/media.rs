//! Sending and fetching media: encrypt on this device, upload once, announce
//! the key to the group inside MLS, download and verify chunk by chunk.
//!
//! Uploads and downloads stream through one chunk-sized buffer, so memory
//! does not grow with the file. Both resume: an upload's key, salt and id
//! are kept in the database until it is announced, so running `send-file`
//! again continues where the server stopped; a download keeps its verified
//! plaintext in `HOME/partial/` and continues from the last whole chunk.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use huddle_core::media::{Header, ItemKey, Layout, Opener, Sealer, DEFAULT_CHUNK_SIZE, HEADER_LEN};
use huddle_core::proto::{Request, Response, UploadRequest};
use huddle_core::{GroupId, MediaId};
use rusqlite::{params, Connection, OptionalExtension as _};
use std::io::{Read as _, Seek as _, Write as _};

use super::{now_ms, Client};
use crate::app::{AppMessage, MediaInfo};
use crate::error::{ClientError, Result};
use crate::event::Event;
use crate::preview;

/// Progress of a long transfer. `advance` returning `false` aborts the
/// transfer at once (its progress is kept for a later resume).
pub trait Progress {
    /// The transfer starts; `done` bytes of `total` are already there.
    fn start(&mut self, label: &str, total: u64, done: u64);
    /// `n` more bytes were transferred.
    fn advance(&mut self, n: u64) -> bool;
    /// The transfer ended (successfully or not).
    fn finish(&mut self) {}
}

/// No progress reporting.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: &str, _: u64, _: u64) {}
    fn advance(&mut self, _: u64) -> bool {
        true
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::Io(format!("{}: {e}", path.display()))
}

/// Checks that a download answer describes the item that was announced:
/// its ciphertext length and hash.
fn check_download_answer(resp: &Response, info: &MediaInfo) -> Result<()> {
    let Response::Download {
        total_len, hash, ..
    } = resp
    else {
        return Err(ClientError::Protocol(format!("unexpected {resp:?}")));
    };
    if *total_len != info.ciphertext_len || *hash != info.hash {
        return Err(integrity(
            "the server's copy is not the item the sender announced",
        ));
    }
    Ok(())
}

/// `f`, or an error if the transfer moves nothing for
/// [`crate::net::TRANSFER_STALL`] (a DS that stops sending must not hang a
/// download or an upload).
async fn stalled<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(crate::net::TRANSFER_STALL, f)
        .await
        .map_err(|_| {
            ClientError::Io(format!(
                "the transfer moved nothing for {} s; run the command again to resume",
                crate::net::TRANSFER_STALL.as_secs()
            ))
        })
}

/// Reads sealed chunk `i` of a download into `buf` (its length).
async fn read_sealed(
    recv: &mut quinn::RecvStream,
    buf: &mut [u8],
    i: u32,
    server: &str,
) -> Result<()> {
    stalled(recv.read_exact(buf)).await?.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => {
            integrity(format!("the blob ends inside chunk {i} (truncated)"))
        }
        other => ClientError::Connect {
            addr: server.to_owned(),
            reason: other.to_string(),
        },
    })
}

fn integrity(e: impl std::fmt::Display) -> ClientError {
    ClientError::Integrity(e.to_string())
}

/// Records a media item announced in a group, so `download` can find its
/// key later.
pub fn remember(conn: &Connection, group: &GroupId, info: &MediaInfo) -> Result<()> {
    conn.execute(
        // The first announcement of an id wins: a later one (from any group)
        // cannot redirect this device to other bytes or another key.
        "INSERT OR IGNORE INTO huddle_media (media_id, group_id, info) VALUES (?1, ?2, ?3)",
        params![
            info.media_id.as_slice(),
            group.as_bytes().as_slice(),
            serde_json::to_string(info).expect("media info serialises")
        ],
    )?;
    Ok(())
}

/// A pending upload, as kept in `huddle_uploads`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Pending {
    info: MediaInfo,
    salt: [u8; 32],
}

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
                    ClientError::Usage(format!("{} keeps changing; try again", path.display()))
                }),
        }
    }

    /// One attempt of [`Client::send_file`]; `None` if the file turned out
    /// to differ from what an earlier attempt under the same key sealed.
    async fn send_file_once(
        &mut self,
        group: &str,
        path: &Path,
        caption: &str,
        progress: &mut dyn Progress,
    ) -> Result<Option<Event>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.sending_group(&id)?;
        let meta = std::fs::metadata(path).map_err(|e| file_err(path, e))?;
        if !meta.is_file() {
            return Err(ClientError::Usage(format!(
                "{} is not a file",
                path.display()
            )));
        }
        let key = upload_key(&id, path, &meta);
        let pending = match self.pending_upload(&key)? {
            Some(p) => p,
            None => {
                let p = prepare(path, meta.len(), caption).await?;
                self.db.execute(
                    "INSERT OR REPLACE INTO huddle_uploads (upload_key, state, created_ms) VALUES (?1, ?2, ?3)",
                    params![key, serde_json::to_string(&p).expect("serialises"), now_ms() as i64],
                )?;
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
        let mut tags = Tags::open(&tags_path)?;
        let header =
            Header::new(media, id, pending.salt, info.chunk_size, info.size).map_err(integrity)?;
        let sealer = Sealer::new(&ItemKey::from_bytes(info.key), header);
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
            let sealed = seal_and_send(
                &sealer,
                path,
                info.ciphertext_len,
                None,
                &mut tags,
                &mut Quiet,
            )
            .await?;
            let Sealed::Whole(hash) = sealed else {
                self.drop_upload(&key, &tags_path)?;
                return Ok(None);
            };
            info.hash = hash;
        } else {
            progress.start(&info.name, info.ciphertext_len, offset);
            let r =
                seal_and_send(&sealer, path, offset, Some(&mut send), &mut tags, progress).await;
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
    fn drop_upload(&self, key: &str, tags: &Path) -> Result<()> {
        self.db
            .execute("DELETE FROM huddle_uploads WHERE upload_key = ?1", [key])?;
        let _ = std::fs::remove_file(tags);
        Ok(())
    }

    /// The server refused the upload under `key` with `e`.
    fn upload_refused(&self, key: &str, e: huddle_core::proto::ErrorBody) -> ClientError {
        if e.code == huddle_core::proto::ErrorCode::IntegrityError {
            // The server discarded it; start afresh next time.
            if let Err(db) = self
                .db
                .execute("DELETE FROM huddle_uploads WHERE upload_key = ?1", [key])
            {
                return db.into();
            }
        }
        ClientError::Server(e)
    }

    fn pending_upload(&self, key: &str) -> Result<Option<Pending>> {
        let s: Option<String> = self
            .db
            .query_row(
                "SELECT state FROM huddle_uploads WHERE upload_key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()?;
        Ok(s.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// What this device knows of a media item (from the group message that
    /// announced it).
    ///
    /// `media` is the id or any unique prefix of it.
    pub fn media_info(&self, media: &str) -> Result<(GroupId, MediaInfo)> {
        if media.is_empty() || !media.bytes().all(|b| b.is_ascii_hexdigit()) || media.len() > 32 {
            return Err(ClientError::Usage(format!("{media:?} is not a media id")));
        }
        // hex() is upper case; the prefix has only hex digits (checked).
        let rows: Vec<(Vec<u8>, String)> = self
            .db
            .prepare(
                "SELECT group_id, info FROM huddle_media WHERE substr(hex(media_id), 1, ?2) = ?1 LIMIT 2",
            )?
            .query_map(
                params![media.to_ascii_uppercase(), media.len() as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?
            .collect::<rusqlite::Result<_>>()?;
        let (g, info) = match <[_; 1]>::try_from(rows) {
            Ok([one]) => one,
            Err(rows) if rows.is_empty() => {
                return Err(ClientError::Usage(format!(
                    "no media {media} on this device (run `huddle sync` to receive new messages)"
                )))
            }
            Err(_) => {
                return Err(ClientError::Usage(format!(
                    "several media items start with {media}; give more of the id"
                )))
            }
        };
        let g =
            GroupId::from_slice(&g).ok_or_else(|| ClientError::Io("corrupt media row".into()))?;
        let info: MediaInfo = serde_json::from_str(&info)
            .map_err(|e| ClientError::Io(format!("corrupt media row: {e}")))?;
        Ok((g, info))
    }

    /// Downloads, verifies and decrypts a media item to `out` (default: its
    /// file name in the current directory), resuming an earlier attempt.
    /// Refuses to replace an existing file. Returns the path written.
    pub async fn download(
        &mut self,
        media: &str,
        out: Option<&Path>,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        self.download_file(media, out, false, progress).await
    }

    /// [`Client::download`], replacing an existing file at `out` when
    /// `overwrite` (a symbolic link there is replaced, never followed).
    pub async fn download_file(
        &mut self,
        media: &str,
        out: Option<&Path>,
        overwrite: bool,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        let (group, info) = self.media_info(media)?;
        let out = match out {
            // Into an existing directory, under the item's name.
            Some(p) if p.is_dir() => p.join(safe_name(&info.name)),
            Some(p) => p.to_owned(),
            None => PathBuf::from(safe_name(&info.name)),
        };
        check_target(&out, overwrite)?;
        outside_home(&out, self.home.dir())?;
        let media_id = MediaId(info.media_id);
        let layout = Layout::new(info.chunk_size, info.size).map_err(integrity)?;
        let header = self.fetch_header(media_id, group, &info).await?;
        let key = ItemKey::from_bytes(info.key);
        let opener = Opener::new(&key, header);

        let partial_dir = self.home.partial_dir();
        std::fs::create_dir_all(&partial_dir).map_err(|e| file_err(&partial_dir, e))?;
        let part = partial_dir.join(format!("{media_id}.part"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(|e| file_err(&part, e))?;
        // Keep whole verified chunks only.
        let have = file.metadata().map_err(|e| file_err(&part, e))?.len();
        let whole = (have / u64::from(info.chunk_size)).min(u64::from(layout.chunk_count()));
        let mut have = (whole * u64::from(info.chunk_size)).min(info.size);
        let mut first = whole as u32;
        if first > layout.last_index() || have >= info.size && info.size > 0 {
            // Everything is there already (a crash right before the rename).
            first = layout.chunk_count();
            have = info.size;
        }
        file.set_len(have).map_err(|e| file_err(&part, e))?;
        // The hash covers the whole blob: recompute the prefix from the
        // plaintext we already have (sealing is deterministic).
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header.encode());
        let sealer = Sealer::new(&key, header);
        file.seek(SeekFrom::Start(0))
            .map_err(|e| file_err(&part, e))?;
        let mut buf = Vec::with_capacity(info.chunk_size as usize + huddle_core::media::TAG_LEN);
        for i in 0..first {
            let n = layout.plaintext_len(i).map_err(integrity)?;
            buf.resize(n, 0);
            file.read_exact(&mut buf).map_err(|e| file_err(&part, e))?;
            sealer
                .seal_chunk_in_place(i, i == layout.last_index(), &mut buf)
                .map_err(integrity)?;
            hasher.update(&buf);
        }
        file.seek(SeekFrom::Start(have))
            .map_err(|e| file_err(&part, e))?;

        progress.start(&info.name, info.size, have);
        if first < layout.chunk_count() {
            let start = layout.chunk_offset(first).map_err(integrity)?;
            let (_send, mut recv, resp) = self
                .net()
                .await?
                .open(&Request::Download {
                    media: media_id,
                    offset: start,
                    len: 0,
                })
                .await?;
            check_download_answer(&resp, &info)?;
            // Verified plaintext goes to a writer thread, so writing to disk
            // overlaps with receiving and decrypting the next chunk; a
            // syncer thread flushes what was written every SYNC_EVERY bytes,
            // so the disk works during the transfer rather than all at the
            // final sync (with plenty of RAM the kernel would otherwise hold
            // the whole file dirty until then).
            let syncer = Syncer::start(file.try_clone().map_err(|e| file_err(&part, e))?);
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
            let writer = std::thread::spawn(move || -> std::io::Result<std::fs::File> {
                let mut unsynced = 0usize;
                for chunk in rx {
                    file.write_all(&chunk)?;
                    unsynced += chunk.len();
                    if unsynced >= SYNC_EVERY {
                        syncer.request();
                        unsynced = 0;
                    }
                }
                syncer.finish()?;
                Ok(file)
            });
            let mut outcome: Result<()> = Ok(());
            for i in first..layout.chunk_count() {
                let n = layout.sealed_len(i).map_err(integrity)?;
                let mut buf = vec![0u8; n];
                let r = read_sealed(&mut recv, &mut buf, i, &self.settings.server).await;
                if let Err(e) = r {
                    outcome = Err(e);
                    break;
                }
                hasher.update(&buf);
                if let Err(e) = opener.open_chunk_in_place(i, &mut buf) {
                    outcome = Err(integrity(e));
                    break;
                }
                let len = buf.len() as u64;
                if tx.send(buf).is_err() {
                    break;
                }
                if !progress.advance(len) {
                    outcome = Err(ClientError::Usage("download interrupted".into()));
                    break;
                }
            }
            drop(tx);
            file = writer
                .join()
                .map_err(|_| ClientError::Io("the writer thread failed".into()))?
                .map_err(|e| file_err(&part, e))?;
            if let Err(e) = outcome {
                // Keep what was verified for a later resume.
                let _ = file.sync_data();
                progress.finish();
                return Err(e);
            }
            let mut extra = [0u8; 1];
            if matches!(recv.read(&mut extra).await, Ok(Some(n)) if n > 0) {
                return Err(integrity("the blob is longer than announced"));
            }
        }
        progress.finish();
        if *hasher.finalize().as_bytes() != info.hash {
            // Every chunk authenticated, yet the whole does not match what
            // the sender hashed: do not keep it.
            drop(file);
            let _ = std::fs::remove_file(&part);
            return Err(integrity("the blob's hash differs from the announced one"));
        }
        file.sync_all().map_err(|e| file_err(&part, e))?;
        drop(file);
        place(&part, &out, overwrite)?;
        Ok(out)
    }

    /// Fetches a media item and writes its plaintext to `out` as it
    /// arrives, chunk by chunk, each verified before it is written (for
    /// `download -o -`: into a pipe, a player). Nothing is kept, so it does
    /// not resume; the whole blob's hash is checked at the end, and a
    /// mismatch is an error after the fact. Returns the bytes written.
    pub async fn download_to(
        &mut self,
        media: &str,
        out: &mut dyn std::io::Write,
        progress: &mut dyn Progress,
    ) -> Result<u64> {
        let (group, info) = self.media_info(media)?;
        let media_id = MediaId(info.media_id);
        let layout = Layout::new(info.chunk_size, info.size).map_err(integrity)?;
        // The whole blob on one stream, its header first.
        let (_send, mut recv, resp) = self
            .net()
            .await?
            .open(&Request::Download {
                media: media_id,
                offset: 0,
                len: 0,
            })
            .await?;
        check_download_answer(&resp, &info)?;
        let mut head = [0u8; HEADER_LEN];
        stalled(recv.read_exact(&mut head))
            .await?
            .map_err(|e| integrity(format!("header: {e}")))?;
        let header = announced_header(&head, media_id, group, &info)?;
        let opener = Opener::new(&ItemKey::from_bytes(info.key), header);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        progress.start(&info.name, info.size, 0);
        let mut buf = Vec::new();
        let mut written = 0u64;
        for i in 0..layout.chunk_count() {
            buf.resize(layout.sealed_len(i).map_err(integrity)?, 0);
            read_sealed(&mut recv, &mut buf, i, &self.settings.server).await?;
            hasher.update(&buf);
            opener.open_chunk_in_place(i, &mut buf).map_err(integrity)?;
            out.write_all(&buf).map_err(|e| {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    ClientError::OutputClosed
                } else {
                    ClientError::io("writing the download", e)
                }
            })?;
            written += buf.len() as u64;
            if !progress.advance(buf.len() as u64) {
                progress.finish();
                return Err(ClientError::Usage("download interrupted".into()));
            }
        }
        progress.finish();
        out.flush()
            .map_err(|e| ClientError::io("writing the download", e))?;
        if *hasher.finalize().as_bytes() != info.hash {
            return Err(integrity("the blob's hash differs from the announced one"));
        }
        Ok(written)
    }

    /// Reads plaintext bytes `start..end` of a media item without fetching
    /// the rest (for example to play a video from the middle).
    pub async fn read_range(&mut self, media: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        let (group, info) = self.media_info(media)?;
        let media_id = MediaId(info.media_id);
        let layout = Layout::new(info.chunk_size, info.size).map_err(integrity)?;
        let span = layout
            .span(start, end)
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let header = self.fetch_header(media_id, group, &info).await?;
        let opener = Opener::new(&ItemKey::from_bytes(info.key), header);
        let (_send, mut recv, resp) = self
            .net()
            .await?
            .open(&Request::Download {
                media: media_id,
                offset: span.blob_start,
                len: span.blob_len(),
            })
            .await?;
        check_download_answer(&resp, &info)?;
        let mut out = Vec::with_capacity((end - start) as usize);
        let mut buf = Vec::new();
        for i in span.chunks() {
            buf.resize(layout.sealed_len(i).map_err(integrity)?, 0);
            read_sealed(&mut recv, &mut buf, i, &self.settings.server).await?;
            opener.open_chunk_in_place(i, &mut buf).map_err(integrity)?;
            out.extend_from_slice(&buf);
        }
        let skip = span.skip;
        out.drain(..skip);
        out.truncate((end - start) as usize);
        Ok(out)
    }

    /// Fetches the blob's header and checks it against what the sender
    /// announced.
    async fn fetch_header(
        &mut self,
        media: MediaId,
        group: GroupId,
        info: &MediaInfo,
    ) -> Result<Header> {
        let (_send, mut recv, resp) = self
            .net()
            .await?
            .open(&Request::Download {
                media,
                offset: 0,
                len: HEADER_LEN as u64,
            })
            .await?;
        if !matches!(resp, Response::Download { .. }) {
            return Err(ClientError::Protocol(format!("unexpected {resp:?}")));
        }
        let mut bytes = [0u8; HEADER_LEN];
        stalled(recv.read_exact(&mut bytes))
            .await?
            .map_err(|e| integrity(format!("header: {e}")))?;
        announced_header(&bytes, media, group, info)
    }
}

/// A blob's header, checked against what the sender announced.
fn announced_header(
    bytes: &[u8],
    media: MediaId,
    group: GroupId,
    info: &MediaInfo,
) -> Result<Header> {
    let h = Header::decode(bytes).map_err(integrity)?;
    if h.media() != media
        || h.group() != group
        || h.chunk_size() != info.chunk_size
        || h.total_len() != info.size
    {
        return Err(integrity(
            "the blob's header does not match the announced item",
        ));
    }
    Ok(h)
}

/// A download flushes its partial file in the background about this often
/// (in bytes).
const SYNC_EVERY: usize = 16 << 20;

/// A thread that runs `sync_data` on a file when asked, without blocking
/// the writer. Requests made while a sync runs fold into one.
struct Syncer {
    wake: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl Syncer {
    fn start(file: std::fs::File) -> Self {
        let (wake, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::spawn(move || {
            for () in rx {
                // The file description is shared with the writer: an error
                // reported here is not reported again to its final sync, so
                // it must end the download.
                file.sync_data()?;
            }
            Ok(())
        });
        Self { wake, thread }
    }

    /// Asks for a sync of everything written so far.
    fn request(&self) {
        let _ = self.wake.try_send(());
    }

    /// Waits for the syncs asked for; the first error of any of them.
    fn finish(self) -> std::io::Result<()> {
        drop(self.wake);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the sync thread failed")))
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
async fn seal_and_send(
    sealer: &Sealer,
    path: &Path,
    offset: u64,
    mut send: Option<&mut quinn::SendStream>,
    tags: &mut Tags,
    progress: &mut dyn Progress,
) -> Result<Sealed> {
    let header = *sealer.header();
    let layout = header.layout();
    if offset > layout.blob_len() {
        return Err(ClientError::Protocol(
            "the server asked to resume past the end".into(),
        ));
    }
    let lost = |e: quinn::WriteError| ClientError::Io(format!("upload stream: {e}"));
    let interrupted = || ClientError::Usage("upload interrupted".into());
    let mut hasher = blake3::Hasher::new();
    let head = header.encode();
    hasher.update(&head);
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
    // A reader thread keeps a few chunks ahead, so reading the file
    // overlaps with sealing, hashing and sending.
    let mut file = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(4);
    let sizes: Vec<usize> = (0..layout.chunk_count())
        .map(|i| layout.plaintext_len(i))
        .collect::<Result<_, _>>()
        .map_err(integrity)?;
    std::thread::spawn(move || {
        for n in sizes {
            // A fresh buffer per chunk: it is handed to QUIC without a copy.
            let mut buf = Vec::with_capacity(n + huddle_core::media::TAG_LEN);
            let r = match (&mut file).take(n as u64).read_to_end(&mut buf) {
                Ok(got) if got == n => Ok(buf),
                Ok(_) => Err(std::io::Error::other(
                    "the file is shorter than when the upload began (it changed?)",
                )),
                Err(e) => Err(e),
            };
            let failed = r.is_err();
            if tx.send(r).is_err() || failed {
                return;
            }
        }
    });
    for i in 0..layout.chunk_count() {
        let mut buf = rx
            .recv()
            .map_err(|_| file_err(path, "the reader stopped"))?
            .map_err(|e| file_err(path, e))?;
        sealer
            .seal_chunk_in_place(i, i == layout.last_index(), &mut buf)
            .map_err(integrity)?;
        // Before anything of it is sent: the same key and nonce must never
        // seal other plaintext.
        if !tags.check(i, &buf[buf.len() - huddle_core::media::TAG_LEN..])? {
            return Ok(Sealed::Changed);
        }
        hasher.update(&buf);
        let start = layout.chunk_offset(i).map_err(integrity)?;
        let end = start + buf.len() as u64;
        if let Some(s) = send.as_deref_mut() {
            if end > offset {
                let skip = offset.saturating_sub(start) as usize;
                let sent = buf.len() - skip;
                let chunk = bytes::Bytes::from(buf).slice(skip..);
                stalled(s.write_chunk(chunk)).await?.map_err(lost)?;
                if !progress.advance(sent as u64) {
                    return Err(interrupted());
                }
            }
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
}

impl Tags {
    fn open(path: &Path) -> Result<Self> {
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
        // One attempt at a time per item: two processes of the home sending
        // the same file would take the upload over from each other.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ClientError::Busy(
                    "this file is being sent to this group by another huddle process on this home; wait for it to finish".into(),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(file_err(path, e)),
        }
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
        Ok(Self { file, known })
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

/// Moves the verified `part` to `out`. Across file systems it is copied
/// into a file created anew (never through a link that is already there),
/// then removed.
fn place(part: &Path, out: &Path, overwrite: bool) -> Result<()> {
    check_target(out, overwrite)?;
    match std::fs::rename(part, out) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() != Some(EXDEV) => return Err(file_err(out, e)),
        Err(_) => {}
    }
    if overwrite {
        match std::fs::remove_file(out) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(file_err(out, e)),
            _ => {}
        }
    }
    let mut from = std::fs::File::open(part).map_err(|e| file_err(part, e))?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| file_err(out, e))?;
    std::io::copy(&mut from, &mut to)
        .and_then(|_| to.sync_all())
        .map_err(|e| file_err(out, e))?;
    let _ = std::fs::remove_file(part);
    Ok(())
}

/// Whether a download may be written at `out`: nothing there, or (with
/// `overwrite`) a regular file or a link, which is replaced, never
/// followed. A device, a directory or a pipe is never replaced.
pub fn check_target(out: &Path, overwrite: bool) -> Result<()> {
    let Ok(meta) = out.symlink_metadata() else {
        return Ok(());
    };
    let t = meta.file_type();
    if !(t.is_file() || t.is_symlink()) {
        return Err(ClientError::Usage(format!(
            "{} is not a regular file; not replacing it",
            out.display()
        )));
    }
    if !overwrite {
        return Err(ClientError::Usage(format!(
            "{} exists; choose another path with -o, or replace it with --force",
            out.display()
        )));
    }
    Ok(())
}

/// Refuses to write a download into this device's own home (its database,
/// its key): `--force` there would destroy the device.
pub fn outside_home(out: &Path, home: &Path) -> Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (Ok(dir), Ok(home)) = (std::fs::canonicalize(dir), std::fs::canonicalize(home)) else {
        return Ok(());
    };
    if dir.starts_with(&home) {
        return Err(ClientError::Usage(format!(
            "{} is inside this device's home ({}); choose another place",
            out.display(),
            home.display()
        )));
    }
    Ok(())
}

/// errno of a rename across file systems.
const EXDEV: i32 = 18;

/// A file name safe to create in the current directory: no directories,
/// no control characters, and no leading dot (a sender could otherwise
/// name it `.bashrc` or `.ssh`, or hide it).
fn safe_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    // Control characters, and the format characters that reorder or hide
    // text (a right-to-left override turns "gnp.exe" into "exe.png").
    let clean: String = base
        .chars()
        .map(|c| {
            let hidden = c.is_control()
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
            if hidden {
                '_'
            } else {
                c
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.');
    if clean.is_empty() {
        "download".into()
    } else if clean.len() < base.len() && base.starts_with('.') {
        format!("_{clean}")
    } else {
        clean.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_directory() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("a\\b"), "b");
        assert_eq!(safe_name(".."), "download");
        assert_eq!(safe_name(".bash_login"), "_bash_login");
        assert_eq!(safe_name("..hidden"), "_hidden");
        assert_eq!(safe_name("a.b"), "a.b");
        assert_eq!(safe_name("\u{202e}gnp.exe"), "_gnp.exe");
        assert_eq!(safe_name("x\ny"), "x_y");
        assert_eq!(safe_name("clip.mp4"), "clip.mp4");
    }
}
