//! Blobs on an S3-compatible object store, which every node of a cluster
//! reads and writes.
//!
//! An upload is a multipart upload of the object `PREFIX/ID`. The DS
//! gathers [`PART`] bytes, computes their BLAKE3 chaining value as a
//! subtree of the whole blob, and stores them as one part; the item's
//! record keeps the upload's id and each stored part's ETag and chaining
//! value. So an upload resumes, on any node, at the end of its last stored
//! part, and the blob's hash is computed from the parts' chaining values
//! without reading a byte back. The object itself exists only once that
//! hash matched the uploader's: the upload is completed after the check,
//! and aborted (its parts deleted) when the check fails, the upload is
//! abandoned or the item expires.
//!
//! A part is only stored once the record names its upload, so no stored
//! byte is ever unknown to the database. The one thing a crash can leave
//! behind is an upload begun but not yet recorded, which holds no part;
//! a bucket lifecycle rule that aborts incomplete uploads after a day
//! removes those too.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, HasherExt as _, Mode,
};
use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use huddle_core::proto::{ErrorBody, ErrorCode};
use huddle_core::MediaId;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore as _, PartId};
use object_store::path::Path;
use object_store::{ClientOptions, GetOptions, ObjectStore as _, ObjectStoreExt as _, RetryConfig};
use tracing::warn;

/// How long one request to the store may take (a part: [`PART_TIMEOUT`]),
/// retries included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long storing one part may take: 8 MiB at 70 KB/s.
pub const PART_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one request to the store within `limit`.
async fn bounded<T>(
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = object_store::Result<T>>,
) -> Result<T, ErrorBody> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(|e| unavailable(what, e)),
        Err(_) => {
            warn!("object store: {what} took longer than {limit:?}");
            Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!("the media store is not answering ({what}); the upload keeps its progress"),
            ))
        }
    }
}

/// Bytes per part but the last: above S3's 5 MiB minimum, and a power of
/// two, so that every part is a whole subtree of the blob's BLAKE3 tree.
/// An item of 16 GiB (the default `max_media_item`) has 2,048 parts, well
/// within S3's 10,000.
pub const PART: u64 = 8 << 20;

/// Where blobs go: `s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectsUrl {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

impl ObjectsUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "--blobs {url:?}: {why}; expected s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME]"
            )
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("not an s3:// address"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        let mut out = Self {
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
            endpoint: None,
            region: None,
        };
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("endpoint", v)) if !v.is_empty() => out.endpoint = Some(v.into()),
                Some(("region", v)) if !v.is_empty() => out.region = Some(v.into()),
                _ => return Err(bad(&format!("unknown setting {kv:?}"))),
            }
        }
        Ok(out)
    }
}

/// The object store and what the DS allows of it.
#[derive(Clone)]
pub struct Objects {
    store: Arc<AmazonS3>,
    prefix: String,
    /// Part buffers in memory across every upload of the DS
    /// (`object_part_buffers`): an upload waits for one before it gathers
    /// a part, which holds its sender back (QUIC flow control).
    buffers: Arc<tokio::sync::Semaphore>,
    /// Part buffers no upload holds, kept for the next part: allocating
    /// and freeing 8 MiB per part from many threads leaves the freed
    /// memory in the allocator's per-thread arenas, which measured as half
    /// again the DS's resident memory during one upload.
    idle: Arc<std::sync::Mutex<Vec<BytesMut>>>,
    /// Part buffers one user's uploads hold at once
    /// (`object_part_buffers_per_user`), so that a few users cannot hold
    /// them all.
    per_user: PerUser,
    per_user_limit: usize,
}

/// A part buffer and the permits that count it.
#[derive(Debug)]
pub struct PartBuf {
    pub permit: Permits,
    pub buf: BytesMut,
}

/// Buffers per user, each user's semaphore while the user holds some.
type PerUser =
    Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>>;

/// One part buffer counted against the DS's limit and its user's; the
/// user's entry goes when the user holds none.
#[derive(Debug)]
pub struct Permits {
    user: Option<tokio::sync::OwnedSemaphorePermit>,
    _all: tokio::sync::OwnedSemaphorePermit,
    name: String,
    per_user: PerUser,
}

impl Drop for Permits {
    fn drop(&mut self) {
        drop(self.user.take());
        let mut m = self.per_user.lock().expect("per-user buffers lock");
        if m.get(&self.name).is_some_and(|s| Arc::strong_count(s) == 1) {
            m.remove(&self.name);
        }
    }
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: object_store::Error) -> ErrorBody {
    warn!(error = %e, "object store: {what} failed");
    ErrorBody::new(
        ErrorCode::Unavailable,
        format!("the media store is not answering ({what}); the upload keeps its progress"),
    )
}

impl Objects {
    /// Connects to the store `url` names, with `keys` (access key id,
    /// secret) or else the `AWS_*` environment variables.
    pub fn open(
        url: &str,
        keys: Option<&(String, String)>,
        part_buffers: usize,
        per_user: usize,
    ) -> Result<Self, String> {
        let u = ObjectsUrl::parse(url)?;
        // The HTTP client's TLS takes the process's provider: the same one
        // as the DS's QUIC endpoint (a second call finds it installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&u.bucket)
            .with_region(u.region.as_deref().unwrap_or("us-east-1"))
            // The payload is not hashed into the request's signature: the
            // blob's integrity is BLAKE3's, checked by the DS on upload and
            // by every member on download, and SHA-256 over every byte
            // would cost as much CPU again as the rest of the upload.
            .with_unsigned_payload(true)
            // A store that does not answer fails the request within a
            // bounded time instead of being retried for minutes.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
                ..RetryConfig::default()
            })
            // No limit on a whole request: a download's GET lasts as long
            // as its client takes to read it. Each call below has its own
            // bound instead, and a download's stream its stall timeout.
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout_disabled(),
            );
        if let Some(e) = &u.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let Some((id, secret)) = keys {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let store = b.build().map_err(|e| format!("--blobs {url:?}: {e}"))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: u.prefix,
            buffers: Arc::new(tokio::sync::Semaphore::new(part_buffers.max(1))),
            idle: Arc::default(),
            per_user: Arc::default(),
            per_user_limit: per_user.max(1),
        })
    }

    fn key(&self, id: &MediaId) -> Path {
        if self.prefix.is_empty() {
            Path::from(id.to_string())
        } else {
            Path::from(format!("{}/{id}", self.prefix))
        }
    }

    /// Waits for a part buffer (see `object_part_buffers`), empty, with
    /// room for a part.
    pub async fn buffer(&self, user: &str) -> PartBuf {
        let mine = self
            .per_user
            .lock()
            .expect("per-user buffers lock")
            .entry(user.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_user_limit)))
            .clone();
        let user_permit = mine
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let all = self
            .buffers
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let idle = self.idle.lock().expect("buffer pool lock").pop();
        PartBuf {
            permit: Permits {
                user: Some(user_permit),
                _all: all,
                name: user.to_owned(),
                per_user: self.per_user.clone(),
            },
            buf: idle.unwrap_or_else(|| BytesMut::with_capacity(PART as usize)),
        }
    }

    /// Takes a part's bytes back for the next part, once nothing else
    /// holds them.
    pub fn recycle(&self, part: Bytes) {
        if let Ok(mut b) = part.try_into_mut() {
            b.clear();
            if b.capacity() >= PART as usize {
                self.idle.lock().expect("buffer pool lock").push(b);
            }
        }
    }

    /// Begins the multipart upload of `id`; returns its id.
    pub async fn begin(&self, id: &MediaId) -> Result<String, ErrorBody> {
        let key = self.key(id);
        bounded(
            "beginning an upload",
            REQUEST_TIMEOUT,
            self.store.create_multipart(&key),
        )
        .await
    }

    /// Stores part `index` (from 0) of upload `upload`; returns its ETag.
    pub async fn put_part(
        &self,
        id: &MediaId,
        upload: &str,
        index: usize,
        data: Bytes,
    ) -> Result<String, ErrorBody> {
        let (key, upload) = (self.key(id), upload.to_owned());
        let put = self.store.put_part(&key, &upload, index, data.into());
        bounded("storing a part", PART_TIMEOUT, put)
            .await
            .map(|p| p.content_id)
    }

    /// Completes upload `upload` of `id` from its parts' ETags, making the
    /// object readable. An upload completed before (by a node that then
    /// stopped before recording it) counts as completed if the object is
    /// there with the expected length.
    pub async fn complete(
        &self,
        id: &MediaId,
        upload: &str,
        etags: Vec<String>,
        total_len: u64,
    ) -> Result<(), ErrorBody> {
        let parts = etags
            .into_iter()
            .map(|content_id| PartId { content_id })
            .collect();
        let (key, upload) = (self.key(id), upload.to_owned());
        let complete = self.store.complete_multipart(&key, &upload, parts);
        match bounded("completing an upload", REQUEST_TIMEOUT, complete).await {
            Ok(_) => Ok(()),
            Err(e) => match bounded(
                "completing an upload",
                REQUEST_TIMEOUT,
                self.store.head(&key),
            )
            .await
            {
                Ok(meta) if meta.size == total_len => Ok(()),
                _ => Err(e),
            },
        }
    }

    /// Aborts upload `upload` of `id`, deleting its parts. An upload that
    /// is already gone counts as aborted.
    pub async fn abort(&self, id: &MediaId, upload: &str) -> Result<(), ErrorBody> {
        let (key, upload) = (self.key(id), upload.to_owned());
        let abort = async {
            match self.store.abort_multipart(&key, &upload).await {
                Err(object_store::Error::NotFound { .. }) => Ok(()),
                r => r,
            }
        };
        bounded("aborting an upload", REQUEST_TIMEOUT, abort).await
    }

    /// Deletes the object of `id`; one that is not there counts as deleted.
    pub async fn delete(&self, id: &MediaId) -> Result<(), ErrorBody> {
        let key = self.key(id);
        let delete = async {
            match self.store.delete(&key).await {
                Err(object_store::Error::NotFound { .. }) => Ok(()),
                r => r,
            }
        };
        bounded("deleting a blob", REQUEST_TIMEOUT, delete).await
    }

    /// The bytes `range` of the object of `id`, as they arrive (a ranged
    /// GET: memory is what the connection buffers, whatever the range).
    pub async fn read(
        &self,
        id: &MediaId,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, std::io::Result<Bytes>>, ErrorBody> {
        if range.is_empty() {
            return Ok(futures_util::stream::empty().boxed());
        }
        let opts = GetOptions {
            range: Some(range.into()),
            ..GetOptions::default()
        };
        let key = self.key(id);
        let got = match tokio::time::timeout(REQUEST_TIMEOUT, self.store.get_opts(&key, opts)).await
        {
            Ok(Ok(got)) => got,
            Ok(Err(object_store::Error::NotFound { .. })) => {
                return Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("media item {id} is missing from the media store"),
                ))
            }
            Ok(Err(e)) => return Err(unavailable("reading a blob", e)),
            Err(_) => {
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    "the media store is not answering (reading a blob)",
                ))
            }
        };
        Ok(got
            .into_stream()
            .map(|r| r.map_err(std::io::Error::other))
            .boxed())
    }
}

/// Which part of a blob of `total` bytes holds byte `offset`, and the
/// number of parts.
pub fn parts_of(total: u64) -> usize {
    total.div_ceil(PART).max(1) as usize
}

/// The BLAKE3 chaining value of one part: bytes `data` at `offset` of a
/// blob of more than one part.
pub fn part_cv(offset: u64, data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    if offset > 0 {
        h.set_input_offset(offset);
    }
    h.update(data);
    h.finalize_non_root()
}

/// The BLAKE3 hash of a blob of `total` bytes from the chaining values of
/// its parts of `part` bytes each (a power of two of at least one BLAKE3
/// chunk) but the last, as [`part_cv`] gave them. `None` unless there are
/// as many values as parts and more than one (a one-part blob is hashed
/// whole).
pub fn tree_hash(cvs: &[[u8; 32]], total: u64, part: u64) -> Option<[u8; 32]> {
    debug_assert!(part.is_power_of_two() && part >= blake3::CHUNK_LEN as u64);
    if cvs.len() < 2 || cvs.len() as u64 != total.div_ceil(part) {
        return None;
    }
    // BLAKE3's tree puts the largest power of two of chunks that leaves
    // something on the right into the left subtree; for more than one part
    // that is a whole number of parts, so parts are subtrees.
    fn cv(cvs: &[[u8; 32]], len: u64, part: u64) -> [u8; 32] {
        if cvs.len() == 1 {
            return cvs[0];
        }
        let left = left_subtree_len(len);
        let n = (left / part) as usize;
        merge_subtrees_non_root(
            &cv(&cvs[..n], left, part),
            &cv(&cvs[n..], len - left, part),
            Mode::Hash,
        )
    }
    let left = left_subtree_len(total);
    let n = (left / part) as usize;
    let root = merge_subtrees_root(
        &cv(&cvs[..n], left, part),
        &cv(&cvs[n..], total - left, part),
        Mode::Hash,
    );
    Some(*root.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blob_hash_from_part_values_is_blake3_of_the_whole() {
        let part = 4096u64;
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        for total in [4097u64, 8192, 8193, 12_288, 20_000, 65_536, 65_537, 199_999] {
            let blob = &data[..total as usize];
            let cvs: Vec<[u8; 32]> = blob
                .chunks(part as usize)
                .enumerate()
                .map(|(i, c)| part_cv(i as u64 * part, c))
                .collect();
            assert_eq!(
                tree_hash(&cvs, total, part),
                Some(*blake3::hash(blob).as_bytes()),
                "{total} bytes"
            );
            // One value short, or a wrong one, is not the hash.
            assert_eq!(tree_hash(&cvs[..cvs.len() - 1], total, part), None);
            let mut bad = cvs.clone();
            bad[0][0] ^= 1;
            assert_ne!(
                tree_hash(&bad, total, part),
                Some(*blake3::hash(blob).as_bytes())
            );
        }
        assert_eq!(
            tree_hash(&[[0; 32]], 100, part),
            None,
            "one part: hashed whole"
        );
    }

    #[test]
    fn addresses_name_a_bucket_and_say_what_is_wrong() {
        let u = ObjectsUrl::parse("s3://media/huddle/a?endpoint=http://127.0.0.1:8014&region=eu")
            .unwrap();
        assert_eq!(u.bucket, "media");
        assert_eq!(u.prefix, "huddle/a");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:8014"));
        assert_eq!(u.region.as_deref(), Some("eu"));
        assert_eq!(ObjectsUrl::parse("s3://b").unwrap().prefix, "");
        for bad in ["http://x/y", "s3://", "s3:///p", "s3://b?colour=red"] {
            let e = ObjectsUrl::parse(bad).unwrap_err();
            assert!(e.contains("expected s3://BUCKET"), "{bad}: {e}");
        }
    }
}
