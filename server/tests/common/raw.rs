//! A member whose MLS state lives in memory (openmls), with an
//! authenticated raw connection: it can send what an honest client never
//! would.
#![allow(dead_code, clippy::unwrap_used)]

use bytes::Bytes;
use huddle_client::identity::Identity;
use huddle_client::net::Connection;
use huddle_core::mls;
use huddle_core::proto::{Request, Response};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Deserialize as _, tls_codec::Serialize as _, *};
use openmls_rust_crypto::OpenMlsRustCrypto;

use super::InProcess;

/// A member whose MLS state lives in memory, with an authenticated
/// connection.
pub struct Raw {
    pub id: Identity,
    pub net: Connection,
    pub provider: OpenMlsRustCrypto,
}

impl Raw {
    pub async fn new(s: &InProcess, name: &str) -> Self {
        let (net, id) = s.user(name).await;
        Self::with(net, id).await
    }

    /// A member on an authenticated connection `net` as `id`, with key
    /// packages published.
    pub async fn with(net: Connection, id: Identity) -> Self {
        let me = Self {
            id,
            net,
            provider: OpenMlsRustCrypto::default(),
        };
        let kps = (0..3).map(|_| me.key_package(false)).collect();
        me.net
            .request(&Request::PublishKeyPackages {
                key_packages: kps,
                last_resort: Some(me.key_package(true)),
            })
            .await
            .unwrap();
        me
    }

    pub fn key_package(&self, last_resort: bool) -> Bytes {
        let mut b = KeyPackage::builder()
            .key_package_lifetime(Lifetime::new(3600))
            .leaf_node_capabilities(mls::capabilities());
        if last_resort {
            b = b.mark_as_last_resort();
        }
        b.build(
            mls::CIPHERSUITE,
            &self.provider,
            &self.id,
            self.id.credential(),
        )
        .unwrap()
        .key_package()
        .tls_serialize_detached()
        .unwrap()
        .into()
    }

    pub async fn create(&self) -> (GroupId, MlsGroup) {
        let gid = GroupId(rand_id());
        let g = MlsGroup::new_with_group_id(
            &self.provider,
            &self.id,
            &mls::create_config(huddle_core::devices::user_part(&self.id.name)),
            openmls::group::GroupId::from_slice(gid.as_bytes()),
            self.id.credential(),
        )
        .unwrap();
        let info = g
            .export_group_info(self.provider.crypto(), &self.id, false)
            .unwrap();
        self.net
            .request(&Request::CreateGroup {
                group: gid,
                group_info: bytes(&info),
                ratchet_tree: g
                    .export_ratchet_tree()
                    .tls_serialize_detached()
                    .unwrap()
                    .into(),
            })
            .await
            .unwrap();
        (gid, g)
    }

    pub async fn claim(&self, user: &str) -> KeyPackage {
        let Response::KeyPackages { mut packages } = self
            .net
            .request(&Request::ClaimKeyPackages {
                users: vec![user.into()],
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        KeyPackageIn::tls_deserialize_exact(packages.pop().unwrap().key_package.as_ref())
            .unwrap()
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .unwrap()
    }

    /// Joins group `gid` from `welcome`, sent with the add commit at
    /// `seq`, with the tree the DS kept for it.
    pub async fn join_from(&self, gid: GroupId, seq: u64, welcome: &[u8]) -> MlsGroup {
        let tree = match self
            .net
            .request(&Request::RatchetTree { group: gid, seq })
            .await
            .unwrap()
        {
            Response::RatchetTree { tree } => {
                RatchetTreeIn::tls_deserialize_exact(tree.as_ref()).unwrap()
            }
            other => panic!("{other:?}"),
        };
        let MlsMessageBodyIn::Welcome(w) = MlsMessageIn::tls_deserialize_exact(welcome)
            .unwrap()
            .extract()
        else {
            panic!("not a Welcome")
        };
        StagedWelcome::new_from_welcome(&self.provider, &mls::join_config(), w, Some(tree))
            .unwrap()
            .into_group(&self.provider)
            .unwrap()
    }

    pub async fn commit(
        &self,
        g: GroupId,
        commit: Bytes,
        welcome: Option<Bytes>,
    ) -> huddle_client::Result<Response> {
        self.net
            .request(&Request::Commit {
                group: g,
                commit,
                welcome,
            })
            .await
    }
}

pub fn rand_id() -> [u8; 16] {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b
}

pub fn bytes(m: &MlsMessageOut) -> Bytes {
    m.tls_serialize_detached().unwrap().into()
}
