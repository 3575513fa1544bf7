//! `link`: a user in G groups links a new device. With full clients (the
//! library the `huddle` command uses): the time from the approval on the
//! existing device until the new device is in every one of the user's
//! groups (each joined by an external commit), and the check that another
//! member of every group sees the new device.

use std::time::Instant;

use clap::Args;
use huddle_client::{Client, Home};

use crate::ds::Ds;
use crate::light::run_name;
use crate::report::{Output, Report};
use crate::Target;

/// Parameters.
#[derive(Debug, Args)]
pub struct Params {
    /// Groups the user is in (up to 200).
    #[arg(long, default_value_t = 20)]
    pub groups: usize,
    #[command(flatten)]
    pub target: Target,
}

/// Runs it.
pub async fn run(p: Params, out: &Output) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=200).contains(&p.groups),
        "groups must be between 1 and 200"
    );
    let ds = Ds::start(&p.target)?;
    let homes = tempfile::tempdir()?;
    let (user, other) = (run_name("owner"), run_name("friend"));
    let cert = ds.cert.clone();
    let mut owner = Client::register(
        Home::new(homes.path().join("owner")),
        &user,
        &ds.addr,
        Some(&cert),
    )
    .await?;
    let mut friend = Client::register(
        Home::new(homes.path().join("friend")),
        &other,
        &ds.addr,
        Some(&cert),
    )
    .await?;
    out.say(&format!("{} groups of two ...", p.groups));
    let mut groups = Vec::new();
    for i in 0..p.groups {
        let g = friend.create_group(&format!("g{i}")).await?.to_string();
        friend.add(&g, std::slice::from_ref(&user)).await?;
        groups.push(g);
    }
    owner.sync().await?;

    out.say("linking a new device ...");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let started = Instant::now();
    let linking = Client::link(
        Home::new(homes.path().join("new-device")),
        &user,
        &ds.addr,
        Some(&cert),
        |c| {
            if let Some(tx) = tx.take() {
                let _ = tx.send(c.code.clone());
            }
        },
    );
    let approving = async {
        let code = rx.await?;
        let (key, _) = owner.pending_device(&code).await?;
        owner.approve_device(&code, key).await?;
        anyhow::Ok(Instant::now())
    };
    let (linked, approved) = tokio::join!(linking, approving);
    let (device, joined) = linked?;
    let done = Instant::now();
    let approved = approved?;
    let joined_groups = joined.iter().filter(|e| e.kind == "joined").count();
    let in_groups = device
        .groups()?
        .iter()
        .filter(|g| g.state == "active")
        .count();
    // The friend sees the new device in every group.
    let seen = friend
        .sync()
        .await?
        .iter()
        .filter(|e| e.kind == "device_added")
        .count();
    device.close().await;

    let mut r = Report::new("link");
    r.set("groups", p.groups as u64)
        .set(
            "request_to_approved_ms",
            approved.duration_since(started).as_secs_f64() * 1e3,
        )
        .set(
            "approved_to_in_all_groups_ms",
            done.duration_since(approved).as_secs_f64() * 1e3,
        )
        .set("joined_groups", joined_groups as u64)
        .set("device_in_groups", in_groups as u64)
        .set("device_added_seen_by_member", seen as u64)
        .note("full clients; the new device polls for its approval every 500 ms, so up to 0.5 s of approved_to_in_all_groups_ms is that wait")
        .note("approved_to_in_all_groups_ms: from the approval on the existing device until `link` returned with the device in every group (an external commit each)");
    out.emit(&r);
    owner.close().await;
    friend.close().await;
    Ok(())
}
