//! `huddle group role|policy|rename|members`: who may do what in a group,
//! from the command line.

use huddle_client::event::clean;
use huddle_client::{Client, ClientError, InviteJoin};
use huddle_core::policy::{Role, Settings};

use crate::Out;

/// `group role GROUP USER ROLE`.
pub(crate) async fn role(
    client: &mut Client,
    out: &Out,
    group: &str,
    user: &str,
    role: &str,
) -> Result<(), ClientError> {
    let role = Role::parse(role).ok_or_else(|| {
        ClientError::Usage(format!(
            "no role {role:?}; the roles are owner, admin, member and reader"
        ))
    })?;
    for e in client.set_role(group, user, role).await? {
        out.event(&e);
    }
    Ok(())
}

/// `group policy GROUP [--set NAME=VALUE]...`: changes the settings named,
/// then shows the policy.
pub(crate) async fn policy(
    client: &mut Client,
    out: &Out,
    group: &str,
    sets: &[String],
) -> Result<(), ClientError> {
    let mut pairs = Vec::new();
    for s in sets {
        let (name, value) = s.split_once('=').ok_or_else(|| {
            ClientError::Usage(format!(
                "--set takes NAME=VALUE (one of {}), not {s:?}",
                Settings::NAMES.join(", ")
            ))
        })?;
        pairs.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    if !pairs.is_empty() {
        for e in client.set_policy(group, &pairs).await? {
            out.event(&e);
        }
    }
    let id = client.resolve_group(group)?.to_string();
    let Some(p) = client.fresh_policy(&id).await? else {
        if out.json {
            out.json(&serde_json::json!({"group": id, "policy": null}));
        } else {
            out.line("this group was made before roles existed: every member may do everything");
        }
        return Ok(());
    };
    let roles: serde_json::Map<String, serde_json::Value> = p
        .roles()
        .map(|(u, r)| (u.to_owned(), r.name().into()))
        .collect();
    if out.json {
        let s = &p.settings;
        out.json(&serde_json::json!({
            "group": id,
            "roles": roles,
            "announcement": s.announcement,
            "members_may_add": s.members_may_add,
            "members_may_rename": s.members_may_rename,
            "max_members": s.max_members,
        }));
    } else {
        for line in p.settings.to_string().split(", ") {
            out.line(line);
        }
        for (u, r) in p.roles() {
            out.line(&format!("{}: {r}", clean(u)));
        }
    }
    Ok(())
}

/// `group rename GROUP NAME`.
pub(crate) async fn rename(
    client: &mut Client,
    out: &Out,
    group: &str,
    name: &str,
) -> Result<(), ClientError> {
    let e = client.rename(group, name).await?;
    out.event(&e);
    Ok(())
}

/// `group members GROUP`: each user with its role and, when it has more
/// than one, its number of devices.
pub(crate) fn members(client: &Client, out: &Out, group: &str) -> Result<(), ClientError> {
    let id = client.resolve_group(group)?.to_string();
    let members = client.member_roles(&id)?;
    if out.json {
        let (name, _, _) = client.group_state(&id)?;
        let names: Vec<&str> = members.iter().map(|(u, _, _)| u.as_str()).collect();
        let devices: serde_json::Map<String, serde_json::Value> = members
            .iter()
            .map(|(u, n, _)| (u.clone(), (*n).into()))
            .collect();
        let roles: serde_json::Map<String, serde_json::Value> = members
            .iter()
            .map(|(u, _, r)| (u.clone(), r.name().into()))
            .collect();
        out.json(&serde_json::json!({
            "group": id, "name": name, "members": names, "devices": devices, "roles": roles,
        }));
    } else {
        for (m, n, r) in members {
            let m = clean(&m);
            if n == 1 {
                out.line(&format!("{m} ({r})"));
            } else {
                out.line(&format!("{m} ({r}, {n} devices)"));
            }
        }
    }
    Ok(())
}

/// What `group invite` does besides making an invite.
pub(crate) struct InviteArgs {
    pub(crate) uses: u32,
    pub(crate) expires: String,
    pub(crate) approval: bool,
    pub(crate) list: bool,
    pub(crate) revoke: Option<String>,
}

/// `group invite GROUP [--uses N] [--expires DURATION] [--approval]`,
/// `--list`, `--revoke ID`.
pub(crate) async fn invite(
    client: &mut Client,
    out: &Out,
    group: &str,
    a: InviteArgs,
) -> Result<(), ClientError> {
    if let Some(id) = a.revoke {
        let n = client.revoke_invite(group, &id).await?;
        if out.json {
            out.json(&serde_json::json!({"revoked": n}));
        } else {
            out.line(&format!(
                "revoked {n} invite{}",
                if n == 1 { "" } else { "s" }
            ));
        }
        return Ok(());
    }
    if a.list {
        let id = client.resolve_group(group)?.to_string();
        let policy = client.fresh_policy(&id).await?;
        for i in policy.iter().flat_map(|p| p.invites()) {
            if out.json {
                out.json(&serde_json::json!({
                    "invite": i.id(), "by": i.by, "expires_ms": i.expires_ms,
                    "max_uses": i.max_uses, "approval": i.approval,
                }));
            } else {
                let uses = if i.max_uses == 0 {
                    "any number of uses".to_owned()
                } else {
                    format!("at most {} uses", i.max_uses)
                };
                out.line(&format!(
                    "{}  by {}, {uses}, until {}{}",
                    i.id(),
                    clean(&i.by),
                    huddle_client::event::local_time(i.expires_ms),
                    if i.approval { ", with approval" } else { "" }
                ));
            }
        }
        return Ok(());
    }
    let valid_for = parse_duration(&a.expires)?;
    let (token, i) = client
        .create_invite(group, a.uses, valid_for, a.approval)
        .await?;
    if out.json {
        out.json(&serde_json::json!({"invite": token, "id": i.id(), "expires_ms": i.expires_ms}));
    } else {
        out.line(&token);
        eprintln!(
            "huddle: invite {} made: whoever holds this link may join{}; revoke it with `huddle group invite {group} --revoke {}`",
            i.id(),
            if i.approval { " once an admin adds them" } else { "" },
            i.id()
        );
    }
    Ok(())
}

/// `group join TOKEN`.
pub(crate) async fn join(client: &mut Client, out: &Out, token: &str) -> Result<(), ClientError> {
    match client.join_invite(token).await? {
        InviteJoin::Joined(events) => {
            for e in events {
                out.event(&e);
            }
        }
        InviteJoin::Waiting(id) => {
            if out.json {
                out.json(&serde_json::json!({"type": "join_requested", "group": id.to_string()}));
            } else {
                out.line(&format!(
                    "asked to join group {}; an admin must add you: you join on your next `huddle sync` after that",
                    huddle_client::client::short_id(&id)
                ));
            }
        }
    }
    Ok(())
}

/// `group requests GROUP`: who waits to be added.
pub(crate) async fn requests(
    client: &mut Client,
    out: &Out,
    group: &str,
) -> Result<(), ClientError> {
    let waiting = client.join_requests(group).await?;
    print_requests(out, &waiting);
    Ok(())
}

/// `group decline GROUP USER`.
pub(crate) async fn decline(
    client: &mut Client,
    out: &Out,
    group: &str,
    user: &str,
) -> Result<(), ClientError> {
    let waiting = client.decline_join(group, user).await?;
    if !out.json {
        out.line(&format!("declined {}", clean(user)));
    }
    print_requests(out, &waiting);
    Ok(())
}

fn print_requests(out: &Out, waiting: &[(String, String, u64)]) {
    for (user, invite, at) in waiting {
        if out.json {
            out.json(&serde_json::json!({"user": user, "invite": invite, "at_ms": at}));
        } else {
            out.line(&format!(
                "{}  asked {} with invite {}",
                clean(user),
                huddle_client::event::local_time(*at),
                clean(invite)
            ));
        }
    }
}

/// Longest an invite may stay valid.
const MAX_INVITE_LIFE: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// `30s`, `15m`, `12h`, `7d` (a bare number: seconds).
fn parse_duration(s: &str) -> Result<std::time::Duration, ClientError> {
    let bad = || {
        ClientError::Usage(format!(
            "--expires takes a duration such as 30m, 12h or 7d, not {s:?}"
        ))
    };
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => n,
        'm' => n.saturating_mul(60),
        'h' => n.saturating_mul(3600),
        'd' => n.saturating_mul(86400),
        _ => return Err(bad()),
    };
    let d = std::time::Duration::from_secs(secs);
    if d.is_zero() || d > MAX_INVITE_LIFE {
        return Err(ClientError::Usage(
            "an invite stays valid for at least a second and at most 365 days".into(),
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("7d").unwrap().as_secs(), 7 * 86400);
        assert_eq!(parse_duration("12h").unwrap().as_secs(), 12 * 3600);
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert!(parse_duration("0d").is_err());
        assert!(parse_duration("400d").is_err());
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("").is_err());
    }
}
