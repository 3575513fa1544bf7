//! `huddle link` and `huddle device …`: a user's devices from the command
//! line.

use std::io::IsTerminal as _;
use std::path::Path;

use clap::Subcommand;
use huddle_client::{Client, ClientError, Home};

use crate::Out;

#[derive(Debug, Subcommand)]
pub(crate) enum DeviceCommand {
    /// List this user's devices with their key fingerprints and when each
    /// was last seen by the server.
    List,
    /// Approve the device that shows CODE: compare the fingerprint shown
    /// here with the one the new device shows.
    Approve {
        /// The code the new device shows (1234-5678).
        code: String,
        /// Approve without asking (the fingerprint is still printed).
        #[arg(long)]
        yes: bool,
    },
    /// Revoke device ID (its number in `device list`): the server no longer
    /// lets it in, and it is removed from every group.
    Remove {
        /// The device's number.
        id: u32,
    },
}

/// `huddle link NAME --server …`: prints the code (first, with `--json`),
/// waits for the approval, reports the groups joined.
pub(crate) async fn link(
    home: Home,
    out: &Out,
    name: &str,
    server: &str,
    server_cert: Option<&Path>,
) -> Result<(), ClientError> {
    let json = out.json;
    let (client, events) =
        Client::link(home, name, server, server_cert, |c| {
            if json {
                out.json(&serde_json::json!({"code": c.code, "fingerprint": c.fingerprint}));
            } else {
                out.line(&format!("link code: {}", c.code));
                out.line(&format!("this device's key fingerprint: {}", c.fingerprint));
                out.line(&format!(
                    "on one of {name}'s devices run `huddle device approve {}` and compare the fingerprint; waiting…",
                    c.code
                ));
            }
        })
        .await?;
    for e in &events {
        out.event(e);
    }
    if out.json {
        out.json(&serde_json::json!({
            "linked": client.name(),
            "device": client.device(),
            "groups": events.iter().filter(|e| e.kind == "joined").count(),
        }));
    } else {
        out.line(&format!(
            "linked as {}'s device {} ({})",
            client.name(),
            client.device(),
            client.principal()
        ));
    }
    client.close().await;
    Ok(())
}

/// `huddle device …`.
pub(crate) async fn device(home: Home, out: &Out, cmd: DeviceCommand) -> Result<(), ClientError> {
    let mut client = Client::open(home)?;
    match cmd {
        DeviceCommand::List => {
            for d in client.device_list().await? {
                if out.json {
                    out.json(&d);
                } else {
                    let seen = d
                        .last_seen
                        .map(huddle_client::event::local_time)
                        .unwrap_or_else(|| "never".into());
                    out.line(&format!(
                        "{:<3} {:<20} {}  last seen {seen}{}",
                        d.device,
                        d.principal,
                        d.fingerprint,
                        if d.this_device { "  (this device)" } else { "" }
                    ));
                }
            }
        }
        DeviceCommand::Approve { code, yes } => {
            let (key, fingerprint) = client.pending_device(&code).await?;
            if !out.json {
                out.line(&format!(
                    "the device waiting with {code} has the key fingerprint"
                ));
                out.line(&format!("    {fingerprint}"));
            }
            let ask = !yes && !out.json && std::io::stdin().is_terminal();
            if ask {
                eprint!("Is this the fingerprint the new device shows? Approve it? [y/N] ");
                let mut answer = String::new();
                std::io::stdin()
                    .read_line(&mut answer)
                    .map_err(|e| ClientError::Io(format!("reading the answer: {e}")))?;
                if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
                    return Err(ClientError::Usage("the device was not approved".into()));
                }
            }
            let n = client.approve_device(&code, key).await?;
            if out.json {
                out.json(&serde_json::json!({"approved": n, "fingerprint": fingerprint}));
            } else {
                out.line(&format!("approved: device {n} of {}", client.name()));
            }
        }
        DeviceCommand::Remove { id } => {
            for e in client.remove_device(id).await? {
                out.event(&e);
            }
            if out.json {
                out.json(&serde_json::json!({"removed": id}));
            } else {
                out.line(&format!("device {id} of {} is revoked", client.name()));
            }
        }
    }
    client.close().await;
    Ok(())
}
