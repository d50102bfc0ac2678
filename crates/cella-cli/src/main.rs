//! `cella`: run the server, and drive sandboxes, keys and the audit log from a shell.
//!
//! Error contract for scripts: a failure prints exactly one line, `cella: <message>`, on
//! stderr and exits with 1; usage errors are clap's (exit 2); `run`/`exec`/`shell` exit with
//! the remote command's code (128 + signal if it was killed, 130 if interrupted here).

mod args;
mod cp;
mod keys;
mod output;
mod py;
mod sandbox;
mod serve;
mod shell;
mod snapshot;
mod template;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Self-hosted sandboxes for AI agents, speaking E2B's API.
#[derive(Debug, Parser)]
#[command(name = "cella", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(serve::ServeArgs),
    /// Build and list templates.
    Template {
        #[command(subcommand)]
        cmd: template::TemplateCmd,
    },
    /// Run a command in a fresh sandbox, stream its output, then destroy the sandbox.
    Run(sandbox::RunArgs),
    /// Create a sandbox and print its ID.
    Create(sandbox::CreateArgs),
    /// Run a command in an existing sandbox.
    Exec(sandbox::ExecArgs),
    /// Open an interactive shell in a sandbox.
    Shell(shell::ShellArgs),
    /// List sandboxes (running and paused).
    Ls(sandbox::LsArgs),
    /// Show one sandbox.
    Info(sandbox::InfoArgs),
    /// Destroy sandboxes.
    Kill(sandbox::KillArgs),
    /// Set a sandbox's remaining lifetime.
    Timeout(sandbox::TimeoutArgs),
    /// Pause a sandbox (its processes are frozen, its memory kept).
    Pause(sandbox::PauseArgs),
    /// Resume a paused sandbox.
    Resume(sandbox::ResumeArgs),
    /// Show or replace a sandbox's egress rules.
    Network(sandbox::NetworkArgs),
    /// Snapshot sandboxes' files; list and delete snapshots.
    Snapshot {
        #[command(subcommand)]
        cmd: snapshot::SnapshotCmd,
    },
    /// Start copies of a sandbox from one snapshot of its files.
    Fork(snapshot::ForkArgs),
    /// Run Python in a code-interpreter sandbox; image results are written to files.
    Py(py::PyArgs),
    /// Copy a file between this machine and a sandbox (ID:/path on one side).
    Cp(cp::CpArgs),
    /// Show the audit log.
    Audit(sandbox::AuditArgs),
    /// Show the audit log of one sandbox.
    Logs(sandbox::LogsArgs),
    /// Manage API keys (edits the local database directly).
    Keys {
        #[command(subcommand)]
        cmd: keys::KeysCmd,
    },
}

/// An error as one line: the message and its causes, joined by `: `, with control characters
/// (from server or sandbox text) neutralised.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = output::sanitize(cause.to_string().trim());
        // Wrapped errors often repeat their source's text; print it once.
        if !text.is_empty() && !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// A panic in a client command is a bug, but the user still gets one line, not a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("cella: internal error: {}{at}", output::sanitize(&msg));
        std::process::exit(1);
    }));
}

async fn dispatch(cmd: Command) -> anyhow::Result<u8> {
    match cmd {
        Command::Serve(args) => serve::run(args).await.map(|()| 0),
        Command::Template { cmd } => template::run(cmd).await.map(|()| 0),
        Command::Run(args) => sandbox::run(args).await,
        Command::Create(args) => sandbox::create(args).await,
        Command::Exec(args) => sandbox::exec(args).await,
        Command::Shell(args) => shell::run(args).await,
        Command::Ls(args) => sandbox::ls(args).await,
        Command::Info(args) => sandbox::info(args).await,
        Command::Kill(args) => sandbox::kill(args).await,
        Command::Timeout(args) => sandbox::timeout(args).await,
        Command::Pause(args) => sandbox::pause(args).await,
        Command::Resume(args) => sandbox::resume(args).await,
        Command::Network(args) => sandbox::network(args).await,
        Command::Snapshot { cmd } => snapshot::run(cmd).await,
        Command::Fork(args) => snapshot::fork(args).await,
        Command::Py(args) => py::run(args).await,
        Command::Cp(args) => cp::run(args).await,
        Command::Audit(args) => sandbox::audit(args).await,
        Command::Logs(args) => sandbox::logs(args).await,
        Command::Keys { cmd } => keys::run(cmd),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server and template builds keep their own panic handling (a panicking request
    // task must not take the whole server down).
    if !matches!(cli.cmd, Command::Serve(_) | Command::Template { .. }) {
        install_panic_hook();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cella: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(dispatch(cli.cmd));
    // Do not wait for blocked stdin reads (shell) or lingering tasks.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) if e.chain().any(|c| c.is::<output::StdoutClosed>()) => ExitCode::from(141),
        Err(e) => {
            eprintln!("cella: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cella").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_its_options() {
        let cli = parse(&[
            "run", "-t", "py", "--env", "A=1", "-e", "B=x=y", "--", "ls", "-la",
        ])
        .expect("parse");
        let Command::Run(args) = cli.cmd else {
            panic!("not run")
        };
        let dbg = format!("{args:?}");
        assert!(dbg.contains(r#"template: "py""#), "{dbg}");
        assert!(
            dbg.contains(r#"("A", "1")"#) && dbg.contains(r#"("B", "x=y")"#),
            "{dbg}"
        );
        assert!(dbg.contains(r#"cmd: ["ls", "-la"]"#), "{dbg}");

        // Without `--`, everything from the first positional on is the command.
        let cli = parse(&["run", "python3", "-c", "print(1)"]).expect("parse");
        let Command::Run(args) = cli.cmd else {
            panic!("not run")
        };
        assert!(format!("{args:?}").contains(r#"cmd: ["python3", "-c", "print(1)"]"#));
    }

    #[test]
    fn usage_errors_are_reported() {
        assert!(parse(&["run"]).is_err(), "command required");
        assert!(parse(&["run", "--env", "NOEQUALS", "--", "true"]).is_err());
        assert!(parse(&["create", "--metadata", "=v"]).is_err());
        assert!(parse(&["kill"]).is_err(), "ids required");
        assert!(parse(&["timeout", "iabc", "soon"]).is_err());
        assert!(parse(&["cp", "onlyone"]).is_err());
        assert!(parse(&["pause"]).is_err(), "id required");
        assert!(parse(&["resume", "iabc", "--timeout", "soon"]).is_err());
        assert!(parse(&["network", "iabc", "--clear", "--allow-out", "1.1.1.1"]).is_err());
        assert!(parse(&["network", "iabc", "--clear", "--no-internet"]).is_err());
    }

    #[test]
    fn egress_flags_are_collected() {
        let cli = parse(&[
            "network",
            "iabc",
            "--allow-out",
            "1.1.1.1",
            "--allow-out",
            "*.pypi.org",
            "--deny-out",
            "10.0.0.0/8",
            "--no-internet",
        ])
        .expect("parse");
        let Command::Network(args) = cli.cmd else {
            panic!("not network")
        };
        let dbg = format!("{args:?}");
        assert!(
            dbg.contains(r#"allow_out: ["1.1.1.1", "*.pypi.org"]"#),
            "{dbg}"
        );
        assert!(dbg.contains(r#"deny_out: ["10.0.0.0/8"]"#), "{dbg}");
        assert!(
            dbg.contains("no_internet: true") && dbg.contains("clear: false"),
            "{dbg}"
        );

        let cli = parse(&[
            "create",
            "--deny-out",
            "0.0.0.0/0",
            "--allow-out",
            "8.8.8.8",
        ])
        .expect("parse");
        let Command::Create(args) = cli.cmd else {
            panic!("not create")
        };
        let dbg = format!("{args:?}");
        assert!(
            dbg.contains(r#"allow_out: ["8.8.8.8"]"#) && dbg.contains(r#"deny_out: ["0.0.0.0/0"]"#),
            "{dbg}"
        );
        assert!(dbg.contains("no_internet: false"), "{dbg}");
    }

    #[test]
    fn other_commands_parse() {
        for args in [
            &["exec", "iabc", "--user", "root", "--", "id", "-u"][..],
            &["shell", "iabc"],
            &["ls", "--json"],
            &["info", "iabc", "--json"],
            &["kill", "ia", "ib"],
            &["timeout", "iabc", "60"],
            &["pause", "iabc"],
            &["resume", "iabc"],
            &["resume", "iabc", "--timeout", "600"],
            &["network", "iabc"],
            &["network", "iabc", "--clear"],
            &["network", "iabc", "--no-internet", "--allow-out", "1.1.1.1"],
            &["create", "--no-internet", "--allow-out", "pypi.org"],
            &["cp", "./f", "iabc:/tmp/f"],
            &["audit", "--sandbox", "iabc", "--since", "10m", "--json"],
            &["logs", "iabc"],
            &["keys", "create", "--name", "ci", "--data-dir", "/tmp/x"],
            &["keys", "list", "--json"],
            &["keys", "revoke", "k0123456789"],
            &[
                "create",
                "--url",
                "http://h:1",
                "--api-key",
                "e2b_00",
                "-m",
                "a=b",
            ],
        ] {
            parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }

    #[test]
    fn errors_print_as_one_line() {
        let e = anyhow::anyhow!("inner\nsecond line").context("outer");
        assert_eq!(one_line(&e), "outer: inner?second line");
        let e = anyhow::anyhow!("same").context("same");
        assert_eq!(one_line(&e), "same");
    }
}
