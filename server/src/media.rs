//! Encrypted media blobs (not yet served: uploads and downloads are refused
//! with a clear error until the blob store lands).

use std::sync::Arc;

use huddle_core::proto::{self, ErrorBody, ErrorCode, Response, UploadRequest};
use huddle_core::MediaId;

use crate::config::ServerConfig;
use crate::service::{Service, Session};

/// Where blobs live.
#[derive(Debug)]
pub struct BlobStore {}

impl BlobStore {
    /// Opens the blob directory.
    pub fn open(_config: &ServerConfig) -> anyhow::Result<Self> {
        Ok(Self {})
    }

    /// Periodic clean-up.
    pub async fn maintenance(&self, _svc: &Service) {}
}

async fn refuse(mut send: quinn::SendStream) {
    let e = ErrorBody::new(
        ErrorCode::UnknownMessageType,
        "media transfer is not supported by this server version",
    );
    if send
        .write_all(&proto::encode_frame(&Response::Error(e)))
        .await
        .is_ok()
    {
        let _ = send.finish();
    }
}

/// Handles an upload stream.
pub async fn upload(
    _svc: &Arc<Service>,
    _blobs: &Arc<BlobStore>,
    _session: &Arc<Session>,
    _req: UploadRequest,
    send: quinn::SendStream,
    _recv: quinn::RecvStream,
) {
    refuse(send).await
}

/// Handles a download stream.
pub async fn download(
    _svc: &Arc<Service>,
    _blobs: &Arc<BlobStore>,
    _session: &Arc<Session>,
    _media: MediaId,
    _offset: u64,
    _len: u64,
    send: quinn::SendStream,
) {
    refuse(send).await
}
