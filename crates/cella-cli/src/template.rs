//! `cella template build|ls|gc`: build template root filesystems locally and inspect the cache.
//!
//! Builds run in this process (as root), not through the server: they need debootstrap and
//! chroot on this machine, and the server then finds the result in the same directory.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cella_core::template::{BuildPhase, BuildProgress, TemplateError, TemplateSpec, TemplateStore};

/// Largest spec file accepted by `--file`.
const MAX_SPEC_FILE: u64 = 1 << 20;

/// `cella template` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TemplateCmd {
    /// Build a template (as root) unless its current build exists.
    Build(BuildArgs),
    /// List templates, their build IDs and whether they are built.
    Ls(LsArgs),
    /// Remove builds that no template uses any more (do not run while sandboxes use them).
    Gc(DataDirArgs),
}

/// Where the templates are.
#[derive(Debug, clap::Args)]
pub struct DataDirArgs {
    /// State directory; templates live in <data-dir>/templates.
    #[arg(long, env = "CELLA_DATA_DIR", default_value = "/var/lib/cella")]
    pub data_dir: PathBuf,
    /// Template directory (default: <data-dir>/templates).
    #[arg(long, env = "CELLA_TEMPLATE_DIR")]
    pub template_dir: Option<PathBuf>,
}

impl DataDirArgs {
    fn store(&self) -> TemplateStore {
        TemplateStore::new(
            self.template_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("templates")),
        )
    }
}

/// `cella template build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Template name or alias (builtin, or a template built before from a spec file).
    #[arg(default_value = "base", conflicts_with = "file")]
    pub name: String,
    /// Build from a JSON spec file (a TemplateSpec) instead of a builtin.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Rebuild even if the current build exists.
    #[arg(long)]
    pub force: bool,
    /// Debian mirror for debootstrap (default: the one in this machine's apt configuration).
    #[arg(long)]
    pub mirror: Option<String>,
    #[command(flatten)]
    pub dirs: DataDirArgs,
}

/// `cella template ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dirs: DataDirArgs,
}

/// Run a template subcommand.
pub async fn run(cmd: TemplateCmd) -> anyhow::Result<()> {
    match cmd {
        TemplateCmd::Build(args) => tokio::task::spawn_blocking(move || build(&args))
            .await
            .context("template build task")?,
        TemplateCmd::Ls(args) => match ls(&args) {
            // `cella template ls | head`: the reader went away, nothing to report.
            Err(e) if is_broken_pipe(&e) => Ok(()),
            other => other,
        },
        TemplateCmd::Gc(args) => {
            let store = args.store();
            let removed = tokio::task::spawn_blocking(move || store.gc())
                .await
                .context("template gc task")?
                .context("removing old template builds")?;
            println!("removed {removed} old build(s)");
            Ok(())
        }
    }
}

fn build(args: &BuildArgs) -> anyhow::Result<()> {
    let store = args.dirs.store().with_mirror(args.mirror.clone());
    let spec = match &args.file {
        Some(file) => read_spec_file(file)?,
        None => store.spec(&args.name).ok_or_else(|| {
            let known: Vec<String> = TemplateSpec::builtins()
                .into_iter()
                .map(|s| s.name)
                .collect();
            anyhow::anyhow!(
                "unknown template {:?} (builtin: {}; or pass --file SPEC.json)",
                args.name,
                known.join(", ")
            )
        })?,
    };
    let mut display = ProgressDisplay::new(std::io::stderr().is_terminal());
    let result = store.build(&spec, &mut |p| display.show(p), args.force);
    display.finish();
    match result {
        Ok(image) => {
            println!("{}", image.rootfs.display());
            Ok(())
        }
        // The tool's output was streamed above already; keep the error to one line.
        Err(TemplateError::Command {
            command, status, ..
        }) => bail!(
            "building template {}: `{command}` failed ({status}); its output is above",
            spec.name
        ),
        Err(e) => Err(e).with_context(|| format!("building template {}", spec.name)),
    }
}

fn read_spec_file(path: &Path) -> anyhow::Result<TemplateSpec> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_SPEC_FILE)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    let spec: TemplateSpec = serde_json::from_str(&text)
        .with_context(|| format!("parsing template spec {}", path.display()))?;
    spec.validate()
        .with_context(|| format!("checking template spec {}", path.display()))?;
    Ok(spec)
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
}

fn ls(args: &LsArgs) -> anyhow::Result<()> {
    let list = args.dirs.store().list();
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &list).context("writing JSON")?;
        writeln!(out)?;
        return Ok(());
    }
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|t| {
            [
                t.spec.name.clone(),
                if t.spec.aliases.is_empty() {
                    "-".to_owned()
                } else {
                    t.spec.aliases.join(",")
                },
                t.build_id.clone(),
                if t.ready { "ready" } else { "not built" }.to_owned(),
                t.size_bytes
                    .map_or_else(|| "-".to_owned(), |b| format!("{} MiB", b / (1024 * 1024))),
                t.spec
                    .from
                    .clone()
                    .unwrap_or_else(|| t.spec.distribution.clone()),
            ]
        })
        .collect();
    let header = ["NAME", "ALIASES", "BUILD ID", "STATUS", "SIZE", "FROM"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(&header.map(str::to_owned)))?;
    for row in &rows {
        writeln!(out, "{}", line(row))?;
    }
    Ok(())
}

/// Renders build progress on stderr: on a terminal, one status line per phase that is
/// rewritten in place; otherwise (logs, CI) every report as its own line.
struct ProgressDisplay {
    tty: bool,
    /// Phase and template of the line currently shown (tty mode).
    current: Option<(String, BuildPhase)>,
}

/// Width status lines are cut to on a terminal, so a rewrite never wraps.
const TTY_WIDTH: usize = 100;

impl ProgressDisplay {
    fn new(tty: bool) -> ProgressDisplay {
        ProgressDisplay { tty, current: None }
    }

    fn show(&mut self, p: &BuildProgress) {
        let mut err = std::io::stderr().lock();
        let text = p.to_string();
        if !self.tty {
            let _ = writeln!(err, "{text}");
            return;
        }
        let key = (p.template.clone(), p.phase);
        if self.current.as_ref().is_some_and(|c| c != &key) {
            let _ = writeln!(err);
        }
        self.current = Some(key);
        let shown: String = text.chars().take(TTY_WIDTH).collect();
        let _ = write!(err, "\r\x1b[2K{shown}");
        let _ = err.flush();
    }

    fn finish(&mut self) {
        if self.tty && self.current.take().is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}
