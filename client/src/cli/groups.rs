//! `huddle group …`: creating groups, changing who is in them, and
//! (with `cli/roles.rs`) who may do what in them.

use clap::Subcommand;
use huddle_client::{Client, ClientError, Home};

use crate::{roles, Out};

#[derive(Debug, Subcommand)]
pub(crate) enum GroupCommand {
    /// Create a group; prints its id.
    Create {
        /// Display name.
        name: String,
    },
    /// Add users (one commit for all).
    Add {
        /// Group id or name.
        group: String,
        /// Users to add.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove users (one commit); keys rotate.
    Remove {
        /// Group id or name.
        group: String,
        /// Users to remove.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Leave the group.
    Leave {
        /// Group id or name.
        group: String,
    },
    /// Rotate this device's keys in the group.
    Update {
        /// Group id or name.
        group: String,
    },
    /// Groups this device is in.
    List,
    /// Current members, with their roles.
    Members {
        /// Group id or name.
        group: String,
    },
    /// Give a member a role: owner, admin, member or reader.
    Role {
        /// Group id or name.
        group: String,
        /// The member.
        user: String,
        /// owner, admin, member or reader.
        role: String,
    },
    /// Show the group's policy, or change its settings (announcement,
    /// members_may_add, members_may_rename, max_members).
    Policy {
        /// Group id or name.
        group: String,
        /// A setting and its new value: `announcement=on`,
        /// `max_members=200`.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Make an invite link to the group (or, with --list, show the
    /// invites; with --revoke ID, revoke one).
    Invite {
        /// Group id or name.
        group: String,
        /// How many users it admits (0: any number).
        #[arg(long, default_value_t = 0)]
        uses: u32,
        /// How long it stays valid: 30m, 12h, 7d.
        #[arg(long, default_value = "7d")]
        expires: String,
        /// Joiners wait until an admin adds them.
        #[arg(long)]
        approval: bool,
        /// Show the invites in force.
        #[arg(long, conflicts_with_all = ["revoke", "approval"])]
        list: bool,
        /// Revoke the invite with this id (from --list).
        #[arg(long, value_name = "ID")]
        revoke: Option<String>,
    },
    /// Join a group with an invite link (or ask to, if it needs approval).
    Join {
        /// The invite (huddle://join/...).
        token: String,
    },
    /// Users waiting to be added with an invite that needs approval.
    Requests {
        /// Group id or name.
        group: String,
    },
    /// Add users who asked to join (as `group add`).
    Accept {
        /// Group id or name.
        group: String,
        /// Users to add.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Turn down a user's request to join.
    Decline {
        /// Group id or name.
        group: String,
        /// The user who asked.
        user: String,
    },
    /// Rename the group for every member.
    Rename {
        /// Group id or name.
        group: String,
        /// The new name.
        name: String,
    },
}

pub(crate) async fn group(home: Home, out: &Out, cmd: GroupCommand) -> Result<(), ClientError> {
    let mut client = Client::open(home)?;
    match cmd {
        GroupCommand::Create { name } => {
            let same = client.groups_named(&name)?;
            if !same.is_empty() {
                eprintln!(
                    "huddle: note: you are already in {} named {name:?} ({}); name this one by its id or its first digits",
                    if same.len() == 1 { "a group".to_owned() } else { format!("{} groups", same.len()) },
                    same.iter().map(huddle_client::client::short_id).collect::<Vec<_>>().join(", ")
                );
            }
            let id = client.create_group(&name).await?;
            if out.json {
                out.json(&serde_json::json!({"group": id.to_string(), "name": name}));
            } else {
                out.line(&format!("{id}"));
            }
        }
        GroupCommand::Add { group, users } => {
            for e in client.add(&group, &users).await? {
                out.event(&e);
            }
        }
        GroupCommand::Remove { group, users } => {
            for e in client.remove(&group, &users).await? {
                out.event(&e);
            }
        }
        GroupCommand::Leave { group } => {
            let id = client.resolve_group(&group)?.to_string();
            let left = client.leave(&id).await?;
            if out.json {
                let kind = if left { "left" } else { "leaving" };
                out.json(&serde_json::json!({"type": kind, "group": id}));
            } else if left {
                out.line(&format!("left {group} (you were its only member)"));
            } else {
                out.line(&format!(
                    "asked to leave {group}; a remaining member will commit it"
                ));
            }
        }
        GroupCommand::Update { group } => {
            let id = client.resolve_group(&group)?.to_string();
            client.update(&id).await?;
            let (epoch, _) = client.epoch_authenticator(&id)?;
            if out.json {
                out.json(&serde_json::json!({"type": "key_update", "group": id, "epoch": epoch}));
            } else {
                out.line(&format!("keys rotated; {group} is at epoch {epoch}"));
            }
        }
        GroupCommand::List => {
            for g in client.groups()? {
                if out.json {
                    out.json(&g);
                } else {
                    out.line(&format!(
                        "{}  {:<20} {:<8} epoch {:<4} {} member{}",
                        g.group,
                        huddle_client::event::clean(&g.name),
                        g.state,
                        g.epoch,
                        g.members,
                        if g.members == 1 { "" } else { "s" }
                    ));
                }
            }
        }
        GroupCommand::Members { group } => roles::members(&client, out, &group)?,
        GroupCommand::Role { group, user, role } => {
            roles::role(&mut client, out, &group, &user, &role).await?
        }
        GroupCommand::Policy { group, set } => {
            roles::policy(&mut client, out, &group, &set).await?
        }
        GroupCommand::Invite {
            group,
            uses,
            expires,
            approval,
            list,
            revoke,
        } => {
            let a = roles::InviteArgs {
                uses,
                expires,
                approval,
                list,
                revoke,
            };
            roles::invite(&mut client, out, &group, a).await?
        }
        GroupCommand::Join { token } => roles::join(&mut client, out, &token).await?,
        GroupCommand::Requests { group } => roles::requests(&mut client, out, &group).await?,
        GroupCommand::Accept { group, users } => {
            for e in client.accept_joins(&group, &users).await? {
                out.event(&e);
            }
        }
        GroupCommand::Decline { group, user } => {
            roles::decline(&mut client, out, &group, &user).await?
        }
        GroupCommand::Rename { group, name } => {
            roles::rename(&mut client, out, &group, &name).await?
        }
    }
    client.close().await;
    Ok(())
}
