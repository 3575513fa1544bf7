//! `huddle`: the Huddle command line.
//!
//! Output goes through [`Out`]: a closed pipe (`huddle listen | head`)
//! ends the process quietly, as it ends other Unix tools, instead of a
//! panic. Ctrl-C during a transfer keeps its progress and says how to
//! resume.
#![forbid(unsafe_code)]

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use huddle_client::event::human_size;
use huddle_client::{Client, ClientError, Event, Home, Progress};

#[path = "cli/devices.rs"]
mod devices;
#[path = "cli/groups.rs"]
mod groups;
#[path = "cli/roles.rs"]
mod roles;
#[path = "cli/trust.rs"]
mod trust;

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
        /// Server address, HOST:PORT; several nodes of one service as
        /// A,B,C (tried in order; when one fails the client moves on).
        #[arg(long)]
        server: String,
        /// PEM certificate to pin (default: pin what the server presents now).
        #[arg(long)]
        server_cert: Option<PathBuf>,
    },
    /// Make this home a new device of NAME: prints a code to approve on
    /// one of NAME's devices (`huddle device approve CODE`), waits for the
    /// approval, then joins NAME's groups.
    Link {
        /// The user this device is to belong to.
        name: String,
        /// Server address, HOST:PORT (several nodes as A,B,C).
        #[arg(long)]
        server: String,
        /// PEM certificate to pin (default: pin what the server presents now).
        #[arg(long)]
        server_cert: Option<PathBuf>,
    },
    /// This user's devices: list, approve a new one, revoke one.
    #[command(subcommand)]
    Device(devices::DeviceCommand),
    /// Show this device's name, device id and key fingerprint.
    Whoami,
    /// Connect to the server and show its address, certificate and key-package count.
    Status,
    /// Manage groups.
    #[command(subcommand)]
    Group(groups::GroupCommand),
    /// Send a text message.
    Send {
        /// Group id or name.
        group: String,
        /// The message (`-` reads it from standard input).
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
        /// Where to write it (default: its file name here; `-`: standard output).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// Replace the file at the output path if there is one.
        #[arg(long)]
        force: bool,
        /// Only plaintext bytes START-END (END exclusive), e.g. to play a video
        /// from the middle.
        #[arg(long, value_name = "START-END")]
        range: Option<String>,
    },
    /// Fetch and process everything pending, print what is new, exit.
    Sync,
    /// Stay connected and print events as they arrive, until interrupted.
    Listen,
    /// The server's certificate.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Serve the app on 127.0.0.1 (a chat with pictures and videos) until
    /// interrupted; prints the URL, which carries its access token.
    Web {
        /// Port on 127.0.0.1 (default: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Open the URL in the default browser.
        #[arg(long)]
        open: bool,
    },
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
enum ServerCommand {
    /// Show the pinned and the presented certificate fingerprints, ask, and
    /// pin the presented one (after the server's certificate changed).
    Trust {
        /// Pin it without asking.
        #[arg(long)]
        yes: bool,
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

/// Standard output, one line at a time.
struct Out {
    json: bool,
}

/// Exit status after the reader of standard output went away: what the
/// shell reports for a process ended by SIGPIPE, as other tools end.
const EXIT_PIPE: u8 = 141;
/// Exit status after Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

impl Out {
    /// Writes one line. A closed pipe ends the process quietly.
    fn line(&self, s: &str) {
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{s}").and_then(|()| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(EXIT_PIPE.into());
            }
            eprintln!("huddle: writing the output: {e}");
            std::process::exit(1);
        }
    }

    fn json(&self, v: &impl serde::Serialize) {
        self.line(&serde_json::to_string(v).expect("output serialises"));
    }

    fn event(&self, e: &Event) {
        if self.json {
            self.json(e);
        } else {
            self.line(&e.human());
        }
    }
}

/// Raises glibc's trim threshold from 128 KiB to 8 MiB. At 128 KiB a
/// thread's heap gives memory back to the kernel as soon as that much lies
/// free at its top, and takes it again for the next datagrams: a 1 GiB
/// download took 20,000 to 67,000 page faults, each a fresh zeroed page.
/// glibc raises the threshold by itself to twice the size of the largest
/// mapped block freed so far (mallopt(3), M_MMAP_THRESHOLD); freeing one
/// 4 MiB block does that without unsafe code. The cost is at most 8 MiB
/// of freed memory kept per heap.
fn keep_freed_heap() {
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        drop(std::hint::black_box(Vec::<u8>::with_capacity(4 << 20)));
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // openmls logs at error level what a member meets in
                // normal use (a message of an epoch it has left); Huddle
                // says what matters itself.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openmls=off")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person's terminal, not in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    keep_freed_heap();
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
        // Like other tools whose reader went away: quietly.
        Err(ClientError::OutputClosed) => ExitCode::from(EXIT_PIPE),
        Err(e @ ClientError::Interrupted(_)) => {
            eprintln!("huddle: {e}");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(e) => {
            eprintln!("huddle: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `work` (a transfer) until it ends or Ctrl-C: then `bar` is cleared
/// and the error says how to go on.
async fn interruptible<T>(
    work: impl std::future::Future<Output = Result<T, ClientError>>,
    bar: &std::sync::Mutex<Option<indicatif::ProgressBar>>,
    how_to_resume: &str,
) -> Result<T, ClientError> {
    tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => {
            if let Some(b) = bar.lock().expect("bar lock").take() {
                b.abandon();
            }
            Err(ClientError::Interrupted(format!("interrupted; {how_to_resume}")))
        }
    }
}

/// A transfer that lost its connection (or stalled) keeps its progress:
/// the error says so.
fn resumable(e: ClientError) -> ClientError {
    match e {
        ClientError::Connect { addr, reason } => ClientError::Connect {
            addr,
            reason: format!(
                "{reason}; what was transferred is kept: run the same command again to resume"
            ),
        },
        other => other,
    }
}

/// The message: the argument, or standard input for `-`.
fn message_text(text: String) -> Result<String, ClientError> {
    if text != "-" {
        return Ok(text);
    }
    let limit = huddle_client::client::MAX_TEXT;
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ClientError::Io(format!("reading standard input: {e}")))?;
    if buf.len() > limit {
        return Err(ClientError::Usage(format!(
            "a text message is at most {} KiB; send longer text as a file (`huddle send-file`)",
            limit / 1024
        )));
    }
    let text = String::from_utf8(buf).map_err(|_| {
        ClientError::Usage("the message on standard input is not UTF-8 text".into())
    })?;
    // A trailing newline from `echo` is not part of the message.
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_owned())
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
                out.line(&format!("registered {} at {}", who.name, who.server));
                out.line(&format!("server certificate SHA-256 {server_fp} (pinned)"));
                out.line(&format!("your key fingerprint: {}", who.fingerprint));
            }
            client.close().await;
        }
        Command::Link {
            name,
            server,
            server_cert,
        } => devices::link(home, &out, &name, &server, server_cert.as_deref()).await?,
        Command::Device(d) => devices::device(home, &out, d).await?,
        Command::Whoami => {
            let client = Client::open(home)?;
            let who = client.whoami();
            if out.json {
                out.json(&who);
            } else {
                out.line(&format!("name: {}", who.name));
                out.line(&format!(
                    "device: {} (number {}, {})",
                    who.device, who.device_number, who.principal
                ));
                out.line(&format!("fingerprint: {}", who.fingerprint));
                out.line(&format!("server: {}", who.server));
            }
        }
        Command::Status => {
            let mut client = Client::open(home)?;
            let st = client.status().await?;
            if out.json {
                out.json(&st);
            } else {
                out.line(&format!("server: {}", st.server));
                if st.servers.len() > 1 {
                    out.line(&format!(
                        "servers of the service: {}",
                        st.servers.join(", ")
                    ));
                }
                out.line(&format!("certificate SHA-256: {}", st.server_fingerprint));
                out.line(&format!("authenticated as: {}", st.name));
                out.line(&format!(
                    "key packages on server: {}{}",
                    st.key_packages,
                    if st.last_resort {
                        " (+ last resort)"
                    } else {
                        ""
                    }
                ));
            }
            client.close().await;
        }
        Command::Group(g) => groups::group(home, &out, g).await?,
        Command::Send { group, text } => {
            let mut client = Client::open(home)?;
            let text = message_text(text)?;
            let e = client.send_text(&group, &text).await?;
            if out.json {
                out.json(&e);
            } else {
                out.line(&format!("sent ({} bytes, position {})", text.len(), e.seq));
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
            let shown = bar.shown.clone();
            let r = interruptible(
                client.send_file(&group, &path, &caption, &mut bar),
                &shown,
                "what was uploaded is kept: run the same command again to resume",
            )
            .await
            .map_err(resumable);
            client.close().await;
            let e = r?;
            if out.json {
                out.json(&e);
            } else {
                out.line(e.media_id().unwrap_or_default());
            }
        }
        Command::Download {
            media_id,
            output,
            force,
            range,
        } => {
            let mut client = Client::open(home)?;
            let r = download(&mut client, &out, &media_id, output, force, range).await;
            client.close().await;
            r?;
        }
        Command::Sync => {
            let mut client = Client::open(home)?;
            let events = client.sync().await?;
            for e in &events {
                out.event(e);
            }
            client.close().await;
            let failed = events.iter().filter(|e| e.kind == "error").count();
            if failed > 0 {
                return Err(ClientError::GroupsFailed(failed));
            }
        }
        Command::Listen => {
            let mut client = Client::open(home)?;
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            client.listen(|e| out.event(e), stop).await?;
            client.close().await;
        }
        Command::Web { port, open } => {
            let server = huddle_client::web::WebServer::start(
                home,
                huddle_client::web::Options {
                    port,
                    ..Default::default()
                },
            )
            .await?;
            if out.json {
                out.json(&serde_json::json!({ "url": server.url() }));
            } else {
                out.line(&format!("open {} (Ctrl-C stops)", server.url()));
            }
            if open {
                open_browser(server.url());
            }
            let _ = tokio::signal::ctrl_c().await;
            server.stop().await;
        }
        Command::Messages { group, limit } => {
            let client = Client::open(home)?;
            for e in client.messages(&group, limit)? {
                if out.json {
                    out.json(&e);
                } else {
                    out.line(&e.human_at());
                }
            }
        }
        Command::Server(ServerCommand::Trust { yes }) => {
            let mut client = Client::open(home)?;
            trust::server_trust(&mut client, &out, yes).await?;
        }
    }
    Ok(())
}

/// Asks the desktop to open `url` (the URL is not printed again on
/// failure: it is on the first line already).
fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    match std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(_) => {}
        Err(e) => tracing::warn!("could not open a browser ({opener}: {e}); open the URL above"),
    }
}

/// `huddle download`.
async fn download(
    client: &mut Client,
    out: &Out,
    media: &str,
    output: Option<PathBuf>,
    force: bool,
    range: Option<String>,
) -> Result<(), ClientError> {
    let to_stdout = output.as_deref() == Some(std::path::Path::new("-"));
    // The full id, for output and file names, whatever prefix was typed.
    let media_id = hex::encode(client.media_info(media)?.1.media_id);
    if let Some(r) = range {
        let (a, b) = r
            .split_once('-')
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
            .ok_or_else(|| ClientError::Usage(format!("--range {r:?}: expected START-END")))?;
        let bytes = client.read_range(&media_id, a, b).await?;
        if to_stdout {
            return write_stdout(&mut &bytes[..]);
        }
        let path = output.unwrap_or_else(|| PathBuf::from(format!("{media_id}.{a}-{b}")));
        huddle_client::client::media::check_target(&path, force)?;
        huddle_client::client::media::outside_home(&path, client.home().dir())?;
        std::fs::write(&path, &bytes)
            .map_err(|e| ClientError::Io(format!("{}: {e}", path.display())))?;
        report_download(out, &media_id, &path, bytes.len() as u64);
        return Ok(());
    }
    let mut bar = Bar::new(out.json);
    let shown = bar.shown.clone();
    if to_stdout {
        // Streamed: each chunk is verified, then written.
        return interruptible(
            client.download_to(&media_id, &mut Stdout, &mut bar),
            &shown,
            "the download to standard output stopped",
        )
        .await
        .map(|_| ());
    }
    let path = interruptible(
        client.download_file(&media_id, output.as_deref(), force, &mut bar),
        &shown,
        "what was downloaded and verified is kept: run the same command again to resume",
    )
    .await
    .map_err(resumable)?;
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    report_download(out, &media_id, &path, size);
    Ok(())
}

/// Copies `from` to standard output; a closed pipe ends quietly.
fn write_stdout(from: &mut dyn std::io::Read) -> Result<(), ClientError> {
    std::io::copy(from, &mut Stdout)
        .and_then(|_| Stdout.flush())
        .map(|_| ())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                ClientError::OutputClosed
            } else {
                ClientError::Io(format!("writing to standard output: {e}"))
            }
        })
}

/// Standard output for bytes. A closed pipe is an error the command
/// returns (after closing its connection, so the DS ends the transfer at
/// once), and the process then ends quietly.
struct Stdout;

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().lock().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}

fn report_download(out: &Out, media: &str, path: &std::path::Path, size: u64) {
    if out.json {
        out.json(&serde_json::json!({"type": "downloaded", "media_id": media, "path": path, "size": size}));
    } else {
        out.line(&format!("{} ({})", path.display(), human_size(size)));
    }
}

/// A progress bar (bytes, rate, ETA) on a terminal; nothing otherwise.
///
/// The rate and the time left count only the bytes moved by this run: a
/// resumed transfer that starts at 90 % is not credited with them.
struct Bar {
    /// The bar on screen, shared with the Ctrl-C handler that clears it.
    shown: std::sync::Arc<std::sync::Mutex<Option<indicatif::ProgressBar>>>,
    enabled: bool,
}

impl Bar {
    fn new(json: bool) -> Self {
        Self {
            shown: Default::default(),
            enabled: !json && std::io::stderr().is_terminal(),
        }
    }
}

/// Bytes per second moved since a run started at `start` (now at `pos`,
/// `secs` later).
fn rate(pos: u64, start: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        pos.saturating_sub(start) as f64 / secs
    }
}

impl Progress for Bar {
    fn start(&mut self, label: &str, total: u64, done: u64) {
        if !self.enabled {
            return;
        }
        let speed =
            move |s: &indicatif::ProgressState| rate(s.pos(), done, s.elapsed().as_secs_f64());
        let style = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {speed} ETA {left}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .with_key(
            "speed",
            move |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{}/s", human_size(speed(s) as u64));
            },
        )
        .with_key(
            "left",
            move |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let r = speed(s);
                let left = s.len().unwrap_or(0).saturating_sub(s.pos());
                if r >= 1.0 {
                    let secs = (left as f64 / r) as u64;
                    let _ = write!(w, "{}:{:02}", secs / 60, secs % 60);
                } else {
                    let _ = write!(w, "-");
                }
            },
        )
        .progress_chars("=> ");
        let bar = indicatif::ProgressBar::new(total)
            .with_position(done)
            .with_style(style)
            .with_message(label.to_owned());
        *self.shown.lock().expect("bar lock") = Some(bar);
    }

    fn advance(&mut self, n: u64) -> bool {
        if let Some(b) = self.shown.lock().expect("bar lock").as_ref() {
            b.inc(n);
        }
        true
    }

    fn finish(&mut self) {
        if let Some(b) = self.shown.lock().expect("bar lock").take() {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_transfer_is_not_credited_with_what_it_resumed_from() {
        // 900 MB were there before; 10 MB moved in 2 s: 5 MB/s, not 455.
        assert_eq!(rate(910_000_000, 900_000_000, 2.0), 5_000_000.0);
        assert_eq!(rate(10, 0, 0.0), 0.0);
    }
}
