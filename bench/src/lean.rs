//! Lean full members: real MLS group state kept in memory, used by the
//! benchmark to create groups, commit changes and send encrypted messages
//! as fast as the protocol allows.

use std::time::Instant;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use huddle_core::mls;
use huddle_core::proto::{Request, Response};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Deserialize as _, tls_codec::Serialize as _, *};
use openmls_rust_crypto::OpenMlsRustCrypto;

use crate::light::{now_ns, Light};

/// Sizes and times of one commit.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitStats {
    /// Commit message bytes.
    pub commit_bytes: usize,
    /// Welcome message bytes (0 without adds).
    pub welcome_bytes: usize,
    /// Time to build the commit locally.
    pub build_ms: f64,
    /// Time from posting until the DS acknowledged it.
    pub accept_ms: f64,
    /// Log position.
    pub seq: u64,
    /// When it was posted (ns on the run clock).
    pub posted_ns: u64,
}

/// A member with in-memory MLS state and a connection.
pub struct Lean {
    /// Identity and connection.
    pub light: Light,
    provider: OpenMlsRustCrypto,
    /// Its group, once created or joined.
    pub group: Option<(GroupId, MlsGroup)>,
}

impl std::fmt::Debug for Lean {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lean({})", self.light.id.name)
    }
}

fn ser(m: &MlsMessageOut) -> Bytes {
    m.tls_serialize_detached().expect("serialise").into()
}

impl Lean {
    /// Wraps a registered user. Its key packages must come from this
    /// provider to be joinable, so it publishes fresh ones.
    pub async fn new(light: Light, key_packages: usize) -> anyhow::Result<Self> {
        let me = Self {
            light,
            provider: OpenMlsRustCrypto::default(),
            group: None,
        };
        if key_packages > 0 {
            let kps = (0..key_packages)
                .map(|_| crate::light::key_package(&me.provider, &me.light.id, false))
                .collect();
            me.light
                .net
                .request(&Request::PublishKeyPackages {
                    key_packages: kps,
                    last_resort: None,
                })
                .await?;
        }
        Ok(me)
    }

    fn group(&mut self) -> anyhow::Result<(GroupId, &mut MlsGroup)> {
        match &mut self.group {
            Some((id, g)) => Ok((*id, g)),
            None => bail!("no group yet"),
        }
    }

    /// Creates a group with this member alone.
    pub async fn create(&mut self) -> anyhow::Result<GroupId> {
        let mut raw = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
        let id = GroupId(raw);
        let g = MlsGroup::new_with_group_id(
            &self.provider,
            &self.light.id,
            &mls::create_config(huddle_core::devices::user_part(&self.light.id.name)),
            openmls::group::GroupId::from_slice(&raw),
            self.light.id.credential(),
        )?;
        let info = g.export_group_info(self.provider.crypto(), &self.light.id, false)?;
        self.light
            .net
            .request(&Request::CreateGroup {
                group: id,
                group_info: ser(&info),
                ratchet_tree: g.export_ratchet_tree().tls_serialize_detached()?.into(),
            })
            .await?;
        self.group = Some((id, g));
        Ok(id)
    }

    /// Adds members with the Welcome's encrypted GroupInfo replaced by
    /// `pad` bytes: an attack (the DS cannot decrypt that part, nor tell;
    /// the joiners cannot join). Only the DS's cost matters here.
    pub async fn add_padded(&mut self, kps: &[KeyPackage], pad: usize) -> anyhow::Result<()> {
        let Some((id, g)) = &mut self.group else {
            bail!("no group yet")
        };
        let (commit, welcome, _) =
            g.add_members_without_update(&self.provider, &self.light.id, kps)?;
        let welcome = pad_group_info(&ser(&welcome), pad);
        self.light
            .net
            .request(&Request::Commit {
                group: *id,
                commit: ser(&commit),
                welcome: Some(welcome),
            })
            .await?;
        g.merge_pending_commit(&self.provider)?;
        Ok(())
    }

    async fn post_commit(
        &mut self,
        build: impl FnOnce(
            &mut MlsGroup,
            &OpenMlsRustCrypto,
            &huddle_client::identity::Identity,
        ) -> anyhow::Result<(MlsMessageOut, Option<MlsMessageOut>)>,
    ) -> anyhow::Result<CommitStats> {
        let t0 = Instant::now();
        let (id, _) = self.group()?;
        let (commit, welcome) = {
            let Some((_, g)) = &mut self.group else {
                bail!("no group")
            };
            build(g, &self.provider, &self.light.id)?
        };
        let build_ms = t0.elapsed().as_secs_f64() * 1e3;
        let commit = ser(&commit);
        let welcome = welcome.as_ref().map(ser);
        let stats = CommitStats {
            commit_bytes: commit.len(),
            welcome_bytes: welcome.as_ref().map_or(0, Bytes::len),
            build_ms,
            ..CommitStats::default()
        };
        let posted_ns = now_ns();
        let t1 = Instant::now();
        let r = self
            .light
            .net
            .request(&Request::Commit {
                group: id,
                commit,
                welcome,
            })
            .await?;
        let accept_ms = t1.elapsed().as_secs_f64() * 1e3;
        let Response::Appended { seq, .. } = r else {
            bail!("unexpected {r:?}")
        };
        let Some((_, g)) = &mut self.group else {
            bail!("no group")
        };
        g.merge_pending_commit(&self.provider)?;
        Ok(CommitStats {
            accept_ms,
            seq,
            posted_ns,
            ..stats
        })
    }

    /// Adds members (one commit).
    pub async fn add(&mut self, kps: Vec<KeyPackage>) -> anyhow::Result<CommitStats> {
        self.post_commit(move |g, p, s| {
            // As the client does: add-only commits carry no path.
            let (c, w, _) = g.add_members_without_update(p, s, &kps)?;
            Ok((c, Some(w)))
        })
        .await
    }

    /// Removes members by name (one commit).
    pub async fn remove(&mut self, names: &[String]) -> anyhow::Result<CommitStats> {
        let names = names.to_vec();
        self.post_commit(move |g, p, s| {
            let leaves: Vec<LeafNodeIndex> = g
                .members()
                .filter(|m| mls::principal_of(&m.credential).is_some_and(|u| names.contains(&u)))
                .map(|m| m.index)
                .collect();
            let (c, w, _) = g.remove_members(p, s, &leaves)?;
            Ok((c, w))
        })
        .await
    }

    /// Rotates this member's keys (one commit).
    pub async fn self_update(&mut self) -> anyhow::Result<CommitStats> {
        self.post_commit(|g, p, s| {
            let b = g.self_update(p, s, LeafNodeParameters::default())?;
            let (c, w, _) = b.into_messages();
            Ok((c, w))
        })
        .await
    }

    /// Publishes the GroupInfo of the group's current epoch, from which a
    /// new device of a member joins.
    pub async fn publish_group_info(&mut self) -> anyhow::Result<()> {
        let Some((id, g)) = &self.group else {
            bail!("no group yet")
        };
        let info = g.export_group_info(self.provider.crypto(), &self.light.id, true)?;
        self.light
            .net
            .request(&Request::PublishGroupInfo {
                group: *id,
                group_info: ser(&info),
            })
            .await?;
        Ok(())
    }

    /// Processes another member's commit at log position `seq`.
    pub async fn follow(&mut self, seq: u64) -> anyhow::Result<()> {
        let (id, _) = self.group()?;
        let Response::Log { entries, .. } = self
            .light
            .net
            .request(&Request::FetchLog {
                group: id,
                after: seq - 1,
                limit: 1,
            })
            .await?
        else {
            bail!("unexpected log answer")
        };
        let e = entries.first().context("the commit is not in the log")?;
        let pm =
            MlsMessageIn::tls_deserialize_exact(e.data.as_ref())?.try_into_protocol_message()?;
        let Some((_, g)) = &mut self.group else {
            bail!("no group")
        };
        let processed = g.process_message(&self.provider, pm)?;
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            bail!("entry {seq} is not a commit")
        };
        g.merge_staged_commit(&self.provider, *staged)?;
        Ok(())
    }

    /// Joins group `id` as a device of a member's user, by an external
    /// commit from the GroupInfo the DS keeps (PROTOCOL.md 10.5).
    pub async fn join_as_device(&mut self, id: GroupId) -> anyhow::Result<CommitStats> {
        let t0 = Instant::now();
        let Response::JoinInfo {
            group_info, tree, ..
        } = self
            .light
            .net
            .request(&Request::JoinInfo { group: id })
            .await?
        else {
            bail!("unexpected join answer")
        };
        let MlsMessageBodyIn::GroupInfo(vgi) =
            MlsMessageIn::tls_deserialize_exact(group_info.as_ref())?.extract()
        else {
            bail!("not a GroupInfo")
        };
        let (g, bundle) = MlsGroup::external_commit_builder()
            .with_ratchet_tree(RatchetTreeIn::tls_deserialize_exact(tree.as_ref())?)
            .with_config(mls::join_config())
            .build_group(&self.provider, vgi, self.light.id.credential())?
            .leaf_node_parameters(
                LeafNodeParameters::builder()
                    .with_capabilities(mls::capabilities())
                    .build(),
            )
            .load_psks(self.provider.storage())?
            .build(
                self.provider.rand(),
                self.provider.crypto(),
                &self.light.id,
                |_| true,
            )?
            .finalize(&self.provider)?;
        let commit = ser(bundle.commit());
        let build_ms = t0.elapsed().as_secs_f64() * 1e3;
        let posted_ns = now_ns();
        let t1 = Instant::now();
        let r = self
            .light
            .net
            .request(&Request::Commit {
                group: id,
                commit: commit.clone(),
                welcome: None,
            })
            .await?;
        let Response::Appended { seq, .. } = r else {
            bail!("unexpected {r:?}")
        };
        self.group = Some((id, g));
        Ok(CommitStats {
            commit_bytes: commit.len(),
            welcome_bytes: 0,
            build_ms,
            accept_ms: t1.elapsed().as_secs_f64() * 1e3,
            seq,
            posted_ns,
        })
    }

    /// Joins from the Welcome in this member's inbox.
    pub async fn join(&mut self) -> anyhow::Result<(GroupId, u64)> {
        let Response::Inbox { mut items, .. } = self
            .light
            .net
            .request(&Request::FetchInbox {
                after: 0,
                limit: 10,
            })
            .await?
        else {
            bail!("unexpected inbox answer")
        };
        let item = items.pop().context("no Welcome in the inbox")?;
        let Response::RatchetTree { tree } = self
            .light
            .net
            .request(&Request::RatchetTree {
                group: item.group,
                seq: item.commit_seq,
            })
            .await?
        else {
            bail!("unexpected tree answer")
        };
        let MlsMessageBodyIn::Welcome(w) =
            MlsMessageIn::tls_deserialize_exact(item.welcome.as_ref())?.extract()
        else {
            bail!("not a Welcome")
        };
        let tree = RatchetTreeIn::tls_deserialize_exact(tree.as_ref())?;
        let g =
            StagedWelcome::new_from_welcome(&self.provider, &mls::join_config(), w, Some(tree))?
                .into_group(&self.provider)?;
        self.group = Some((item.group, g));
        Ok((item.group, item.commit_seq))
    }

    /// Encrypts a `len`-byte application message carrying `stamp` in its
    /// authenticated data: the send time ([`now_ns`]) or a ticket
    /// ([`crate::light::TICKET`]). Returns the request to post.
    pub fn message(&mut self, len: usize, stamp: u64) -> anyhow::Result<Request> {
        let provider = &self.provider;
        let signer = &self.light.id;
        let Some((id, g)) = &mut self.group else {
            bail!("no group")
        };
        g.set_aad(stamp.to_be_bytes().to_vec());
        // A real text message, so full members can decrypt and count it.
        let payload = huddle_client::app::AppMessage::Text {
            text: "x".repeat(len),
        }
        .encode();
        let m = g.create_message(provider, signer, &payload)?;
        Ok(Request::Message {
            group: *id,
            message: ser(&m),
        })
    }
}

/// Welcome `MLSMessage` bytes with the `encrypted_group_info` replaced by
/// `len` bytes (version, wire format and cipher suite, then the `secrets`
/// vector, then the encrypted GroupInfo, each vector with an MLS varint
/// length).
fn pad_group_info(welcome: &[u8], len: usize) -> Bytes {
    let b = &welcome[6..];
    let (secrets, n) = match b[0] >> 6 {
        0 => (usize::from(b[0] & 0x3f), 1),
        1 => ((usize::from(b[0] & 0x3f) << 8) | usize::from(b[1]), 2),
        _ => (
            (usize::from(b[0] & 0x3f) << 24)
                | (usize::from(b[1]) << 16)
                | (usize::from(b[2]) << 8)
                | usize::from(b[3]),
            4,
        ),
    };
    let mut out = welcome[..6 + n + secrets].to_vec();
    out.extend_from_slice(&((len as u32) | 0x8000_0000).to_be_bytes());
    out.resize(out.len() + len, 0xab);
    Bytes::from(out)
}
