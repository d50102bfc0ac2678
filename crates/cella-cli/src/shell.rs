//! `cella shell ID`: an interactive terminal in a sandbox.
//!
//! The local terminal is put in raw mode so every keystroke (Ctrl-C included) goes to the
//! remote shell, and is restored on every way out: normal exit, error, or SIGTERM/SIGHUP to
//! the CLI. Output is copied as it arrives; input is sent in order by a separate task so a
//! slow send never holds up output; window size changes (SIGWINCH) resize the remote PTY.

use std::io::Read;
use std::os::fd::AsFd;

use anyhow::{Context, bail};
use cella_client::{Client, ExecEvent, ExecOptions};
use rustix::termios::{self, OptionalActions, Termios};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::output::write_error;
use crate::sandbox::{EXIT_INTERRUPTED, ServerOpts, Signals, access_token, exit_code_of};

/// `cella shell`.
#[derive(Debug, clap::Args)]
pub struct ShellArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox ID.
    id: String,
    /// User to log in as.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Working directory.
    #[arg(long, short = 'w')]
    cwd: Option<String>,
}

/// Puts stdin's terminal in raw mode until dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading terminal settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)
            .context("switching the terminal to raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing sensible is left to do if restoring fails; the shell's `reset` fixes it.
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, &self.saved);
    }
}

/// Terminal size of stdout (or stdin), `(cols, rows)`; 80×24 when unknown.
fn window_size() -> (u16, u16) {
    let from = |ws: rustix::termios::Winsize| {
        (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
    };
    termios::tcgetwinsize(std::io::stdout().as_fd())
        .ok()
        .and_then(from)
        .or_else(|| {
            termios::tcgetwinsize(std::io::stdin().as_fd())
                .ok()
                .and_then(from)
        })
        .unwrap_or((80, 24))
}

/// Reads stdin on a plain thread (a blocked terminal read can not be cancelled; the thread
/// simply dies with the process) and hands chunks over in order.
fn spawn_stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(64);
    let spawned = std::thread::Builder::new()
        .name("cella-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 4096];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    if spawned.is_err() {
        eprintln!("cella: warning: cannot read the keyboard; the shell is output-only");
    }
    rx
}

/// Sends keystrokes and resizes to the remote PTY until input ends or sending fails.
async fn forward_input(
    client: Client,
    id: String,
    token: String,
    pid: u32,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut input_open = true;
    loop {
        let resized = async {
            match winch.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            data = rx.recv(), if input_open => match data {
                Some(data) => {
                    if client.send_pty_input(&id, &token, pid, &data).await.is_err() {
                        return;
                    }
                }
                None => input_open = false,
            },
            Some(()) = resized => {
                let (cols, rows) = window_size();
                if client.resize_pty(&id, &token, pid, cols, rows).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// `cella shell`.
pub async fn run(args: ShellArgs) -> anyhow::Result<u8> {
    if !termios::isatty(std::io::stdin().as_fd()) {
        bail!("`cella shell` needs a terminal on stdin; use `cella exec` for scripts");
    }
    let client = args.server.client()?;
    let token = access_token(&client, &args.id).await?;
    let (cols, rows) = window_size();
    let opts = ExecOptions {
        user: args.user,
        cwd: args.cwd,
        ..Default::default()
    };
    let mut stream = client.pty(&args.id, &token, cols, rows, &opts).await?;
    let pid = stream.wait_started().await?;

    let mut signals = Signals::new();
    let raw = RawMode::enter()?;
    let input = tokio::spawn(forward_input(
        client.clone(),
        args.id.clone(),
        token.clone(),
        pid,
        spawn_stdin_reader(),
    ));
    let mut stdout = tokio::io::stdout();
    let outcome: anyhow::Result<u8> = loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(ExecEvent::Pty(b) | ExecEvent::Stdout(b) | ExecEvent::Stderr(b))) => {
                    if let Err(e) = async { stdout.write_all(&b).await?; stdout.flush().await }.await {
                        break Err(write_error(e, "writing to the terminal"));
                    }
                }
                Some(Ok(ExecEvent::Started { .. })) => {}
                Some(Ok(ExecEvent::Exited(st))) => break Ok(exit_code_of(&st)),
                Some(Err(e)) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("the connection to the sandbox ended")),
            },
            () = signals.recv() => {
                // Best effort: the remote shell would otherwise live until the sandbox ends.
                let _ = client.kill_process(&args.id, &token, pid).await;
                break Ok(EXIT_INTERRUPTED);
            }
        }
    };
    input.abort();
    drop(raw);
    outcome
}
