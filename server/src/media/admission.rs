//! What an upload must be before anything is written: bounds, the header
//! against the request, the item against an earlier upload of it, the
//! quota. No I/O.

use std::sync::atomic::{AtomicU64, Ordering};

use huddle_core::media::{BlobPosition, Header, HEADER_LEN};
use huddle_core::proto::{ErrorBody, ErrorCode, UploadRequest};

use crate::store::{MediaRecord, MediaState};

use super::err;

/// The last chunk boundary at or before `pos`.
pub(super) fn boundary(header: Option<&Header>, pos: u64) -> u64 {
    match header.map(|h| h.layout().locate(pos)) {
        Some(Some(BlobPosition::Chunk { within, .. })) => pos - within as u64,
        Some(Some(BlobPosition::End)) => pos,
        _ => 0,
    }
}

pub(super) fn check_header(bytes: &[u8], req: &UploadRequest) -> Result<Header, ErrorBody> {
    let h = Header::decode(bytes)
        .map_err(|e| err(ErrorCode::BadRequest, format!("media header: {e}")))?;
    if h.media() != req.media || h.group() != req.group {
        return Err(err(
            ErrorCode::BadRequest,
            "the media header names another item or group than the upload",
        ));
    }
    if h.layout().blob_len() != req.total_len {
        return Err(err(
            ErrorCode::BadRequest,
            "the announced length does not match the media header",
        ));
    }
    Ok(h)
}

/// Checks an upload's announced size against the server's bounds.
pub(super) fn check_request(req: &UploadRequest, max_item: u64) -> Result<(), ErrorBody> {
    if req.total_len > max_item {
        return Err(err(
            ErrorCode::TooLarge,
            format!("media items are limited to {max_item} bytes on this server"),
        ));
    }
    if req.total_len < HEADER_LEN as u64 {
        return Err(err(
            ErrorCode::BadRequest,
            "a media item is at least its header",
        ));
    }
    Ok(())
}

/// What the record of an earlier upload of the same id means for this one.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Existing {
    /// The item is complete: nothing is to be sent.
    Complete,
    /// The same uploader continues its upload.
    Resume,
}

/// Checks an upload against the record of an earlier one of the same id:
/// the same item (group and length), and only its uploader may resume it.
pub(super) fn check_existing(
    r: &MediaRecord,
    req: &UploadRequest,
    user: &str,
) -> Result<Existing, ErrorBody> {
    if r.group != req.group || r.total_len != req.total_len {
        return Err(err(
            ErrorCode::BadRequest,
            "this media id is taken by another item",
        ));
    }
    if r.state == MediaState::Complete {
        return Ok(Existing::Complete);
    }
    if r.uploader != user {
        return Err(err(
            ErrorCode::NotMember,
            "only the uploader may resume an upload",
        ));
    }
    Ok(Existing::Resume)
}

/// The refusal of an item past the media quota.
pub(super) fn quota_used_up() -> ErrorBody {
    err(
        ErrorCode::QuotaExceeded,
        "the server's media storage quota is used up",
    )
}

/// Reserves `total` bytes of the media quota (`used` counts every item
/// known); refused past `quota`, reserving nothing.
pub(super) fn reserve(used: &AtomicU64, total: u64, quota: u64) -> Result<(), ErrorBody> {
    let before = used.fetch_add(total, Ordering::Relaxed);
    if before + total > quota {
        used.fetch_sub(total, Ordering::Relaxed);
        return Err(quota_used_up());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use huddle_core::{GroupId, MediaId};

    fn req(total_len: u64) -> UploadRequest {
        UploadRequest {
            media: MediaId([1; 16]),
            group: GroupId([2; 16]),
            total_len,
        }
    }

    fn record(state: MediaState) -> MediaRecord {
        MediaRecord {
            group: GroupId([2; 16]),
            uploader: "alice".into(),
            total_len: 1000,
            hash: [0; 32],
            state,
            created_ms: 0,
            updated_ms: 0,
            multipart: None,
        }
    }

    #[test]
    fn sizes_outside_the_bounds_are_refused_with_their_reason() {
        let e = check_request(&req(1 << 20), 1000).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        assert!(e.message.contains("1000 bytes"), "{}", e.message);
        let e = check_request(&req(HEADER_LEN as u64 - 1), 1 << 30).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("at least its header"), "{}", e.message);
        check_request(&req(HEADER_LEN as u64), 1 << 30).unwrap();
    }

    #[test]
    fn only_the_uploader_resumes_and_an_id_names_one_item() {
        let uploading = record(MediaState::Uploading { offset: 10 });
        assert_eq!(
            check_existing(&uploading, &req(1000), "alice").unwrap(),
            Existing::Resume
        );
        let e = check_existing(&uploading, &req(1000), "mallory").unwrap_err();
        assert_eq!(e.code, ErrorCode::NotMember);
        let e = check_existing(&uploading, &req(999), "alice").unwrap_err();
        assert!(e.message.contains("taken by another item"), "{}", e.message);
        // A complete item is complete for anyone asking (nothing is written).
        let done = record(MediaState::Complete);
        assert_eq!(
            check_existing(&done, &req(1000), "mallory").unwrap(),
            Existing::Complete
        );
    }

    #[test]
    fn the_quota_is_reserved_whole_or_not_at_all() {
        let used = AtomicU64::new(900);
        reserve(&used, 100, 1000).unwrap();
        assert_eq!(used.load(Ordering::Relaxed), 1000);
        let e = reserve(&used, 1, 1000).unwrap_err();
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert_eq!(
            used.load(Ordering::Relaxed),
            1000,
            "a refusal reserves nothing"
        );
    }
}
