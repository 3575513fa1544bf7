//! Media for the page: a media item's plaintext at `/api/media/MEDIA_ID`,
//! answering HTTP `Range` requests (206 with exactly the bytes asked for)
//! from verified range reads of the DS, so a player seeks in a large video
//! without fetching all of it. Each chunk is opened and checked before any
//! of its bytes are served, and kept in a bounded cache of verified chunks.
//!
//! What a sender says an item is (its MIME type, its name) is not trusted:
//! only pictures, audio and video of known types are served inline, all
//! else as a download; every media response is sandboxed by its
//! Content-Security-Policy and never sniffed, so a file sent as `text/html`
//! or `image/svg+xml` cannot run script in the page's origin.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;

use super::api::{ApiError, ApiResult};
use super::{App, READ_AHEAD_CHUNKS};

/// The Content-Security-Policy of every media response.
const MEDIA_CSP: &str = "default-src 'none'; sandbox";

/// Types served inline (the page shows or plays them); anything else is a
/// download.
const INLINE: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "audio/mpeg",
    "audio/ogg",
    "audio/webm",
    "audio/mp4",
    "audio/wav",
    "audio/flac",
];

/// Verified plaintext chunks, by item and index, up to a number of bytes;
/// the oldest go first.
#[derive(Debug)]
pub(super) struct Cache {
    max: usize,
    bytes: usize,
    chunks: HashMap<([u8; 16], u32), Bytes>,
    order: VecDeque<([u8; 16], u32)>,
}

impl Cache {
    pub(super) fn new(max: usize) -> Self {
        Cache {
            max,
            bytes: 0,
            chunks: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, media: [u8; 16], index: u32) -> Option<Bytes> {
        self.chunks.get(&(media, index)).cloned()
    }

    fn put(&mut self, media: [u8; 16], index: u32, chunk: Bytes) {
        if chunk.len() > self.max {
            return;
        }
        let key = (media, index);
        if self.chunks.contains_key(&key) {
            return;
        }
        while self.bytes + chunk.len() > self.max {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(c) = self.chunks.remove(&old) {
                self.bytes -= c.len();
            }
        }
        self.bytes += chunk.len();
        self.chunks.insert(key, chunk);
        self.order.push_back(key);
    }
}

/// A byte range of an item of `size` bytes, as asked for by a `Range`
/// header: `Ok(None)` for the whole item (no header, or one this server
/// does not take, such as several ranges, which HTTP lets it ignore),
/// `Err(())` when the range lies outside the item (416).
pub(super) fn parse_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    // Inclusive first and last byte.
    let (first, last) = if a.is_empty() {
        // The last `b` bytes.
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 || size == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let first: u64 = a.parse().map_err(|_| ())?;
        let last = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            let l: u64 = b.parse().map_err(|_| ())?;
            if l < first {
                return Err(());
            }
            l.min(size.saturating_sub(1))
        };
        (first, last)
    };
    if first >= size {
        return Err(());
    }
    Ok(Some((first, last + 1)))
}

/// The type a response carries for an item the sender says is `mime`, and
/// whether it is shown inline.
fn served_type(mime: &str) -> (&'static str, bool) {
    let m = mime
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match INLINE.iter().find(|t| **t == m) {
        Some(t) => (t, true),
        None => ("application/octet-stream", false),
    }
}

/// `Content-Disposition` for a file called `name`: a plain ASCII fallback
/// and the UTF-8 name, both stripped of anything that could break out of
/// the header.
fn disposition(inline: bool, name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._- ".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let kind = if inline { "inline" } else { "attachment" };
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[derive(Debug, Deserialize)]
pub(super) struct Download {
    /// `1`: always as a download.
    download: Option<u8>,
}

/// `GET /api/media/MEDIA_ID`: the item's plaintext, or the range asked
/// for.
pub(super) async fn serve(
    State(app): State<Arc<App>>,
    Path(media): Path<String>,
    Query(q): Query<Download>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let m = media.clone();
    let (_, info) = app.media.read(move |c| c.media_info(&m)).await?;
    let size = info.size;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (start, end, partial) = match parse_range(range, size) {
        Ok(Some((s, e))) => (s, e, true),
        Ok(None) => (0, size, false),
        Err(()) => {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).map_err(bad_header)?,
            );
            return Ok(r);
        }
    };
    let Ok(permit) = app.media_streams.clone().try_acquire_owned() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many media streams at once".into(),
        ));
    };
    let (mime, inline) = served_type(&info.mime);
    let inline = inline && q.download != Some(1);
    let chunk = u64::from(info.chunk_size);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    if start < end {
        let app = app.clone();
        let id = info.media_id;
        tokio::spawn(async move {
            let _permit = permit;
            let (first, last) = ((start / chunk) as u32, ((end - 1) / chunk) as u32);
            let mut i = first;
            while i <= last {
                let chunk_bytes = match chunk_at(&app, &media, id, i, last).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("media {media}: {e}");
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return;
                    }
                };
                let base = u64::from(i) * chunk;
                let from = start.saturating_sub(base) as usize;
                let to = ((end - base) as usize).min(chunk_bytes.len());
                if tx.send(Ok(chunk_bytes.slice(from..to))).await.is_err() {
                    // The browser stopped reading (a seek, a closed tab).
                    return;
                }
                i += 1;
            }
        });
    }
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let status = if partial {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if partial {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1))
                .map_err(bad_header)?,
        );
    }
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&disposition(inline, &info.name)).map_err(bad_header)?,
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(MEDIA_CSP),
    );
    Ok(r)
}

/// Verified chunk `i` of item `id`: from the cache, or fetched from the DS
/// with the chunks after it up to `last` (at most [`READ_AHEAD_CHUNKS`]).
async fn chunk_at(app: &App, media: &str, id: [u8; 16], i: u32, last: u32) -> crate::Result<Bytes> {
    if let Some(c) = app
        .cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(id, i)
    {
        return Ok(c);
    }
    let mut upto = i;
    {
        let cache = app.cache.lock().unwrap_or_else(|p| p.into_inner());
        while upto < last && upto - i + 1 < READ_AHEAD_CHUNKS && cache.get(id, upto + 1).is_none() {
            upto += 1;
        }
    }
    let media = media.to_owned();
    let fetched = app
        .media
        .run(move |c| Box::pin(async move { c.read_chunks(&media, i, upto).await }))
        .await?;
    let mut cache = app.cache.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Bytes::new();
    for (k, c) in fetched.into_iter().enumerate() {
        let c = Bytes::from(c);
        if k == 0 {
            out = c.clone();
        }
        cache.put(id, i + k as u32, c);
    }
    Ok(out)
}

/// `GET /api/media/MEDIA_ID/preview`: the small picture that came with the
/// item (inside the encrypted message), if it is a PNG or a JPEG.
pub(super) async fn preview(
    State(app): State<Arc<App>>,
    Path(media): Path<String>,
) -> ApiResult<Response> {
    let (_, info) = app.media.read(move |c| c.media_info(&media)).await?;
    let Some(p) = info.preview else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this item has no preview".into(),
        ));
    };
    let mime = if p.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if p.starts_with(&[0xff, 0xd8, 0xff]) {
        "image/jpeg"
    } else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "the preview is not a picture".into(),
        ));
    };
    Ok((
        [
            (header::CONTENT_TYPE, mime),
            (header::CONTENT_SECURITY_POLICY, MEDIA_CSP),
        ],
        p,
    )
        .into_response())
}

fn bad_header(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("header: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_as_http_says() {
        let n = 1000;
        assert_eq!(parse_range(None, n), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-0"), n), Ok(Some((0, 1))));
        assert_eq!(parse_range(Some("bytes=10-19"), n), Ok(Some((10, 20))));
        assert_eq!(parse_range(Some("bytes=500-"), n), Ok(Some((500, 1000))));
        assert_eq!(parse_range(Some("bytes=-100"), n), Ok(Some((900, 1000))));
        assert_eq!(parse_range(Some("bytes=-5000"), n), Ok(Some((0, 1000))));
        // A last byte past the end is cut to the end.
        assert_eq!(
            parse_range(Some("bytes=990-5000"), n),
            Ok(Some((990, 1000)))
        );
        assert_eq!(parse_range(Some("bytes=1000-"), n), Err(()));
        assert_eq!(parse_range(Some("bytes=20-10"), n), Err(()));
        assert_eq!(parse_range(Some("bytes=-0"), n), Err(()));
        assert_eq!(parse_range(Some("bytes=x-1"), n), Err(()));
        // Several ranges, or another unit: the whole item.
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), n), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), n), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-"), 0), Err(()));
    }

    #[test]
    fn only_known_media_types_are_inline() {
        assert_eq!(served_type("video/webm"), ("video/webm", true));
        assert_eq!(served_type("IMAGE/PNG; x=y"), ("image/png", true));
        for t in [
            "text/html",
            "image/svg+xml",
            "application/pdf",
            "",
            "text/javascript",
        ] {
            assert_eq!(served_type(t), ("application/octet-stream", false), "{t}");
        }
    }

    #[test]
    fn file_names_cannot_break_the_header() {
        let d = disposition(false, "a\"b\r\nX-Evil: 1;é.txt");
        assert!(HeaderValue::from_str(&d).is_ok());
        assert_eq!(
            d,
            "attachment; filename=\"a_b__X-Evil_ 1__.txt\"; filename*=UTF-8''a%22b%0D%0AX-Evil%3A%201%3B%C3%A9.txt"
        );
    }

    #[test]
    fn the_cache_keeps_to_its_size_and_drops_the_oldest() {
        let mut c = Cache::new(10);
        let m = [1; 16];
        c.put(m, 0, Bytes::from_static(b"aaaa"));
        c.put(m, 1, Bytes::from_static(b"bbbb"));
        c.put(m, 2, Bytes::from_static(b"cccc"));
        assert!(c.get(m, 0).is_none());
        assert_eq!(c.get(m, 1).as_deref(), Some(&b"bbbb"[..]));
        assert_eq!(c.get(m, 2).as_deref(), Some(&b"cccc"[..]));
        assert!(c.bytes <= 10);
        c.put(m, 3, Bytes::from(vec![0; 11]));
        assert!(c.get(m, 3).is_none());
    }
}
