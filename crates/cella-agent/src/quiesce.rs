//! `POST /fsfreeze` and `POST /fsthaw`: quiesce the root filesystem for a host-side disk copy.
//!
//! Why: a microVM's disk is a file on the host, but the guest kernel holds dirty pages (and, on
//! the journal-less ext4 images, metadata mid-update) that only the guest can put on the disk.
//! Before the VM driver copies the disk for a filesystem snapshot it asks the agent to freeze
//! `/` (`FIFREEZE`: sync, flush the virtual disk, block every new write), then stops the VM,
//! copies, and thaws. Free blocks are trimmed first, so that deleted files do not travel
//! with the snapshot. These are envd's host-only routes: the server's proxy refuses them from
//! outside, and they need the access token. Only a sandboxed agent (`--control-fd`) serves
//! them; a standalone agent on a host must never freeze the host's filesystem.
//!
//! A freeze the host never undoes (it died mid-snapshot) is undone by a watchdog after
//! [`WATCHDOG`]. Everything inside the guest that writes to `/` blocks while it is frozen.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::files::HttpError;
use crate::state::AgentRef;

/// `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;
/// `_IOWR('X', 121, struct fstrim_range)`.
const FITRIM: libc::c_ulong = 0xC018_5879;

/// `struct fstrim_range`.
#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// Discard the filesystem's free blocks, so the virtual disk drops what deleted files held
/// (QEMU turns a discard into a zero cluster) and a snapshot does not carry them. Best
/// effort: a disk without discard support just keeps them.
fn trim(root: &std::path::Path) {
    let r = std::fs::File::open(root).and_then(|dir| {
        let mut range = FstrimRange {
            start: 0,
            len: u64::MAX,
            minlen: 0,
        };
        // SAFETY: FITRIM reads and updates one fstrim_range; the fd is open.
        let r = unsafe { libc::ioctl(dir.as_raw_fd(), FITRIM, &mut range) };
        if r == 0 {
            Ok(range.len)
        } else {
            Err(std::io::Error::last_os_error())
        }
    });
    match r {
        Ok(bytes) => tracing::debug!(bytes, "trimmed the root filesystem"),
        Err(e) => tracing::debug!("not trimming the root filesystem: {e}"),
    }
}

/// How long a freeze may last before the agent thaws by itself.
const WATCHDOG: Duration = Duration::from_secs(120);

/// Bumped by every freeze and thaw: a watchdog only thaws the freeze it was armed for.
static GENERATION: AtomicU64 = AtomicU64::new(0);

fn ioctl_root(root: &std::path::Path, request: libc::c_ulong) -> std::io::Result<()> {
    let dir = std::fs::File::open(root)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE/FITHAW take an int argument (unused by the kernel); the fd is open.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), request, &mut arg) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn root_of(agent: &AgentRef) -> Result<PathBuf, HttpError> {
    agent
        .settings
        .system_root
        .clone()
        .ok_or_else(|| HttpError::new(StatusCode::NOT_FOUND, "filesystem freezing is off"))
}

fn blocking_failed(e: tokio::task::JoinError) -> HttpError {
    HttpError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("freeze task: {e}"),
    )
}

/// Trim, then freeze the root filesystem: every dirty page is on the disk when this answers 204.
/// Freezing a frozen filesystem answers 409.
pub async fn fsfreeze(State(agent): State<AgentRef>) -> Response {
    let root = match root_of(&agent) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let r = tokio::task::spawn_blocking(move || {
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        trim(&root);
        ioctl_root(&root, FIFREEZE).map(|()| root)
    })
    .await;
    match r {
        Ok(Ok(root)) => {
            let generation = GENERATION.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                tokio::time::sleep(WATCHDOG).await;
                if GENERATION.load(Ordering::SeqCst) == generation {
                    tracing::warn!("the host never thawed the filesystem; thawing");
                    let _ = tokio::task::spawn_blocking(move || ioctl_root(&root, FITHAW)).await;
                }
            });
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(Err(e)) if e.raw_os_error() == Some(libc::EBUSY) => {
            HttpError::new(StatusCode::CONFLICT, "the filesystem is already frozen").into_response()
        }
        Ok(Err(e)) => HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("freezing the root filesystem: {e}"),
        )
        .into_response(),
        Err(e) => blocking_failed(e).into_response(),
    }
}

/// Thaw the root filesystem; thawing one that is not frozen is a no-op (204 either way).
pub async fn fsthaw(State(agent): State<AgentRef>) -> Response {
    let root = match root_of(&agent) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    GENERATION.fetch_add(1, Ordering::SeqCst);
    match tokio::task::spawn_blocking(move || ioctl_root(&root, FITHAW)).await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        // EINVAL: not frozen.
        Ok(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(Err(e)) => HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("thawing the root filesystem: {e}"),
        )
        .into_response(),
        Err(e) => blocking_failed(e).into_response(),
    }
}
