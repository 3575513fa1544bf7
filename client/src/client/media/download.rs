//! Fetching media: verified chunk by chunk against the announced hash,
//! resumed from the last whole chunk, and placed without following links.

use super::Client;
use crate::app::MediaInfo;
use crate::error::{ClientError, Result};
use crate::lock::FileLock;
use huddle_core::media::{Header, ItemKey, Layout, Opener, Sealer, HEADER_LEN, TAG_LEN};
use huddle_core::proto::{Request, Response};
use huddle_core::{GroupId, MediaId};
use huddle_io::{BlobFile, BlobReader};
use std::path::{Path, PathBuf};

use super::{
    check_download_answer, file_err, integrity, read_sealed, read_sealed_parts, stalled, Progress,
};

impl Client {
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
        // One download of an item at a time per home: two processes writing
        // one `.part` would read each other's half-written chunks as their
        // verified prefix, and the first to finish would move it away from
        // under the other. The writing worker below holds the lock too, so
        // it is released only once nothing writes the `.part` any more,
        // however this ends (even dropped mid-way).
        let Some(lock) = FileLock::try_take(&partial_dir.join(format!("{media_id}.lock")))? else {
            return Err(ClientError::Busy(format!(
                "media {media_id} is being downloaded by another huddle process on this home; wait for it to finish"
            )));
        };
        let lock = std::sync::Arc::new(lock);
        // Keep whole verified chunks only.
        let have = match std::fs::metadata(&part) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(file_err(&part, e)),
        };
        let whole = (have / u64::from(info.chunk_size)).min(u64::from(layout.chunk_count()));
        let mut have = (whole * u64::from(info.chunk_size)).min(info.size);
        let mut first = whole as u32;
        if first > layout.last_index() || have >= info.size && info.size > 0 {
            // Everything is there already (a crash right before the rename).
            first = layout.chunk_count();
            have = info.size;
        }
        let mode = huddle_io::Mode::from_env();
        let blob = BlobFile::open_at(&part, have, mode).map_err(|e| file_err(&part, e))?;
        // The hash covers the whole blob: recompute the prefix from the
        // plaintext we already have (sealing is deterministic).
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header.encode());
        if first > 0 {
            let sealer = Sealer::new(&key, header);
            let mut reader = BlobReader::open(&part, mode).map_err(|e| file_err(&part, e))?;
            let mut buf = Vec::with_capacity(info.chunk_size as usize + TAG_LEN);
            for i in 0..first {
                let n = layout.plaintext_len(i).map_err(integrity)?;
                let at = u64::from(i) * u64::from(info.chunk_size);
                let plain = reader.read_at(at, n).map_err(|e| file_err(&part, e))?;
                if plain.len() < n {
                    return Err(file_err(&part, "shorter than the chunks it was cut to"));
                }
                buf.clear();
                buf.extend_from_slice(&plain);
                sealer
                    .seal_chunk_in_place(i, i == layout.last_index(), &mut buf)
                    .map_err(integrity)?;
                hasher.update(&buf);
            }
        }

        progress.start(&info.name, info.size, have);
        let (blob, hasher) = if first < layout.chunk_count() {
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
            // This task receives each sealed chunk as QUIC holds it (no
            // copy); a blocking worker copies it into the blob's aligned
            // write buffer, hashes and opens it there, and writes it (direct
            // I/O, synced now and then: huddle_io::SyncPace), so the network, the crypto
            // and the disk overlap on both cores with a few chunks in flight
            // between them, and the plaintext is never copied.
            let (tx, mut rx) =
                tokio::sync::mpsc::channel::<(u32, Vec<bytes::Bytes>)>(PIPELINE_DEPTH);
            let held = lock.clone();
            let worker = tokio::task::spawn_blocking(move || {
                let _held = held;
                let (mut blob, mut hasher) = (blob, hasher);
                let mut pace = huddle_io::SyncPace::new(blob.len());
                let mut outcome: Result<()> = Ok(());
                while let Some((i, parts)) = rx.blocking_recv() {
                    let mut opened = Ok(0);
                    let r = blob
                        .write_gather_with(&parts, |sealed| {
                            hasher.update(sealed);
                            opened = opener.open_chunk_in_slice(i, sealed);
                            // Nothing of a chunk that does not open is kept.
                            *opened.as_ref().unwrap_or(&0)
                        })
                        .and_then(|()| pace.sync_if_due(&mut blob).map(drop));
                    if let Err(e) = opened {
                        outcome = Err(integrity(e));
                        break;
                    }
                    if let Err(e) = r {
                        outcome = Err(ClientError::io("writing the download", e));
                        break;
                    }
                }
                (blob, hasher, outcome)
            });
            let mut outcome: Result<()> = Ok(());
            for i in first..layout.chunk_count() {
                let n = layout.sealed_len(i).map_err(integrity)?;
                let r = read_sealed_parts(&mut recv, n, i, &self.settings.server).await;
                let parts = match r {
                    Ok(p) => p,
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                };
                let len = layout.plaintext_len(i).map_err(integrity)? as u64;
                if tx.send((i, parts)).await.is_err() {
                    // The worker stopped; its outcome says why.
                    break;
                }
                if !progress.advance(len) {
                    outcome = Err(ClientError::Interrupted(
                        "download stopped; run it again to resume".into(),
                    ));
                    break;
                }
            }
            drop(tx);
            let (mut blob, hasher, written) = worker
                .await
                .map_err(|_| ClientError::Io("the writer task failed".into()))?;
            if let Err(e) = written.and(outcome) {
                // Keep what was verified for a later resume.
                let _ = blob.sync();
                progress.finish();
                return Err(e);
            }
            let mut extra = [0u8; 1];
            if matches!(recv.read(&mut extra).await, Ok(Some(n)) if n > 0) {
                return Err(integrity("the blob is longer than announced"));
            }
            (blob, hasher)
        } else {
            (blob, hasher)
        };
        let file = blob.finish().map_err(|e| file_err(&part, e))?;
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
        drop(lock);
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
                return Err(ClientError::Interrupted(
                    "download stopped; run it again to resume".into(),
                ));
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
        let (_, info) = self.media_info(media)?;
        let layout = Layout::new(info.chunk_size, info.size).map_err(integrity)?;
        let span = layout
            .span(start, end)
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let chunks = self.read_chunks(media, span.first, span.last).await?;
        let mut out = Vec::with_capacity((end - start) as usize);
        for c in &chunks {
            out.extend_from_slice(c);
        }
        out.drain(..span.skip);
        out.truncate((end - start) as usize);
        Ok(out)
    }

    /// The plaintext of chunks `first..=last` of a media item, one buffer
    /// per chunk, each opened and checked (its tag, its place in the item,
    /// the item's header against what the sender announced) before it is
    /// returned. Fetches only those chunks.
    pub async fn read_chunks(
        &mut self,
        media: &str,
        first: u32,
        last: u32,
    ) -> Result<Vec<Vec<u8>>> {
        let (group, info) = self.media_info(media)?;
        let media_id = MediaId(info.media_id);
        let layout = Layout::new(info.chunk_size, info.size).map_err(integrity)?;
        if first > last || last >= layout.chunk_count() {
            return Err(ClientError::Usage(format!(
                "chunks {first}..={last} are not in an item of {} chunks",
                layout.chunk_count()
            )));
        }
        let start = u64::from(first) * u64::from(info.chunk_size);
        let end = (u64::from(last) + 1)
            .saturating_mul(u64::from(info.chunk_size))
            .min(info.size);
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
        let mut out = Vec::with_capacity(span.chunks().count());
        for i in span.chunks() {
            let mut buf = vec![0; layout.sealed_len(i).map_err(integrity)?];
            read_sealed(&mut recv, &mut buf, i, &self.settings.server).await?;
            opener.open_chunk_in_place(i, &mut buf).map_err(integrity)?;
            out.push(buf);
        }
        Ok(out)
    }

    /// Fetches the blob's header and checks it against what the sender
    /// announced.
    pub(super) async fn fetch_header(
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

/// Sealed chunks in flight between the receiving task and the worker that
/// opens and writes them.
const PIPELINE_DEPTH: usize = 8;

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
pub fn safe_name(name: &str) -> String {
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
