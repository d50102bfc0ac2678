//! Templates: root filesystems that sandboxes start from, how they are built, and the cache.
//!
//! A template is a small [`TemplateSpec`] (base distribution, apt and pip packages, commands,
//! default user, env, default limits) plus a root filesystem built from it. Building is slow
//! (debootstrap plus package downloads: minutes), starting a sandbox must be fast, so builds
//! are cached on disk under the spec's build ID and rebuilt only when the spec changes:
//!
//! ```text
//! <root>/                          e.g. /var/lib/cella/templates
//!   .cache/debootstrap/<key>/      debootstrap result (unshifted), keyed by suite + packages
//!   .cache/debs/                   downloaded .debs (debootstrap --cache-dir)
//!   <name>/.lock                   flock: one build of <name> at a time, across processes
//!   <name>/.tmp-<build_id>-<pid>/  a build in progress (never counts as ready)
//!   <name>/<build_id>/spec.json    the spec this build was made from
//!   <name>/<build_id>/build.json   when, how big, how long
//!   <name>/<build_id>/rootfs/      the tree, owned by host uid/gid 100000 + n
//! ```
//!
//! A build happens in a temporary directory that is renamed into place when complete, so a
//! half-finished build is never seen as ready, and a crashed one is cleaned up by the next.
//! The stored tree is the read-only lower layer of every sandbox's overlay, so it is shifted
//! to the sandbox ID range ([`crate::driver::SANDBOX_ID_BASE`]): root inside a sandbox is
//! never root on the host.

mod build;
pub mod fsutil;
pub mod mirror;
mod spec;
mod store;

pub use spec::{
    BUILDER_VERSION, StartCommand, TemplateFile, TemplateSpec, is_template_name, is_template_path,
};
pub use store::{HostPaths, TemplateStatus, TemplateStore};

/// What a build is doing; shown as `[template base] debootstrap: ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildPhase {
    /// Waiting for another process building the same template.
    Wait,
    /// Running debootstrap (or reusing its cached result).
    Debootstrap,
    /// Copying a cached or parent tree.
    Copy,
    /// Users, sudo, hosts, pip configuration.
    Configure,
    /// apt-get on top of a parent template.
    Apt,
    /// pip installs.
    Pip,
    /// The spec's `run` commands.
    Run,
    /// Removing caches and build-only files.
    Cleanup,
    /// Shifting ownership to the sandbox ID range.
    Shift,
    /// Done (the message has the summary).
    Done,
}

impl BuildPhase {
    /// Lower-case name (`debootstrap`).
    pub fn as_str(self) -> &'static str {
        match self {
            BuildPhase::Wait => "wait",
            BuildPhase::Debootstrap => "debootstrap",
            BuildPhase::Copy => "copy",
            BuildPhase::Configure => "configure",
            BuildPhase::Apt => "apt",
            BuildPhase::Pip => "pip",
            BuildPhase::Run => "run",
            BuildPhase::Cleanup => "cleanup",
            BuildPhase::Shift => "shift",
            BuildPhase::Done => "done",
        }
    }
}

impl std::fmt::Display for BuildPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One progress report of a build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BuildProgress {
    /// Template being built (a parent is built first, and reports under its own name).
    pub template: String,
    /// Phase.
    pub phase: BuildPhase,
    /// A line of tool output or a status text (at most [`MAX_PROGRESS_MESSAGE`] bytes).
    pub message: String,
    /// Steps done in this phase, when countable.
    pub done: Option<u64>,
    /// Steps in this phase, when known.
    pub total: Option<u64>,
}

/// Longest progress message passed on (tool output lines are cut there).
pub const MAX_PROGRESS_MESSAGE: usize = 512;

impl std::fmt::Display for BuildProgress {
    /// `[template base] debootstrap: retrieving 57/120 libc6`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[template {}] {}:", self.template, self.phase)?;
        match (self.done, self.total) {
            (Some(done), Some(total)) => write!(f, " {done}/{total}")?,
            (Some(done), None) => write!(f, " {done}")?,
            _ => {}
        }
        if !self.message.is_empty() {
            write!(f, " {}", self.message)?;
        }
        Ok(())
    }
}

/// Errors of template lookup and builds.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// No template has this name or alias.
    #[error("template {0:?} not found")]
    NotFound(String),
    /// The template exists but its current spec has not been built yet.
    #[error(
        "template {name:?} is not built yet (build {build_id}); run `cella template build {name}`"
    )]
    NotBuilt {
        /// Template name.
        name: String,
        /// Build ID of the current spec.
        build_id: String,
    },
    /// The spec is malformed.
    #[error("invalid template spec: {0}")]
    InvalidSpec(String),
    /// The parent template (`from`) is unknown.
    #[error("parent template {0:?} of a template is not a known template")]
    ParentNotFound(String),
    /// Building needs root (debootstrap, chroot, chown).
    #[error("building templates needs root")]
    RootRequired,
    /// No usable Debian mirror in the machine's apt configuration.
    #[error("no Debian mirror found: {0}")]
    NoMirror(String),
    /// A build tool failed.
    #[error("`{command}` failed ({status}); last output:\n{output}")]
    Command {
        /// The command (shortened).
        command: String,
        /// Exit status.
        status: String,
        /// Last lines of its output.
        output: String,
    },
    /// Another build step failed.
    #[error("template build failed: {0}")]
    Build(String),
    /// An OS call failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl TemplateError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> TemplateError {
        TemplateError::Io {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_renders_like_the_cli_shows_it() {
        let p = BuildProgress {
            template: "base".into(),
            phase: BuildPhase::Debootstrap,
            message: "retrieving libc6".into(),
            done: Some(57),
            total: Some(120),
        };
        assert_eq!(
            p.to_string(),
            "[template base] debootstrap: 57/120 retrieving libc6"
        );
        let p = BuildProgress {
            template: "base".into(),
            phase: BuildPhase::Done,
            message: String::new(),
            done: None,
            total: None,
        };
        assert_eq!(p.to_string(), "[template base] done:");
    }
}
