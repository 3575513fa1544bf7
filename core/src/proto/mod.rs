//! The Huddle wire protocol, version 1.
//!
//! A connection negotiates ALPN [`ALPN`] (`huddle/1`); the ALPN string is the
//! protocol version. Every client request opens a new bidirectional QUIC
//! stream, sends one [`Request`] frame and finishes its side; the server
//! answers with one [`Response`] frame and finishes. The one exception is
//! [`Request::Subscribe`]: its stream stays open, the server pushes
//! [`Event`] frames on it and the client sends [`Control`] frames (acks,
//! watches) the other way.
//!
//! Bodies are postcard-encoded. An enum is a varint variant index followed by
//! the fields in order, so new message types are only ever appended; a peer
//! that receives an index it does not know gets [`DecodeError::UnknownType`]
//! rather than a generic failure. `docs/PROTOCOL.md` is the full
//! specification.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ids::{GroupId, MediaId};

mod codec;
mod error;

pub use codec::{decode, encode_body, encode_frame, DecodeError, Message};
pub use error::{ErrorBody, ErrorCode};

/// ALPN protocol id, which is also the protocol version.
pub const ALPN: &[u8] = b"huddle/1";

/// Largest UDP payload either side accepts, and the upper bound of QUIC's
/// path MTU discovery. Connections start at QUIC's safe 1,200 bytes and
/// probe upwards, so on a 1,500-byte Ethernet path they settle at about
/// 1,450 as before; where the path allows more (loopback, jumbo frames)
/// fewer, larger packets carry the same bytes, which roughly doubles what
/// raw quinn moves on loopback (`huddle-bench baseline`).
/// Not larger: quinn sends up to 10 segments in one GSO call, and the
/// kernel refuses a GSO send over 64 KiB, so with 8,000 bytes a bulk
/// transfer on loopback stalled.
pub const MAX_UDP_PAYLOAD: u16 = 6_000;

/// Label for the TLS exporter that binds an authentication proof to one
/// connection (RFC 8446 §7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-huddle-auth";

/// Most user names accepted in one claim or lookup request.
pub const MAX_BATCH_USERS: usize = 1000;

/// Most key packages accepted in one upload.
pub const MAX_KEY_PACKAGE_BATCH: usize = 200;

/// Most log entries returned in one page.
pub const MAX_PAGE: u32 = 1000;

/// A page of log entries or inbox items stops growing once it holds this
/// many bytes of messages (it always holds at least one), so every page fits
/// in a frame.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// A request from client to server. One per stream, except [`Request::Subscribe`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Ask for a fresh nonce to authenticate this connection with.
    /// Answer: [`Response::Challenge`].
    Challenge,
    /// Claim `name` for `identity_key` and authenticate this connection as it.
    /// `proof` is an Ed25519 signature by `identity_key` over
    /// [`crate::auth::proof_message`] with [`crate::auth::Purpose::Register`].
    /// Answer: [`Response::Authenticated`].
    Register {
        /// The user name to claim.
        name: String,
        /// Ed25519 public key, also the MLS signature key of the user.
        identity_key: [u8; 32],
        /// Signature proving possession of the key on this connection.
        proof: Bytes,
    },
    /// Authenticate this connection as an already registered user.
    /// Answer: [`Response::Authenticated`].
    Authenticate {
        /// The registered user name.
        name: String,
        /// Signature over [`crate::auth::proof_message`] with
        /// [`crate::auth::Purpose::Authenticate`].
        proof: Bytes,
    },
    /// Upload one-time MLS key packages, and optionally replace the
    /// last-resort package. Answer: [`Response::KeyPackageCount`].
    PublishKeyPackages {
        /// TLS-serialised `MlsMessage`-less `KeyPackage`s.
        key_packages: Vec<Bytes>,
        /// A key package carrying the last-resort extension.
        last_resort: Option<Bytes>,
    },
    /// How many of my one-time key packages are left. Answer:
    /// [`Response::KeyPackageCount`].
    KeyPackageCount,
    /// Claim one key package of each user. Answer: [`Response::KeyPackages`].
    ClaimKeyPackages {
        /// Users to claim for (each at most once).
        users: Vec<String>,
    },
    /// Look up users' identity keys. Answer: [`Response::Users`].
    LookupUsers {
        /// Names to look up.
        names: Vec<String>,
    },
    /// Register a new group whose only member is the caller.
    /// Answer: [`Response::Appended`] with `seq` 0.
    CreateGroup {
        /// The MLS group id.
        group: GroupId,
        /// TLS-serialised `MlsMessage` carrying the epoch-0 `GroupInfo`.
        group_info: Bytes,
        /// TLS-serialised `RatchetTree`.
        ratchet_tree: Bytes,
    },
    /// Append a commit (a PublicMessage) to a group's log.
    /// Answer: [`Response::Appended`] or an error with code
    /// [`ErrorCode::StaleEpoch`] carrying the current epoch.
    Commit {
        /// Target group.
        group: GroupId,
        /// TLS-serialised `MlsMessage` (PublicMessage, content type commit).
        commit: Bytes,
        /// TLS-serialised `MlsMessage` (Welcome), present when members are added.
        welcome: Option<Bytes>,
    },
    /// Append a proposal (a PublicMessage). Answer: [`Response::Appended`].
    Proposal {
        /// Target group.
        group: GroupId,
        /// TLS-serialised `MlsMessage` (PublicMessage, content type proposal).
        proposal: Bytes,
    },
    /// Append an application message (a PrivateMessage).
    /// Answer: [`Response::Appended`].
    Message {
        /// Target group.
        group: GroupId,
        /// TLS-serialised `MlsMessage` (PrivateMessage, content type application).
        message: Bytes,
    },
    /// Read a page of a group's log. Answer: [`Response::Log`].
    FetchLog {
        /// Group to read.
        group: GroupId,
        /// Return entries with a sequence number greater than this.
        after: u64,
        /// At most this many entries (capped at [`MAX_PAGE`]).
        limit: u32,
    },
    /// Read my Welcome inbox. Answer: [`Response::Inbox`].
    FetchInbox {
        /// Return items with a sequence number greater than this.
        after: u64,
        /// At most this many items (capped at [`MAX_PAGE`]).
        limit: u32,
    },
    /// The public ratchet tree of a group as it was right after the commit at
    /// log position `seq` that added me. Answer: [`Response::RatchetTree`].
    RatchetTree {
        /// Group.
        group: GroupId,
        /// Log position of the commit the Welcome belongs to.
        seq: u64,
    },
    /// The DS's view of a group. Answer: [`Response::GroupState`].
    GroupState {
        /// Group.
        group: GroupId,
    },
    /// Open the push stream. Answer: [`Response::Subscribed`], then [`Event`]s.
    Subscribe {
        /// Groups to follow, each with the last sequence number already
        /// processed.
        groups: Vec<(GroupId, u64)>,
        /// Last inbox sequence number already processed.
        inbox_after: u64,
    },
    /// Groups the caller is a current member of. Answer: [`Response::Groups`].
    ListGroups,
    /// Start or resume an upload of an encrypted media item.
    /// Answer: [`Response::Upload`] with the offset to continue from. The
    /// client then sends the raw blob bytes from that offset to `total_len`,
    /// followed by one trailer frame whose 32-byte body is the BLAKE3 hash
    /// of the whole blob ([`UPLOAD_TRAILER_LEN`]), and finishes the stream.
    /// The server answers a second time: [`Response::Upload`] with
    /// `complete` set, or an error.
    BeginUpload(UploadRequest),
    /// Download a byte range of a stored media item.
    /// Answer: [`Response::Download`], then the raw bytes of the range.
    Download {
        /// Media item.
        media: MediaId,
        /// First ciphertext byte wanted.
        offset: u64,
        /// Number of bytes wanted (0 means "to the end").
        len: u64,
    },
    /// Publish the epoch authenticator hash this member computed, and read
    /// what others published for the same epoch.
    /// Answer: [`Response::EpochAuthenticators`].
    EpochAuthenticator {
        /// Group.
        group: GroupId,
        /// Epoch.
        epoch: u64,
        /// BLAKE3 hash of the member's epoch authenticator.
        hash: [u8; 32],
    },
    /// Publish a signed GroupInfo (TLS-serialised `MlsMessage`, with the
    /// external public key extension) for the group's current epoch, so a
    /// member whose state was lost or diverged can rejoin by an external
    /// commit. The DS checks that the caller signed it and that its group
    /// context is the DS's own. Answer: [`Response::Appended`] with the
    /// group's head and epoch (nothing is appended to the log).
    PublishGroupInfo {
        /// Group.
        group: GroupId,
        /// The GroupInfo.
        group_info: Bytes,
    },
    /// What a member needs to rejoin by an external commit: the newest
    /// published GroupInfo and the public ratchet tree of the same epoch.
    /// Answer: [`Response::JoinInfo`], or `NotFound` when no GroupInfo for
    /// the current epoch has been published yet.
    JoinInfo {
        /// Group.
        group: GroupId,
    },
    /// Ask to link a new device to `user` (PROTOCOL.md 10.5). Sent by the
    /// new device on a connection that is not authenticated, after a
    /// [`Request::Challenge`]; `proof` is a signature by `device_key` over
    /// [`crate::auth::proof_message`] with [`crate::auth::Purpose::Link`]
    /// and the name `user`. Answer: [`Response::LinkCode`].
    RequestLink {
        /// The user the device is to belong to.
        user: String,
        /// The new device's Ed25519 key.
        device_key: [u8; 32],
        /// Proof of possession of the key on this connection.
        proof: Bytes,
    },
    /// The key of the device that asked to be linked to the caller's user
    /// with `code`. Answer: [`Response::PendingLink`].
    PendingLink {
        /// The code the new device shows.
        code: String,
    },
    /// Append an entry (a [`crate::devices::DeviceEntry`], signed by the
    /// caller's device) to the caller's user's device log. An entry that
    /// adds a device names the `code` that device was given. Answer:
    /// [`Response::Devices`] with the log after it.
    AppendDevice {
        /// The encoded entry.
        entry: Bytes,
        /// For an added device: its link code.
        code: Option<String>,
    },
    /// A user's device log. Allowed before authentication (a device being
    /// linked waits with it). Answer: [`Response::Devices`].
    Devices {
        /// The user.
        user: String,
    },
    /// Groups the caller may join by an external commit because another
    /// current device of its user is a member and it is not. Answer:
    /// [`Response::Groups`].
    UserGroups,
    /// What joining `group` with an invite needs: as [`Request::JoinInfo`],
    /// for a caller that holds an invite of the group's policy. `proof` is
    /// [`crate::policy::info_proof`] (PROTOCOL.md 10.3). Answer:
    /// [`Response::JoinInfo`].
    InviteInfo {
        /// Group.
        group: GroupId,
        /// The invite's key and its signature of the request.
        proof: Bytes,
    },
    /// The users waiting to be added to `group` (with invites that need
    /// approval), for a member who may add users. Answer:
    /// [`Response::JoinRequests`].
    JoinRequests {
        /// Group.
        group: GroupId,
    },
    /// Turns down `user`'s request to join `group`. Answer:
    /// [`Response::JoinRequests`] with those still waiting.
    DeclineJoin {
        /// Group.
        group: GroupId,
        /// The user who asked.
        user: String,
    },
}

/// Parameters of an upload.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct UploadRequest {
    /// Group the media belongs to; only its members may fetch it.
    pub group: GroupId,
    /// Id chosen by the uploader (random).
    pub media: MediaId,
    /// Length of the whole ciphertext in bytes.
    pub total_len: u64,
}

/// Body length of the trailer frame that ends an upload: the BLAKE3 hash of
/// the whole blob. It comes last so the client can hash while it sends.
pub const UPLOAD_TRAILER_LEN: usize = 32;

/// A response from server to client.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The request failed.
    Error(ErrorBody),
    /// A nonce to sign, valid for this connection only.
    Challenge {
        /// Random nonce.
        nonce: [u8; 32],
    },
    /// The connection is now authenticated as `name`.
    Authenticated {
        /// The user.
        name: String,
    },
    /// How many one-time key packages the caller has left on the server.
    KeyPackageCount {
        /// One-time packages still unclaimed.
        available: u32,
        /// Whether a last-resort package is stored.
        last_resort: bool,
    },
    /// Claimed key packages, one per requested user.
    KeyPackages {
        /// In the order requested.
        packages: Vec<ClaimedKeyPackage>,
    },
    /// Identity keys of users.
    Users {
        /// One per known requested name; unknown names are left out.
        users: Vec<UserInfo>,
    },
    /// A message was appended to a group's log (durably).
    Appended {
        /// Its sequence number.
        seq: u64,
        /// The group's epoch after it.
        epoch: u64,
    },
    /// A page of a group's log.
    Log {
        /// Entries in order.
        entries: Vec<LogEntry>,
        /// Sequence number of the newest entry the caller may read.
        head: u64,
    },
    /// A page of the caller's Welcome inbox.
    Inbox {
        /// Items in order.
        items: Vec<InboxItem>,
        /// Newest inbox sequence number.
        head: u64,
    },
    /// A public ratchet tree (TLS-serialised `RatchetTree`).
    RatchetTree {
        /// The tree.
        tree: Bytes,
    },
    /// The DS's view of a group.
    GroupState {
        /// Current epoch.
        epoch: u64,
        /// Newest log sequence number.
        head: u64,
        /// User names of current members.
        members: Vec<String>,
        /// Epoch of the newest published GroupInfo, if any.
        group_info_epoch: Option<u64>,
    },
    /// The push stream is open.
    Subscribed,
    /// Groups of the caller.
    Groups {
        /// One per group.
        groups: Vec<GroupSummary>,
    },
    /// Where an upload stands.
    Upload {
        /// Ciphertext bytes already stored; the client sends from here on.
        offset: u64,
        /// True when the blob is complete, verified and fetchable.
        complete: bool,
    },
    /// A download starts; the raw bytes follow on the stream.
    Download {
        /// Total ciphertext length of the item.
        total_len: u64,
        /// BLAKE3 hash of the whole ciphertext.
        hash: [u8; 32],
        /// Offset of the first byte that follows.
        offset: u64,
        /// Number of bytes that follow.
        len: u64,
        /// Group the item belongs to.
        group: GroupId,
    },
    /// Epoch authenticator hashes published for one epoch.
    EpochAuthenticators {
        /// (user, hash) pairs, including the caller's.
        published: Vec<(String, [u8; 32])>,
    },
    /// A GroupInfo and the ratchet tree of the group's current epoch.
    JoinInfo {
        /// The epoch both belong to.
        epoch: u64,
        /// TLS-serialised `MlsMessage` (GroupInfo).
        group_info: Bytes,
        /// TLS-serialised `RatchetTree`.
        tree: Bytes,
        /// Newest log sequence number.
        head: u64,
    },
    /// A link request is pending under `code` until `expires_ms`.
    LinkCode {
        /// Eight digits, shown by the new device as `1234-5678`.
        code: String,
        /// When the request lapses, ms since the Unix epoch.
        expires_ms: u64,
    },
    /// The device that asked to be linked with a code.
    PendingLink {
        /// Its Ed25519 key.
        device_key: [u8; 32],
        /// When the request lapses, ms since the Unix epoch.
        expires_ms: u64,
    },
    /// A user's device log.
    Devices {
        /// The user.
        user: String,
        /// The key the user registered with (device 1's).
        root_key: [u8; 32],
        /// The log's entries in order, each an encoded
        /// [`crate::devices::DeviceEntry`].
        entries: Vec<Bytes>,
        /// When each current device last authenticated, as far as this
        /// DS knows (device number, ms since the Unix epoch); only for a
        /// caller that is one of the user's devices, empty otherwise.
        last_seen: Vec<(u32, u64)>,
    },
    /// The caller's request to join `group` waits for an admin (its
    /// invite needs approval).
    JoinRequested {
        /// Group.
        group: GroupId,
    },
    /// Users waiting to be added to a group, oldest first.
    JoinRequests {
        /// (user, the first 8 hex digits of the invite's key, when it
        /// asked in ms since the Unix epoch).
        requests: Vec<(String, String, u64)>,
    },
}

/// One key package handed out by the directory.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ClaimedKeyPackage {
    /// Whose package it is.
    pub user: String,
    /// TLS-serialised `KeyPackage`.
    pub key_package: Bytes,
    /// True when the pool was empty and the last-resort package was returned.
    pub last_resort: bool,
}

/// A registered user.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct UserInfo {
    /// Name.
    pub name: String,
    /// Ed25519 identity key.
    pub identity_key: [u8; 32],
}

/// A group the caller belongs to.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct GroupSummary {
    /// Group.
    pub group: GroupId,
    /// Current epoch.
    pub epoch: u64,
    /// Newest log sequence number.
    pub head: u64,
}

/// What kind of MLS message a log entry holds.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum EntryKind {
    /// A commit (PublicMessage).
    Commit,
    /// A proposal (PublicMessage).
    Proposal,
    /// An application message (PrivateMessage).
    Application,
}

/// One entry of a group's log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// The MLS epoch the message was sent in.
    pub epoch: u64,
    /// What it is.
    pub kind: EntryKind,
    /// When the DS appended it (milliseconds since the Unix epoch).
    pub timestamp_ms: u64,
    /// The TLS-serialised `MlsMessage`.
    pub data: Bytes,
}

impl fmt::Debug for LogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogEntry")
            .field("seq", &self.seq)
            .field("epoch", &self.epoch)
            .field("kind", &self.kind)
            .field("len", &self.data.len())
            .finish()
    }
}

/// A Welcome waiting in a user's inbox.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxItem {
    /// Position in the user's inbox, from 1.
    pub seq: u64,
    /// The group joined.
    pub group: GroupId,
    /// Log position of the commit that added the user; the joiner reads
    /// the log after it.
    pub commit_seq: u64,
    /// When the DS stored it (milliseconds since the Unix epoch).
    pub timestamp_ms: u64,
    /// TLS-serialised `MlsMessage` (Welcome).
    pub welcome: Bytes,
}

impl fmt::Debug for InboxItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxItem")
            .field("seq", &self.seq)
            .field("group", &self.group)
            .field("commit_seq", &self.commit_seq)
            .finish()
    }
}

/// Pushed by the server on a subscription stream.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Event {
    /// A new entry in a followed group.
    Entry {
        /// Group.
        group: GroupId,
        /// The entry.
        entry: LogEntry,
    },
    /// A new Welcome in the inbox.
    Inbox(InboxItem),
    /// The server could not keep up pushing this group to this client;
    /// fetch the log from the last processed entry up to `head`, then send
    /// [`Control::Watch`] to resume pushes.
    Gap {
        /// Group.
        group: GroupId,
        /// Newest sequence number at the time.
        head: u64,
    },
    /// Pushes for this group stopped (for example: the caller was removed,
    /// after the entry that removed it was pushed).
    Unwatched {
        /// Group.
        group: GroupId,
        /// Why.
        reason: ErrorBody,
    },
    /// The server could not keep up pushing Welcomes to this client; fetch
    /// the inbox from the last processed item.
    InboxGap {
        /// Newest inbox sequence number at the time.
        head: u64,
    },
}

/// Sent by the client on a subscription stream.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Control {
    /// Entries up to `seq` were processed; the server may forget them for
    /// this member.
    Ack {
        /// Group.
        group: GroupId,
        /// Last processed entry.
        seq: u64,
    },
    /// Inbox items up to `seq` were processed.
    AckInbox {
        /// Last processed item.
        seq: u64,
    },
    /// Start (or resume) pushes for a group after `after`.
    Watch {
        /// Group.
        group: GroupId,
        /// Last processed entry.
        after: u64,
    },
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key packages, proofs or MLS payloads: names and ids only.
        match self {
            Request::Challenge => f.write_str("Challenge"),
            Request::Register { name, .. } => write!(f, "Register({name})"),
            Request::Authenticate { name, .. } => write!(f, "Authenticate({name})"),
            Request::PublishKeyPackages { key_packages, .. } => {
                write!(f, "PublishKeyPackages({})", key_packages.len())
            }
            Request::KeyPackageCount => f.write_str("KeyPackageCount"),
            Request::ClaimKeyPackages { users } => write!(f, "ClaimKeyPackages({users:?})"),
            Request::LookupUsers { names } => write!(f, "LookupUsers({names:?})"),
            Request::CreateGroup { group, .. } => write!(f, "CreateGroup({group})"),
            Request::Commit { group, commit, .. } => {
                write!(f, "Commit({group}, {} bytes)", commit.len())
            }
            Request::Proposal { group, .. } => write!(f, "Proposal({group})"),
            Request::Message { group, message } => {
                write!(f, "Message({group}, {} bytes)", message.len())
            }
            Request::FetchLog {
                group,
                after,
                limit,
            } => write!(f, "FetchLog({group}, after {after}, limit {limit})"),
            Request::FetchInbox { after, limit } => {
                write!(f, "FetchInbox(after {after}, limit {limit})")
            }
            Request::RatchetTree { group, seq } => write!(f, "RatchetTree({group}, {seq})"),
            Request::GroupState { group } => write!(f, "GroupState({group})"),
            Request::Subscribe { groups, .. } => write!(f, "Subscribe({} groups)", groups.len()),
            Request::ListGroups => f.write_str("ListGroups"),
            Request::BeginUpload(u) => write!(f, "BeginUpload({}, {} bytes)", u.media, u.total_len),
            Request::Download { media, offset, len } => {
                write!(f, "Download({media}, {offset}+{len})")
            }
            Request::EpochAuthenticator { group, epoch, .. } => {
                write!(f, "EpochAuthenticator({group}, {epoch})")
            }
            Request::PublishGroupInfo { group, group_info } => {
                write!(f, "PublishGroupInfo({group}, {} bytes)", group_info.len())
            }
            Request::JoinInfo { group } => write!(f, "JoinInfo({group})"),
            Request::RequestLink { user, .. } => write!(f, "RequestLink({user})"),
            Request::PendingLink { .. } => f.write_str("PendingLink"),
            Request::AppendDevice { entry, .. } => {
                write!(f, "AppendDevice({} bytes)", entry.len())
            }
            Request::Devices { user } => write!(f, "Devices({user})"),
            Request::UserGroups => f.write_str("UserGroups"),
            Request::InviteInfo { group, .. } => write!(f, "InviteInfo({group})"),
            Request::JoinRequests { group } => write!(f, "JoinRequests({group})"),
            Request::DeclineJoin { group, user } => write!(f, "DeclineJoin({group}, {user})"),
        }
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::Error(e) => write!(f, "Error({e:?})"),
            Response::Challenge { .. } => f.write_str("Challenge"),
            Response::Authenticated { name } => write!(f, "Authenticated({name})"),
            Response::KeyPackageCount {
                available,
                last_resort,
            } => write!(f, "KeyPackageCount({available}, last_resort {last_resort})"),
            Response::KeyPackages { packages } => write!(f, "KeyPackages({})", packages.len()),
            Response::Users { users } => write!(f, "Users({})", users.len()),
            Response::Appended { seq, epoch } => write!(f, "Appended(seq {seq}, epoch {epoch})"),
            Response::Log { entries, head } => {
                write!(f, "Log({} entries, head {head})", entries.len())
            }
            Response::Inbox { items, head } => {
                write!(f, "Inbox({} items, head {head})", items.len())
            }
            Response::RatchetTree { tree } => write!(f, "RatchetTree({} bytes)", tree.len()),
            Response::GroupState {
                epoch,
                head,
                members,
                ..
            } => write!(
                f,
                "GroupState(epoch {epoch}, head {head}, {} members)",
                members.len()
            ),
            Response::Subscribed => f.write_str("Subscribed"),
            Response::Groups { groups } => write!(f, "Groups({})", groups.len()),
            Response::Upload { offset, complete } => {
                write!(f, "Upload(offset {offset}, complete {complete})")
            }
            Response::Download {
                total_len,
                offset,
                len,
                ..
            } => write!(f, "Download({offset}+{len} of {total_len})"),
            Response::EpochAuthenticators { published } => {
                write!(f, "EpochAuthenticators({})", published.len())
            }
            Response::JoinInfo { epoch, tree, .. } => {
                write!(f, "JoinInfo(epoch {epoch}, tree {} bytes)", tree.len())
            }
            Response::LinkCode { expires_ms, .. } => write!(f, "LinkCode(until {expires_ms})"),
            Response::PendingLink { expires_ms, .. } => {
                write!(f, "PendingLink(until {expires_ms})")
            }
            Response::Devices { user, entries, .. } => {
                write!(f, "Devices({user}, {} entries)", entries.len())
            }
            Response::JoinRequested { group } => write!(f, "JoinRequested({group})"),
            Response::JoinRequests { requests } => write!(f, "JoinRequests({})", requests.len()),
        }
    }
}

#[cfg(test)]
mod tests;
