//! Tests of the wire codec: round trips, bounds, and refusals of malformed input.

use super::*;
use crate::frame;
use proptest::collection::vec;
use proptest::prelude::*;

fn bytes_(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}
fn gid() -> impl Strategy<Value = GroupId> {
    any::<[u8; 16]>().prop_map(GroupId)
}
fn mid() -> impl Strategy<Value = MediaId> {
    any::<[u8; 16]>().prop_map(MediaId)
}
fn name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,20}"
}
fn code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode::from)
}
fn error_body() -> impl Strategy<Value = ErrorBody> {
    (code(), ".{0,40}", any::<Option<u64>>()).prop_map(|(code, message, epoch)| ErrorBody {
        code,
        message,
        epoch,
    })
}
fn kind() -> impl Strategy<Value = EntryKind> {
    prop_oneof![
        Just(EntryKind::Commit),
        Just(EntryKind::Proposal),
        Just(EntryKind::Application)
    ]
}
fn entry() -> impl Strategy<Value = LogEntry> {
    (any::<u64>(), any::<u64>(), kind(), any::<u64>(), bytes_(64)).prop_map(
        |(seq, epoch, kind, timestamp_ms, data)| LogEntry {
            seq,
            epoch,
            kind,
            timestamp_ms,
            data,
        },
    )
}
fn inbox_item() -> impl Strategy<Value = InboxItem> {
    (any::<u64>(), gid(), any::<u64>(), any::<u64>(), bytes_(64)).prop_map(
        |(seq, group, commit_seq, timestamp_ms, welcome)| InboxItem {
            seq,
            group,
            commit_seq,
            timestamp_ms,
            welcome,
        },
    )
}
fn upload() -> impl Strategy<Value = UploadRequest> {
    (gid(), mid(), any::<u64>()).prop_map(|(group, media, total_len)| UploadRequest {
        group,
        media,
        total_len,
    })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Challenge),
        (name(), any::<[u8; 32]>(), bytes_(80)).prop_map(|(name, identity_key, proof)| {
            Request::Register {
                name,
                identity_key,
                proof,
            }
        }),
        (name(), bytes_(80)).prop_map(|(name, proof)| Request::Authenticate { name, proof }),
        (vec(bytes_(40), 0..4), proptest::option::of(bytes_(40))).prop_map(
            |(key_packages, last_resort)| Request::PublishKeyPackages {
                key_packages,
                last_resort
            }
        ),
        Just(Request::KeyPackageCount),
        vec(name(), 0..5).prop_map(|users| Request::ClaimKeyPackages { users }),
        vec(name(), 0..5).prop_map(|names| Request::LookupUsers { names }),
        (gid(), bytes_(50), bytes_(50)).prop_map(|(group, group_info, ratchet_tree)| {
            Request::CreateGroup {
                group,
                group_info,
                ratchet_tree,
            }
        }),
        (gid(), bytes_(50), proptest::option::of(bytes_(50))).prop_map(
            |(group, commit, welcome)| Request::Commit {
                group,
                commit,
                welcome
            }
        ),
        (gid(), bytes_(50)).prop_map(|(group, proposal)| Request::Proposal { group, proposal }),
        (gid(), bytes_(50)).prop_map(|(group, message)| Request::Message { group, message }),
        (gid(), any::<u64>(), any::<u32>()).prop_map(|(group, after, limit)| Request::FetchLog {
            group,
            after,
            limit
        }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(after, limit)| Request::FetchInbox { after, limit }),
        (gid(), any::<u64>()).prop_map(|(group, seq)| Request::RatchetTree { group, seq }),
        gid().prop_map(|group| Request::GroupState { group }),
        (vec((gid(), any::<u64>()), 0..4), any::<u64>()).prop_map(|(groups, inbox_after)| {
            Request::Subscribe {
                groups,
                inbox_after,
            }
        }),
        Just(Request::ListGroups),
        upload().prop_map(Request::BeginUpload),
        (mid(), any::<u64>(), any::<u64>()).prop_map(|(media, offset, len)| Request::Download {
            media,
            offset,
            len
        }),
        (gid(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(group, epoch, hash)| {
            Request::EpochAuthenticator { group, epoch, hash }
        }),
        (gid(), bytes_(60))
            .prop_map(|(group, group_info)| Request::PublishGroupInfo { group, group_info }),
        gid().prop_map(|group| Request::JoinInfo { group }),
        (name(), any::<[u8; 32]>(), bytes_(64)).prop_map(|(user, device_key, proof)| {
            Request::RequestLink {
                user,
                device_key,
                proof,
            }
        }),
        name().prop_map(|code| Request::PendingLink { code }),
        (bytes_(100), proptest::option::of(name()))
            .prop_map(|(entry, code)| Request::AppendDevice { entry, code }),
        name().prop_map(|user| Request::Devices { user }),
        Just(Request::UserGroups),
        (gid(), bytes_(102)).prop_map(|(group, proof)| Request::InviteInfo { group, proof }),
        gid().prop_map(|group| Request::JoinRequests { group }),
        (gid(), name()).prop_map(|(group, user)| Request::DeclineJoin { group, user }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        error_body().prop_map(Response::Error),
        any::<[u8; 32]>().prop_map(|nonce| Response::Challenge { nonce }),
        name().prop_map(|name| Response::Authenticated { name }),
        (any::<u32>(), any::<bool>()).prop_map(|(available, last_resort)| {
            Response::KeyPackageCount {
                available,
                last_resort,
            }
        }),
        vec(
            (name(), bytes_(40), any::<bool>()).prop_map(|(user, key_package, last_resort)| {
                ClaimedKeyPackage {
                    user,
                    key_package,
                    last_resort,
                }
            }),
            0..4
        )
        .prop_map(|packages| Response::KeyPackages { packages }),
        vec(
            (name(), any::<[u8; 32]>())
                .prop_map(|(name, identity_key)| UserInfo { name, identity_key }),
            0..4
        )
        .prop_map(|users| Response::Users { users }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, epoch)| Response::Appended { seq, epoch }),
        (vec(entry(), 0..4), any::<u64>())
            .prop_map(|(entries, head)| Response::Log { entries, head }),
        (vec(inbox_item(), 0..4), any::<u64>())
            .prop_map(|(items, head)| Response::Inbox { items, head }),
        bytes_(80).prop_map(|tree| Response::RatchetTree { tree }),
        (
            any::<u64>(),
            any::<u64>(),
            vec(name(), 0..5),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(epoch, head, members, group_info_epoch)| {
                Response::GroupState {
                    epoch,
                    head,
                    members,
                    group_info_epoch,
                }
            }),
        Just(Response::Subscribed),
        vec(
            (gid(), any::<u64>(), any::<u64>()).prop_map(|(group, epoch, head)| GroupSummary {
                group,
                epoch,
                head
            }),
            0..4
        )
        .prop_map(|groups| Response::Groups { groups }),
        (any::<u64>(), any::<bool>())
            .prop_map(|(offset, complete)| Response::Upload { offset, complete }),
        (
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<u64>(),
            gid()
        )
            .prop_map(|(total_len, hash, offset, len, group)| Response::Download {
                total_len,
                hash,
                offset,
                len,
                group
            }),
        vec((name(), any::<[u8; 32]>()), 0..4)
            .prop_map(|published| Response::EpochAuthenticators { published }),
        (any::<u64>(), bytes_(60), bytes_(80), any::<u64>()).prop_map(
            |(epoch, group_info, tree, head)| Response::JoinInfo {
                epoch,
                group_info,
                tree,
                head
            }
        ),
        (name(), any::<u64>())
            .prop_map(|(code, expires_ms)| Response::LinkCode { code, expires_ms }),
        (any::<[u8; 32]>(), any::<u64>()).prop_map(|(device_key, expires_ms)| {
            Response::PendingLink {
                device_key,
                expires_ms,
            }
        }),
        (
            name(),
            any::<[u8; 32]>(),
            vec(bytes_(100), 0..3),
            vec((any::<u32>(), any::<u64>()), 0..3)
        )
            .prop_map(|(user, root_key, entries, last_seen)| Response::Devices {
                user,
                root_key,
                entries,
                last_seen
            }),
        gid().prop_map(|group| Response::JoinRequested { group }),
        vec((name(), name(), any::<u64>()), 0..3)
            .prop_map(|requests| Response::JoinRequests { requests }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (gid(), entry()).prop_map(|(group, entry)| Event::Entry { group, entry }),
        inbox_item().prop_map(Event::Inbox),
        (gid(), any::<u64>()).prop_map(|(group, head)| Event::Gap { group, head }),
        (gid(), error_body()).prop_map(|(group, reason)| Event::Unwatched { group, reason }),
        any::<u64>().prop_map(|head| Event::InboxGap { head }),
    ]
}

fn control() -> impl Strategy<Value = Control> {
    prop_oneof![
        (gid(), any::<u64>()).prop_map(|(group, seq)| Control::Ack { group, seq }),
        any::<u64>().prop_map(|seq| Control::AckInbox { seq }),
        (gid(), any::<u64>()).prop_map(|(group, after)| Control::Watch { group, after }),
    ]
}

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) -> Result<(), TestCaseError> {
    let frame = encode_frame(m);
    let (body, rest) = frame::split(&frame, frame::DEFAULT_MAX_FRAME).unwrap();
    prop_assert!(rest.is_empty());
    prop_assert_eq!(&decode::<M>(body).unwrap(), m);
    // Any strict prefix of a body is refused, never misread.
    if !body.is_empty() {
        let cut = body.len() / 2;
        prop_assert!(decode::<M>(&body[..cut]).is_err());
    }
    let mut extra = body.to_vec();
    extra.push(0);
    prop_assert_eq!(decode::<M>(&extra), Err(DecodeError::TrailingBytes(1)));
    Ok(())
}

proptest! {
    #[test]
    fn requests_round_trip(r in request()) { round_trip(&r)?; }
    #[test]
    fn responses_round_trip(r in response()) { round_trip(&r)?; }
    #[test]
    fn events_round_trip(e in event()) { round_trip(&e)?; }
    #[test]
    fn controls_round_trip(c in control()) { round_trip(&c)?; }

    #[test]
    fn garbage_never_panics(body in vec(any::<u8>(), 0..200)) {
        let _ = decode::<Request>(&body);
        let _ = decode::<Response>(&body);
        let _ = decode::<Event>(&body);
        let _ = decode::<Control>(&body);
    }

    #[test]
    fn error_codes_are_stable(v in any::<u16>()) {
        prop_assert_eq!(u16::from(ErrorCode::from(v)), v);
    }
}

#[test]
fn unknown_type_is_told_apart() {
    // Index 30 is one past the last request this build knows.
    assert_eq!(decode::<Request>(&[30]), Err(DecodeError::UnknownType(30)));
    assert_eq!(
        decode::<Request>(&[0x80, 0x01]),
        Err(DecodeError::UnknownType(128))
    );
    assert_eq!(decode::<Request>(&[]), Err(DecodeError::Truncated));
    assert_eq!(decode::<Request>(&[0x80]), Err(DecodeError::Truncated));
    // A known type with a cut-off field.
    let body = encode_body(&Request::FetchInbox {
        after: 1 << 40,
        limit: 5,
    });
    assert_eq!(
        decode::<Request>(&body[..body.len() - 1]),
        Err(DecodeError::Truncated)
    );
}

#[test]
fn numbers_not_in_their_shortest_encoding_are_refused() {
    // Challenge is type 0: one byte, not a padded varint.
    assert_eq!(decode::<Request>(&[0]), Ok(Request::Challenge));
    assert!(matches!(
        decode::<Request>(&[0x80, 0x00]),
        Err(DecodeError::Invalid(m)) if m.contains("shortest")
    ));
    // A padded field: FetchInbox's `limit` 5 as 0x85 0x00.
    let body = encode_body(&Request::FetchInbox { after: 1, limit: 5 });
    assert_eq!(body.last(), Some(&5));
    let mut padded = body[..body.len() - 1].to_vec();
    padded.extend_from_slice(&[0x85, 0x00]);
    assert!(matches!(
        decode::<Request>(&padded),
        Err(DecodeError::Invalid(m)) if m.contains("shortest")
    ));
}

/// KNOWN_TYPES must match the number of variants: the last variant decodes,
/// one past it is unknown.
#[test]
fn known_type_counts_match_enums() {
    let last_request = Request::DeclineJoin {
        group: GroupId([0; 16]),
        user: String::new(),
    };
    assert_eq!(
        encode_body(&last_request)[0] as u32,
        Request::KNOWN_TYPES - 1
    );
    let last_response = Response::JoinRequests {
        requests: Vec::new(),
    };
    assert_eq!(
        encode_body(&last_response)[0] as u32,
        Response::KNOWN_TYPES - 1
    );
    let last_event = Event::InboxGap { head: 0 };
    assert_eq!(encode_body(&last_event)[0] as u32, Event::KNOWN_TYPES - 1);
    let last_control = Control::Watch {
        group: GroupId([0; 16]),
        after: 0,
    };
    assert_eq!(
        encode_body(&last_control)[0] as u32,
        Control::KNOWN_TYPES - 1
    );
}
