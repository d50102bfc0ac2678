//! `cella snapshot …` and `cella fork`: filesystem snapshots of sandboxes (what E2B's
//! `create_snapshot` and `fork` do), through the server's REST API.

use crate::sandbox::ServerOpts;

/// `cella snapshot` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a sandbox's files and print the snapshot ID (start sandboxes from it with
    /// `cella create --template <ID>`).
    Create(CreateArgs),
    /// List snapshots, newest first.
    Ls(LsArgs),
    /// Delete a snapshot (sandboxes started from it keep running).
    Rm(RmArgs),
}

/// `cella snapshot create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox ID.
    id: String,
    /// Name (a later snapshot with the same name takes it over).
    #[arg(long)]
    name: Option<String>,
}

/// `cella snapshot ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Only snapshots of this sandbox.
    #[arg(long)]
    sandbox: Option<String>,
}

/// `cella snapshot rm`.
#[derive(Debug, clap::Args)]
pub struct RmArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Snapshot IDs (`name:default` or `<id>:default`).
    #[arg(required = true)]
    ids: Vec<String>,
}

/// `cella fork`.
#[derive(Debug, clap::Args)]
pub struct ForkArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Sandbox ID.
    id: String,
    /// How many forks (1-20).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Lifetime of each fork in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// Run a `cella snapshot` subcommand.
pub async fn run(cmd: SnapshotCmd) -> anyhow::Result<u8> {
    match cmd {
        SnapshotCmd::Create(a) => {
            let info = a
                .server
                .client()?
                .create_snapshot(&a.id, a.name.as_deref())
                .await?;
            println!("{}", info.snapshot_id);
            Ok(0)
        }
        SnapshotCmd::Ls(a) => {
            for s in a
                .server
                .client()?
                .list_snapshots(a.sandbox.as_deref())
                .await?
            {
                println!("{}", s.snapshot_id);
            }
            Ok(0)
        }
        SnapshotCmd::Rm(a) => {
            let client = a.server.client()?;
            let mut missing = 0u8;
            for id in &a.ids {
                if client.delete_snapshot(id).await? {
                    println!("{id}");
                } else {
                    eprintln!("cella: snapshot {id} not found");
                    missing = 1;
                }
            }
            Ok(missing)
        }
    }
}

/// `cella fork`: prints one line per fork, the new sandbox's ID or `error: <why>`; exits 1
/// when any fork failed.
pub async fn fork(a: ForkArgs) -> anyhow::Result<u8> {
    let results = a
        .server
        .client()?
        .fork_sandbox(&a.id, Some(a.count), Some(a.timeout))
        .await?;
    let mut failed = 0u8;
    for r in results {
        match (r.sandbox, r.error) {
            (Some(s), _) => println!("{}", s.sandbox_id),
            (None, Some(e)) => {
                println!("error: {}", crate::output::sanitize(&e.message));
                failed = 1;
            }
            (None, None) => {
                println!("error: the server gave no result for this fork");
                failed = 1;
            }
        }
    }
    Ok(failed)
}
