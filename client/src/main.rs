//! `huddle`: the Huddle command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use huddle_client::{Client, ClientError, Event, Home, Progress};

/// End-to-end encrypted group messaging and media sharing.
#[derive(Debug, Parser)]
#[command(name = "huddle", version)]
struct Cli {
    /// Where this device keeps its state (one home per user or device).
    #[arg(long, env = "HUDDLE_HOME", default_value = "~/.huddle", global = true)]
    home: String,
    /// Print JSON Lines (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an identity, register NAME with the server and publish key packages.
    Register {
        /// User name to claim.
        name: String,
        /// Server address, HOST:PORT.
        #[arg(long)]
        server: String,
        /// PEM certificate to pin (default: pin what the server presents now).
        #[arg(long)]
        server_cert: Option<PathBuf>,
    },
    /// Show this device's name, device id and key fingerprint.
    Whoami,
    /// Connect to the server and show its address, certificate and key-package count.
    Status,
    /// Manage groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Send a text message.
    Send {
        /// Group id or name.
        group: String,
        /// The message.
        text: String,
    },
    /// Encrypt and upload a picture, video or any file; prints the media id.
    SendFile {
        /// Group id or name.
        group: String,
        /// The file.
        path: PathBuf,
        /// A caption.
        #[arg(long, default_value = "")]
        caption: String,
    },
    /// Fetch, verify and decrypt a media item (resumes if interrupted).
    Download {
        /// Media id (from `sync`, `listen` or `messages`).
        media_id: String,
        /// Where to write it (default: its file name here).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// Only plaintext bytes START-END (END exclusive), e.g. to play a video
        /// from the middle.
        #[arg(long, value_name = "START-END")]
        range: Option<String>,
    },
    /// Fetch and process everything pending, print what is new, exit.
    Sync,
    /// Stay connected and print events as they arrive, until interrupted.
    Listen,
    /// Show the local history of a group.
    Messages {
        /// Group id or name.
        group: String,
        /// Show at most this many (the newest).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
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
    /// Current members.
    Members {
        /// Group id or name.
        group: String,
    },
}

fn expand_home(s: &str) -> PathBuf {
    match s.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(rest),
        None => PathBuf::from(s),
    }
}

struct Out {
    json: bool,
}

impl Out {
    fn json(&self, v: &impl serde::Serialize) {
        println!("{}", serde_json::to_string(v).expect("output serialises"));
    }

    fn event(&self, e: &Event) {
        if self.json {
            self.json(e);
        } else {
            println!("{}", e.human());
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Two workers: QUIC's packet work runs beside the command's own work
    // (sealing, hashing, file I/O) instead of taking turns with it.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("huddle: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("huddle: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    let home = Home::new(expand_home(&cli.home));
    let out = Out { json: cli.json };
    match cli.command {
        Command::Register {
            name,
            server,
            server_cert,
        } => {
            let client = Client::register(home, &name, &server, server_cert.as_deref()).await?;
            let who = client.whoami();
            let cert = client.home().pinned_certs()?.unwrap_or_default();
            let server_fp = cert
                .first()
                .map(|c| huddle_core::auth::cert_fingerprint(c))
                .unwrap_or_default();
            if out.json {
                out.json(&serde_json::json!({
                    "registered": who.name,
                    "server": who.server,
                    "server_fingerprint": server_fp,
                    "fingerprint": who.fingerprint,
                }));
            } else {
                println!("registered {} at {}", who.name, who.server);
                println!("server certificate SHA-256 {server_fp} (pinned)");
                println!("your key fingerprint: {}", who.fingerprint);
            }
            client.close().await;
        }
        Command::Whoami => {
            let client = Client::open(home)?;
            let who = client.whoami();
            if out.json {
                out.json(&who);
            } else {
                println!("name: {}", who.name);
                println!("device: {}", who.device);
                println!("fingerprint: {}", who.fingerprint);
                println!("server: {}", who.server);
            }
        }
        Command::Status => {
            let mut client = Client::open(home)?;
            let st = client.status().await?;
            if out.json {
                out.json(&st);
            } else {
                println!("server: {}", st.server);
                println!("certificate SHA-256: {}", st.server_fingerprint);
                println!("authenticated as: {}", st.name);
                println!(
                    "key packages on server: {}{}",
                    st.key_packages,
                    if st.last_resort {
                        " (+ last resort)"
                    } else {
                        ""
                    }
                );
            }
            client.close().await;
        }
        Command::Group(g) => group(home, &out, g).await?,
        Command::Send { group, text } => {
            let mut client = Client::open(home)?;
            let e = client.send_text(&group, &text).await?;
            if out.json {
                out.json(&e);
            } else {
                println!("sent ({} bytes, position {})", text.len(), e.seq);
            }
            client.close().await;
        }
        Command::SendFile {
            group,
            path,
            caption,
        } => {
            let mut client = Client::open(home)?;
            let mut bar = Bar::new(out.json);
            let e = client.send_file(&group, &path, &caption, &mut bar).await?;
            if out.json {
                out.json(&e);
            } else {
                println!("{}", e.media_id.as_deref().unwrap_or_default());
            }
            client.close().await;
        }
        Command::Download {
            media_id,
            output,
            range,
        } => {
            let mut client = Client::open(home)?;
            if let Some(r) = range {
                let (a, b) = r
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                    .ok_or_else(|| {
                        ClientError::Usage(format!("--range {r:?}: expected START-END"))
                    })?;
                let bytes = client.read_range(&media_id, a, b).await?;
                let path = output.unwrap_or_else(|| PathBuf::from(format!("{media_id}.{a}-{b}")));
                std::fs::write(&path, &bytes)
                    .map_err(|e| ClientError::Io(format!("{}: {e}", path.display())))?;
                report_download(&out, &media_id, &path, bytes.len() as u64);
            } else {
                let mut bar = Bar::new(out.json);
                let path = client
                    .download(&media_id, output.as_deref(), &mut bar)
                    .await?;
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                report_download(&out, &media_id, &path, size);
            }
            client.close().await;
        }
        Command::Sync => {
            let mut client = Client::open(home)?;
            for e in client.sync().await? {
                out.event(&e);
            }
            client.close().await;
        }
        Command::Listen => {
            let mut client = Client::open(home)?;
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            client.listen(|e| out.event(e), stop).await?;
            client.close().await;
        }
        Command::Messages { group, limit } => {
            let client = Client::open(home)?;
            for e in client.messages(&group, limit)? {
                out.event(&e);
            }
        }
    }
    Ok(())
}

fn report_download(out: &Out, media: &str, path: &std::path::Path, size: u64) {
    if out.json {
        out.json(&serde_json::json!({"type": "downloaded", "media_id": media, "path": path, "size": size}));
    } else {
        println!("{} ({size} bytes)", path.display());
    }
}

/// A progress bar (bytes, rate, ETA) on a terminal; nothing otherwise.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    enabled: bool,
}

impl Bar {
    fn new(json: bool) -> Self {
        use std::io::IsTerminal as _;
        Self {
            bar: None,
            enabled: !json && std::io::stderr().is_terminal(),
        }
    }
}

impl Progress for Bar {
    fn start(&mut self, label: &str, total: u64, done: u64) {
        if !self.enabled {
            return;
        }
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(label.to_owned());
        bar.set_position(done);
        self.bar = Some(bar);
    }

    fn advance(&mut self, n: u64) -> bool {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        true
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

async fn group(home: Home, out: &Out, cmd: GroupCommand) -> Result<(), ClientError> {
    let mut client = Client::open(home)?;
    match cmd {
        GroupCommand::Create { name } => {
            let id = client.create_group(&name).await?;
            if out.json {
                out.json(&serde_json::json!({"group": id.to_string(), "name": name}));
            } else {
                println!("{id}");
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
            client.leave(&group).await?;
            if out.json {
                out.json(&serde_json::json!({"type": "leaving", "group": group}));
            } else {
                println!("asked to leave {group}; a remaining member will commit it");
            }
        }
        GroupCommand::Update { group } => {
            client.update(&group).await?;
            let (epoch, _) = client.epoch_authenticator(&group)?;
            if out.json {
                out.json(
                    &serde_json::json!({"type": "key_update", "group": group, "epoch": epoch}),
                );
            } else {
                println!("keys rotated; {group} is at epoch {epoch}");
            }
        }
        GroupCommand::List => {
            for g in client.groups()? {
                if out.json {
                    out.json(&g);
                } else {
                    println!(
                        "{}  {:<20} {:<8} epoch {:<4} {} members",
                        g.group, g.name, g.state, g.epoch, g.members
                    );
                }
            }
        }
        GroupCommand::Members { group } => {
            let members = client.members(&group)?;
            if out.json {
                out.json(&serde_json::json!({"group": group, "members": members}));
            } else {
                for m in members {
                    println!("{m}");
                }
            }
        }
    }
    client.close().await;
    Ok(())
}
