//! Sending application messages and reading a group's history.

use huddle_core::proto::{ErrorCode, Request, Response};
use huddle_core::GroupId;

use crate::app::AppMessage;
use crate::db::history::Origin;
use crate::db::{self, Provider};
use crate::error::{ClientError, Result};
use crate::event::Event;
use crate::follow::app_event;

use super::{now_ms, serialize, Client, COMMIT_ATTEMPTS, MAX_TEXT};

impl Client {
    /// Sends a text message (at most [`MAX_TEXT`] bytes).
    pub async fn send_text(&mut self, group: &str, text: &str) -> Result<Event> {
        if text.trim().is_empty() {
            return Err(ClientError::Usage(
                "nothing to send: the message is empty".into(),
            ));
        }
        if text.len() > MAX_TEXT {
            return Err(ClientError::Usage(format!(
                "a text message is at most {} KiB; send longer text as a file (`huddle send-file`)",
                MAX_TEXT / 1024
            )));
        }
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.sending_group(&id)?;
        let (_, event) = self
            .send_app(
                &id,
                &AppMessage::Text {
                    text: text.to_owned(),
                },
            )
            .await?;
        event.ok_or_else(|| ClientError::Protocol("a text message shows as an event".into()))
    }

    /// Encrypts and posts an application message. Returns its sequence
    /// number and the event it shows as (recorded in the history).
    ///
    /// The message is put in the outbox, by its digest, in the transaction
    /// that advances the ratchet: whichever process of the home meets it
    /// first (this one, told its position by the DS, or a `listen` beside
    /// it, which receives it pushed) records it as this device's own.
    pub(crate) async fn send_app(
        &mut self,
        id: &GroupId,
        msg: &AppMessage,
    ) -> Result<(u64, Option<Event>)> {
        for _ in 0..COMMIT_ATTEMPTS {
            // Pending proposals block sending: commit them first.
            if self
                .load_group(&self.db, id)?
                .pending_proposals()
                .next()
                .is_some()
            {
                self.commit_pending_proposals(id).await?;
                self.active_group(id)?;
                continue;
            }
            let (data, digest) = {
                let tx = self.db.unchecked_transaction()?;
                let provider = Provider::new(&self.crypto, &tx);
                let mut g = self.load_group(&tx, id)?;
                // The sender's role must allow it (the DS and every member
                // check it too); the kind travels in the authenticated data.
                huddle_core::policy::check_message(
                    crate::follow::policy_of(&g)?.as_ref(),
                    self.name(),
                    msg.aad(),
                )?;
                g.set_aad(msg.aad().to_vec());
                let out = g
                    .create_message(&provider, &self.identity, &msg.encode())
                    .map_err(ClientError::mls)?;
                let b = serialize(&out)?;
                let digest = *blake3::hash(&b).as_bytes();
                let event = app_event(msg, id, self.name(), 0, now_ms());
                db::history::put_outbox(&tx, id, &digest, event.as_ref(), now_ms())?;
                // The ratchet advanced: persist it even if sending fails, so
                // no key is ever used twice.
                tx.commit()?;
                (b, digest)
            };
            let r = self
                .request(&Request::Message {
                    group: *id,
                    message: data,
                })
                .await;
            match r {
                Ok(Response::Appended { seq, .. }) => {
                    let tx = self.db.unchecked_transaction()?;
                    let mut event = app_event(msg, id, self.name(), seq, now_ms());
                    if let Some(e) = &mut event {
                        e.group_name = db::groups::load(&tx, id)?
                            .map(|r| r.name)
                            .unwrap_or_default();
                    }
                    // Unless another process of the home placed it already.
                    if db::history::take_outbox(&tx, id, &digest)?.is_some() {
                        db::history::mark_own(&tx, id, seq)?;
                        db::history::record(&tx, id, event.as_slice(), Origin::Own)?;
                    }
                    tx.commit()?;
                    return Ok((seq, event));
                }
                Ok(other) => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
                Err(ClientError::Server(e)) => {
                    // Refused: it is not in the log and never will be.
                    db::history::take_outbox(&self.db, id, &digest)?;
                    if e.code != ErrorCode::StaleEpoch {
                        return Err(ClientError::Server(e));
                    }
                    self.sync_group(id).await?;
                    self.active_group(id)?;
                }
                // Lost on the way, or not: the outbox entry settles it when
                // the log is read.
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Contended("the group kept changing".into()))
    }

    /// The local history of a group, oldest first (the last `limit`).
    pub fn messages(&self, group: &str, limit: usize) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        db::history::latest(&self.db, &id, limit)
    }

    /// The local history of a group before position `seq`, oldest first
    /// (the last `limit` of it): to scroll back.
    pub fn messages_before(&self, group: &str, seq: u64, limit: usize) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        db::history::before(&self.db, &id, seq, limit)
    }

    /// Messages (texts and media) of others in a group after `seq`.
    pub fn unread_after(&self, group: &str, seq: u64) -> Result<usize> {
        let id = self.resolve_group(group)?;
        db::history::unread_after(&self.db, &id, seq)
    }

    /// Where this home's reader of a group got to (`0`: nowhere yet).
    pub fn read_mark(&self, group: &str) -> Result<u64> {
        let id = self.resolve_group(group)?;
        db::settings::get(&self.db, &format!("read:{id}"))
    }

    /// Moves the read mark of a group forward to `seq` (never back).
    pub fn mark_read(&self, group: &str, seq: u64) -> Result<()> {
        let id = self.resolve_group(group)?;
        let key = format!("read:{id}");
        if db::settings::get(&self.db, &key)? < seq {
            db::settings::set(&self.db, &key, seq)?;
        }
        Ok(())
    }
}
