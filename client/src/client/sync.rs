//! Catching up: reading each group's log and processing it in order,
//! the cursor advanced in the same transaction.

use std::collections::{HashMap, HashSet};

use huddle_core::devices::DeviceSet;
use huddle_core::proto::{EntryKind, ErrorCode, LogEntry, Request, Response, MAX_PAGE};
use huddle_core::GroupId;
use openmls::prelude::*;
use rusqlite::Connection;
use tracing::{debug, warn};

use crate::app::MediaInfo;
use crate::db::groups::{GroupRow, GroupState};
use crate::db::history::Origin;
use crate::db::{self, Provider};
use crate::error::{ClientError, Result};
use crate::event::{Event, EventKind};
use crate::follow;

use super::{mls_gid, now_ms, Client, KEY_PACKAGE_BATCH, KEY_PACKAGE_LOW};

impl Client {
    /// Fetches and processes everything pending: Welcomes, then every
    /// group's log. Returns what is new.
    ///
    /// A group that fails (its state cannot be processed, the DS refuses
    /// something of it) does not hold up the others: it shows as an
    /// `error` event and the rest goes on. Losing the connection ends the
    /// whole sync.
    ///
    /// What is new is read from the history: everything recorded since it
    /// was last reported (by `sync` or `listen`), whichever process of the
    /// home recorded it — a `send` that processed others' messages before
    /// sending, say — except this user's own messages and changes, which
    /// the commands that made them reported.
    pub async fn sync(&mut self) -> Result<Vec<Event>> {
        Ok(self.sync_reporting().await?.0)
    }

    /// [`Client::sync`], and the newest history row its report covered.
    pub(super) async fn sync_reporting(&mut self) -> Result<(Vec<Event>, i64)> {
        let mut failures: Vec<Event> = self
            .sync_inbox()
            .await?
            .into_iter()
            .filter(|e| !e.recorded())
            .collect();
        // A linked device that could not join all its user's groups yet.
        failures.extend(
            self.join_user_groups()
                .await?
                .into_iter()
                .filter(|e| !e.recorded()),
        );
        for (id, state) in self.group_ids()? {
            match self.sync_one(&id, state).await {
                Ok(_) => {}
                Err(e) if e.is_connection() => return Err(e),
                Err(e) => failures.push(self.failure(&id, &e)),
            }
        }
        self.check_lost_groups().await?;
        let (n, lr) = self.key_package_count().await?;
        if n < KEY_PACKAGE_LOW || !lr {
            self.publish_key_packages(KEY_PACKAGE_BATCH, !lr).await?;
        }
        let (mut events, covered) = self.unreported()?;
        events.extend(failures);
        Ok((events, covered))
    }

    pub(super) async fn sync_one(&mut self, id: &GroupId, state: GroupState) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        match state {
            GroupState::Creating => self.resume_creation(id).await?,
            GroupState::Rejoining => {
                events.extend(self.rejoin(id, "an earlier rejoin did not finish").await?)
            }
            GroupState::Active | GroupState::Leaving => {
                events.extend(self.sync_group(id).await?);
                self.tell_name_to_new_devices(id, &events).await?;
                events.extend(self.maybe_commit_proposals(id, false).await?);
                events.extend(self.check_fork(id).await?);
            }
            _ => {}
        }
        Ok(events)
    }

    /// A device that joined the group by itself (a device of this user,
    /// or a user with an invite) cannot read the group's name (it was sent
    /// before): after `events` show such a join, this one tells the group
    /// the name again: for a device, a sibling; for an invite, the member
    /// with the lowest leaf index.
    pub(super) async fn tell_name_to_new_devices(
        &mut self,
        id: &GroupId,
        events: &[Event],
    ) -> Result<()> {
        let sibling = events.iter().any(|e| {
            e.kind == "device_added"
                && e.members().iter().any(|p| {
                    huddle_core::devices::user_part(p) == self.name() && p != self.principal()
                })
        });
        let invited = events.iter().any(|e| e.kind == "joined_by_invite");
        let mine = sibling
            || (invited && {
                let g = self.load_group(&self.db, id)?;
                let joined: Vec<&String> = events
                    .iter()
                    .filter(|e| e.kind == "joined_by_invite")
                    .flat_map(|e| e.members())
                    .collect();
                let first = g
                    .members()
                    .filter(|m| {
                        huddle_core::mls::principal_of(&m.credential).is_some_and(|p| {
                            !joined
                                .iter()
                                .any(|j| *j == huddle_core::devices::user_part(&p))
                        })
                    })
                    .map(|m| m.index)
                    .min();
                first == Some(g.own_leaf_index())
            });
        if !mine {
            return Ok(());
        }
        let Some(row) = db::groups::load(&self.db, id)? else {
            return Ok(());
        };
        if row.name.is_empty() || row.state != GroupState::Active {
            return Ok(());
        }
        self.send_app(id, &crate::app::AppMessage::GroupName { name: row.name })
            .await?;
        Ok(())
    }

    /// The `error` event reporting that `id` could not be brought up to
    /// date (not recorded in the history).
    pub(super) fn failure(&self, id: &GroupId, err: &ClientError) -> Event {
        debug!(group = %id, error = %err, "this group could not be synced; the others go on");
        let cursor = db::groups::load(&self.db, id).ok().flatten();
        let mut e = Event::new(
            EventKind::Error {
                text: err.to_string(),
            },
            &id.to_string(),
            "",
            cursor.as_ref().map_or(0, |r| r.cursor),
            now_ms(),
        );
        e.group_name = cursor.map(|r| r.name).unwrap_or_default();
        e
    }

    pub(super) fn group_ids(&self) -> Result<Vec<(GroupId, GroupState)>> {
        Ok(db::groups::list(&self.db)?
            .into_iter()
            .map(|g| (g.id, g.state))
            .collect())
    }

    /// Fetches and processes a group's log from the cursor to the head.
    pub async fn sync_group(&mut self, id: &GroupId) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        self.fresh_devices.clear();
        loop {
            let Some(row) = db::groups::load(&self.db, id)? else {
                break;
            };
            if !matches!(row.state, GroupState::Active | GroupState::Leaving) {
                break;
            }
            let r = self
                .request(&Request::FetchLog {
                    group: *id,
                    after: row.cursor,
                    limit: MAX_PAGE,
                })
                .await;
            let (entries, head) = match r {
                Ok(Response::Log { entries, head }) => (entries, head),
                Ok(other) => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
                Err(ClientError::Server(e)) if e.code == ErrorCode::NotMember => {
                    // The DS no longer lets us read: we were removed in an
                    // entry we have already processed, or never joined.
                    db::groups::set_state(&self.db, id, GroupState::Removed)?;
                    break;
                }
                Err(ClientError::Server(e)) if e.code == ErrorCode::Compacted => {
                    events.extend(self.lost_to_compaction(id, &row).await?);
                    break;
                }
                Err(e) => return Err(e),
            };
            if entries.is_empty() {
                if row.pending_commit.is_some() && row.cursor >= head {
                    self.discard_abandoned_commit(id)?;
                }
                break;
            }
            let n = entries.len();
            let first = entries[0].seq;
            events.extend(self.process_entries(id, &entries)?);
            if !self.need_devices.is_empty() {
                // A commit adds a device of a user whose device log is
                // needed: fetch it, then read on from where processing
                // stopped.
                for user in std::mem::take(&mut self.need_devices) {
                    if let Err(e) = self.fetch_devices(&user).await {
                        if e.is_connection() {
                            return Err(e);
                        }
                        warn!(%user, error = %e, "the device log cannot be used; its devices are refused");
                        self.fresh_devices.insert(user);
                    }
                }
                continue;
            }
            let now = db::groups::load(&self.db, id)?;
            if let Some(r) = now
                .as_ref()
                .filter(|r| matches!(r.state, GroupState::Removed | GroupState::Left))
            {
                // Tell the DS this device has read up to its removal, so the
                // log need not be kept for it (best effort: the DS stops
                // keeping it after a while anyway).
                let _ = self
                    .request(&Request::FetchLog {
                        group: *id,
                        after: r.cursor,
                        limit: 1,
                    })
                    .await;
                break;
            }
            let cursor = now.map(|r| r.cursor).unwrap_or(0);
            if cursor == row.cursor {
                return Err(ClientError::Protocol(format!(
                    "the log of group {id} continues at {first}, but this device is at {cursor}: entries are missing"
                )));
            }
            if cursor >= head || n == 0 {
                if let Some(r) = db::groups::load(&self.db, id)? {
                    if r.pending_commit.is_some() && r.cursor >= head {
                        self.discard_abandoned_commit(id)?;
                    }
                }
                break;
            }
        }
        Ok(events)
    }

    /// The DS compacted entries this device had not read. A current member
    /// (a device restored from an old backup, say) rejoins; a departed one
    /// (removed, or left, while this device was away for longer than the
    /// DS keeps what it may read) marks the group and moves on.
    pub(super) async fn lost_to_compaction(
        &mut self,
        id: &GroupId,
        row: &GroupRow,
    ) -> Result<Vec<Event>> {
        match self.request(&Request::GroupState { group: *id }).await {
            Ok(_) => {
                return self
                    .rejoin(
                        id,
                        "the server no longer keeps messages this device had not read",
                    )
                    .await
            }
            Err(ClientError::Server(e))
                if matches!(e.code, ErrorCode::NotMember | ErrorCode::UnknownGroup) => {}
            Err(e) => return Err(e),
        }
        let members = vec![self.name().to_owned()];
        let text = Some(
            "this device was away when it was removed, longer than the server keeps messages; what was sent before the removal is lost to it".into(),
        );
        let (state, kind) = if row.state == GroupState::Leaving {
            let kind = EventKind::Left {
                members,
                epoch: None,
                text,
            };
            (GroupState::Left, kind)
        } else {
            let kind = EventKind::MemberRemoved {
                members,
                epoch: None,
                text,
            };
            (GroupState::Removed, kind)
        };
        db::groups::set_state(&self.db, id, state)?;
        warn!(group = %id, "no longer a member, and the server compacted what this device had not read");
        let mut e = Event::new(kind, &id.to_string(), "", row.cursor, now_ms());
        e.group_name = row.name.clone();
        db::history::record_note(&self.db, id, &e)?;
        Ok(vec![e])
    }

    /// Processes consecutive log entries of a group in one transaction.
    /// Entries at or below the cursor are skipped; processing stops at a gap.
    pub fn process_entries(&mut self, id: &GroupId, entries: &[LogEntry]) -> Result<Vec<Event>> {
        let me = self.identity.name.clone();
        let mut need = Vec::new();
        let tx = self.db.unchecked_transaction()?;
        let Some(mut row) = db::groups::load(&tx, id)? else {
            return Ok(Vec::new());
        };
        let provider = Provider::new(&self.crypto, &tx);
        // openmls stores the message secrets after every message; one
        // write per batch is enough inside one transaction.
        provider.storage().hold_message_secrets();
        let mut group = MlsGroup::load(provider.storage(), &mls_gid(id))
            .map_err(ClientError::mls)?
            .ok_or_else(|| ClientError::Mls(format!("no MLS state for group {id}")))?;
        // New events, recorded in the history below; and what is reported
        // (what others did: this user's own messages were reported when
        // sent).
        let mut events = Vec::new();
        let mut shown = Vec::new();
        let outbox = db::history::outbox_pending(&tx, id)?;
        for entry in entries {
            if entry.seq <= row.cursor {
                continue;
            }
            if entry.seq != row.cursor + 1 {
                break;
            }
            row.cursor = entry.seq;
            if !group.is_active() {
                break;
            }
            if db::history::is_own(&tx, id, entry.seq)? {
                continue;
            }
            if outbox && entry.kind == EntryKind::Application {
                let digest = blake3::hash(&entry.data);
                if let Some(event) = db::history::take_outbox(&tx, id, digest.as_bytes())? {
                    // Sent by another process of this home, which has not
                    // learnt its position yet.
                    db::history::mark_own(&tx, id, entry.seq)?;
                    if let Some(mut e) = event {
                        if let crate::event::EventKind::Renamed { name } = &e.kind {
                            row.name = name.clone();
                        }
                        e.seq = entry.seq;
                        e.timestamp_ms = entry.timestamp_ms;
                        e.group_name = row.name.clone();
                        db::history::record(&tx, id, &[e], Origin::Own)?;
                    }
                    continue;
                }
            }
            if entry.kind == EntryKind::Commit
                && row.pending_commit.as_deref() == Some(entry.data.as_ref())
            {
                // Our own commit, accepted while we were not listening.
                group
                    .merge_pending_commit(&provider)
                    .map_err(ClientError::mls)?;
                row.pending_commit = None;
                row.proposals_since_ms = None;
                continue;
            }
            let mut memory = Remember {
                conn: provider.storage_conn(),
                devices: &self.devices,
                fresh: &self.fresh_devices,
            };
            match follow::apply(&provider, &mut group, &mut row, id, &me, entry, &mut memory) {
                Ok(mut evs) => {
                    for e in &mut evs {
                        e.group_name = row.name.clone();
                    }
                    shown.extend(evs.iter().cloned());
                    events.extend(evs);
                }
                Err(ClientError::NeedDevices(user)) => {
                    // Stop before this entry until the user's device log
                    // is fetched (`sync_group` does, then comes back).
                    row.cursor = entry.seq - 1;
                    need.push(user);
                    break;
                }
                Err(e) => {
                    warn!(group = %id, seq = entry.seq, error = %e, "skipping a log entry that cannot be processed");
                }
            }
        }
        provider.storage().flush()?;
        if row.releave {
            db::settings::set(&tx, &format!("releave:{id}"), 1)?;
        }
        db::groups::save(&tx, id, &row)?;
        db::history::record(&tx, id, &events, Origin::Others)?;
        tx.commit()?;
        self.need_devices.extend(need);
        Ok(shown)
    }

    /// A group's result, with a failure that concerns only that group
    /// turned into an `error` event; a lost connection stays an error.
    pub(super) fn isolate(&self, id: &GroupId, r: Result<Vec<Event>>) -> Result<Vec<Event>> {
        match r {
            Err(e) if !e.is_connection() => Ok(vec![self.failure(id, &e)]),
            other => other,
        }
    }

    /// What the history holds that `sync` has not reported yet (the home's
    /// `shown_upto` mark), this user's own doing left out, in the order it
    /// was recorded; marks it reported. Also returns the newest row it
    /// covered.
    pub(super) fn unreported(&self) -> Result<(Vec<Event>, i64)> {
        let mark = db::settings::get(&self.db, "shown_upto")? as i64;
        self.recorded_after(mark, Origin::Others)
    }

    /// What the history holds after row `mark` (this process's own mark:
    /// `listen` keeps one, so that it shows everything however many other
    /// processes of the home report or sync meanwhile), its user's own
    /// doing included with [`Origin::Own`]; and the newest row covered.
    /// The home's `shown_upto` mark moves past it too, so `sync` does not
    /// report again what was shown.
    pub(super) fn recorded_after(&self, mark: i64, upto: Origin) -> Result<(Vec<Event>, i64)> {
        db::history::after(&self.db, mark, upto)
    }
}

/// What following a group remembers beyond the MLS state, in the
/// transaction that processes the entries, and the device logs it checks
/// new devices against.
struct Remember<'a> {
    conn: &'a Connection,
    devices: &'a HashMap<String, DeviceSet>,
    fresh: &'a HashSet<String>,
}

impl follow::Memory for Remember<'_> {
    fn keys_seen(&mut self, keys: &[(String, Vec<u8>)]) -> Result<Vec<String>> {
        db::users::remember_keys(self.conn, keys, now_ms())
    }

    fn media_announced(&mut self, id: &GroupId, info: &MediaInfo) -> Result<()> {
        db::media::remember(self.conn, id, info)
    }

    fn check_device(&mut self, principal: &str, key: &[u8]) -> Result<()> {
        let user = huddle_core::devices::user_part(principal);
        match self.devices.get(user) {
            Some(set) if super::devices::certifies(set, principal, key) => Ok(()),
            _ if self.fresh.contains(user) => Err(ClientError::DeviceRefused(principal.to_owned())),
            _ => Err(ClientError::NeedDevices(user.to_owned())),
        }
    }
}
