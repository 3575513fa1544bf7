//! Joining groups from the Welcomes in this user's inbox.

use bytes::Bytes;
use huddle_core::mls::{self, principal_of};
use huddle_core::proto::{InboxItem, Request, Response, MAX_PAGE};
use openmls::prelude::{tls_codec::Deserialize as _, *};
use tracing::warn;

use crate::db::groups::GroupState;
use crate::db::history::Origin;
use crate::db::{self, Provider};
use crate::error::{ClientError, Result};
use crate::event::{Event, EventKind};
use crate::follow::{member_keys, member_names};

use super::{mls_gid, now_ms, Client};

impl Client {
    /// Processes new Welcomes.
    pub async fn sync_inbox(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        loop {
            let after = db::settings::get(&self.db, "inbox_cursor")?;
            let Response::Inbox { items, head } = self
                .request(&Request::FetchInbox {
                    after,
                    limit: MAX_PAGE,
                })
                .await?
            else {
                return Err(ClientError::Protocol("expected Inbox".into()));
            };
            if items.is_empty() {
                break;
            }
            for item in items {
                if let Some(mut e) = self.join(&item).await? {
                    let id = item.group;
                    // The group's name arrives in its log, right after the
                    // commit that added us.
                    let r = self.sync_group(&id).await;
                    let later = self.isolate(&id, r)?;
                    if let Some(row) =
                        db::groups::load(&self.db, &id)?.filter(|r| !r.name.is_empty())
                    {
                        e.group_name = row.name;
                        // In place: it stays before the messages it precedes.
                        db::history::replace_first(&self.db, &id, &e)?;
                    }
                    events.push(e);
                    events.extend(later);
                }
            }
            let now = db::settings::get(&self.db, "inbox_cursor")?;
            // A page that moved nothing on (only items already handled,
            // from a DS that keeps announcing a higher head) ends it.
            if now >= head || now == after {
                break;
            }
        }
        Ok(events)
    }

    /// Joins a group from a Welcome in the inbox. Returns the `joined` event,
    /// or `None` when the item was already handled or cannot be used.
    pub(super) async fn join(&mut self, item: &InboxItem) -> Result<Option<Event>> {
        if item.seq <= db::settings::get(&self.db, "inbox_cursor")? {
            return Ok(None);
        }
        // Another process of the home may be joining from the same Welcome
        // (or rejoining the group): one of them does it.
        let _lock = self.locks.lock(&item.group).await?;
        if item.seq <= db::settings::get(&self.db, "inbox_cursor")? {
            return Ok(None);
        }
        let tree = self.fetch_tree(item).await?;
        self.join_with_tree(item, tree)
    }

    pub(super) async fn fetch_tree(&mut self, item: &InboxItem) -> Result<Option<Bytes>> {
        Ok(
            match self
                .request(&Request::RatchetTree {
                    group: item.group,
                    seq: item.commit_seq,
                })
                .await
            {
                Ok(Response::RatchetTree { tree }) => Some(tree),
                Ok(_) => None,
                Err(ClientError::Server(e)) => {
                    warn!(group = %item.group, error = %e.message, "cannot fetch the ratchet tree for a Welcome");
                    None
                }
                Err(e) => return Err(e),
            },
        )
    }

    /// Joins from a Welcome with the given ratchet tree (as served by the
    /// DS). A Welcome that does not fit the tree, or is not for this device,
    /// is refused: nothing is joined, and the inbox cursor moves past it.
    /// Returns the `joined` event, or `None` when refused or already handled.
    pub fn join_with_tree(
        &mut self,
        item: &InboxItem,
        tree: Option<Bytes>,
    ) -> Result<Option<Event>> {
        let tx = self.db.unchecked_transaction()?;
        // Checked inside the (write) transaction: another process of the
        // home may have used this Welcome a moment ago.
        if item.seq <= db::settings::get(&tx, "inbox_cursor")? {
            return Ok(None);
        }
        let result = (|| -> Result<Event> {
            let tree = tree.ok_or_else(|| ClientError::Mls("no ratchet tree".into()))?;
            let tree =
                RatchetTreeIn::tls_deserialize_exact(tree.as_ref()).map_err(ClientError::mls)?;
            let msg = MlsMessageIn::tls_deserialize_exact(item.welcome.as_ref())
                .map_err(ClientError::mls)?;
            let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
                return Err(ClientError::Mls("inbox item is not a Welcome".into()));
            };
            let old = db::groups::load(&tx, &item.group)?;
            let provider = Provider::new(&self.crypto, &tx);
            // A Welcome this device can open (it takes one of its one-time
            // key packages) means the group added it anew: it was removed,
            // or left, and was added back, perhaps while it was away. Its
            // state replaces what this device kept of the group; if the
            // Welcome does not open, the transaction rolls back and nothing
            // is lost.
            let mut old_epoch = None;
            if let Some(mut stale) = MlsGroup::load(provider.storage(), &mls_gid(&item.group))
                .map_err(ClientError::mls)?
            {
                old_epoch = Some(stale.epoch().as_u64());
                stale.delete(provider.storage()).map_err(ClientError::mls)?;
            }
            let staged = StagedWelcome::new_from_welcome(
                &provider,
                &mls::join_config(),
                welcome,
                Some(tree),
            )
            .map_err(ClientError::mls)?;
            if staged.group_context().group_id().as_slice() != item.group.as_bytes() {
                return Err(ClientError::Mls(
                    "the Welcome is for another group than announced".into(),
                ));
            }
            // A device that follows the group (it rejoined meanwhile, say)
            // keeps a state newer than the Welcome.
            let following = old
                .as_ref()
                .is_some_and(|r| matches!(r.state, GroupState::Active | GroupState::Leaving));
            if following && old_epoch.is_some_and(|e| e >= staged.group_context().epoch().as_u64())
            {
                return Err(ClientError::Mls(
                    "a Welcome older than this device's state of the group".into(),
                ));
            }
            let from = staged
                .welcome_sender()
                .ok()
                .and_then(|l| principal_of(l.credential()))
                .unwrap_or_else(|| "?".into());
            let group = staged.into_group(&provider).map_err(ClientError::mls)?;
            let members = member_names(&group);
            let changed = db::users::remember_keys(&tx, &member_keys(&group), now_ms())?;
            if !changed.is_empty() {
                warn!(group = %item.group, users = ?changed, "identity keys differ from the ones first seen");
            }
            db::groups::insert_joined(
                &tx,
                &item.group,
                &old.map(|r| r.name).unwrap_or_default(),
                item.commit_seq,
                now_ms(),
            )?;
            let e = Event::new(
                EventKind::Joined {
                    members,
                    epoch: group.epoch().as_u64(),
                },
                &item.group.to_string(),
                &from,
                item.commit_seq,
                item.timestamp_ms,
            );
            db::history::record(&tx, &item.group, std::slice::from_ref(&e), Origin::Others)?;
            Ok(e)
        })();
        db::settings::set(&tx, "inbox_cursor", item.seq)?;
        match result {
            Ok(e) => {
                tx.commit()?;
                Ok(Some(e))
            }
            Err(err) => {
                // Roll back any partial join, but keep the cursor moving: a
                // Welcome that cannot be used now never becomes usable.
                drop(tx);
                warn!(group = %item.group, error = %err, "ignoring a Welcome that cannot be used");
                db::settings::set(&self.db, "inbox_cursor", item.seq)?;
                Ok(None)
            }
        }
    }
}
