//! `cella cp`: copy one file between this machine and a sandbox, in either direction.
//!
//! Files stream in both directions (no whole-file buffering). A download is written to a
//! temporary name next to the target and renamed at the end, so an interrupted copy never
//! leaves a truncated file under the real name. Directories are refused for now.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;

use crate::args::{CpEndpoint, parse_cp_endpoint};
use crate::sandbox::{ServerOpts, access_token};

/// `cella cp`.
#[derive(Debug, clap::Args)]
pub struct CpArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// User whose permissions (and home, for relative paths) apply inside the sandbox.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Source: a local path or `ID:/path`.
    src: String,
    /// Destination: a local path or `ID:/path`.
    dst: String,
}

/// The last component of a `/`-separated path (`""` for `/` or an empty path).
fn base_name(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// Where an upload of `local` to `remote` lands: a remote path ending in `/` is a directory.
pub fn upload_target(local: &Path, remote: &str) -> anyhow::Result<String> {
    if !remote.ends_with('/') {
        return Ok(remote.to_owned());
    }
    let name = local
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("cannot name the copy of {}", local.display()))?;
    Ok(format!("{remote}{name}"))
}

/// Where a download of `remote` to `local` lands: into `local` if it is a directory.
pub fn download_target(remote: &str, local: &Path, local_is_dir: bool) -> anyhow::Result<PathBuf> {
    if !local_is_dir {
        return Ok(local.to_owned());
    }
    let name = base_name(remote);
    if name.is_empty() || name == "." || name == ".." {
        bail!("cannot name the copy of `{remote}`: give a file name as the destination");
    }
    Ok(local.join(name))
}

/// `cella cp`.
pub async fn run(args: CpArgs) -> anyhow::Result<u8> {
    let src = parse_cp_endpoint(&args.src);
    let dst = parse_cp_endpoint(&args.dst);
    match (src, dst) {
        (CpEndpoint::Local(local), CpEndpoint::Sandbox { id, path }) => {
            upload(
                &args.server,
                args.user.as_deref(),
                Path::new(&local),
                &id,
                &path,
            )
            .await
        }
        (CpEndpoint::Sandbox { id, path }, CpEndpoint::Local(local)) => {
            download(
                &args.server,
                args.user.as_deref(),
                &id,
                &path,
                Path::new(&local),
            )
            .await
        }
        (CpEndpoint::Local(_), CpEndpoint::Local(_)) => {
            bail!("one side of cp must be a sandbox path (ID:/path)")
        }
        (CpEndpoint::Sandbox { .. }, CpEndpoint::Sandbox { .. }) => {
            bail!("copying between two sandbox paths is not supported; copy through this machine")
        }
    }
}

async fn upload(
    server: &ServerOpts,
    user: Option<&str>,
    local: &Path,
    id: &str,
    remote: &str,
) -> anyhow::Result<u8> {
    let meta = tokio::fs::metadata(local)
        .await
        .with_context(|| format!("cannot read {}", local.display()))?;
    if meta.is_dir() {
        bail!(
            "{} is a directory; copying directories is not supported yet",
            local.display()
        );
    }
    let target = upload_target(local, remote)?;
    let client = server.client()?;
    let token = access_token(&client, id).await?;
    client
        .upload_file(id, &token, &target, user, local)
        .await
        .with_context(|| format!("uploading to {id}:{target}"))?;
    Ok(0)
}

async fn download(
    server: &ServerOpts,
    user: Option<&str>,
    id: &str,
    remote: &str,
    local: &Path,
) -> anyhow::Result<u8> {
    if remote.ends_with('/') {
        bail!("{id}:{remote} is a directory; copying directories is not supported yet");
    }
    let local_is_dir = tokio::fs::metadata(local).await.is_ok_and(|m| m.is_dir());
    let target = download_target(remote, local, local_is_dir)?;
    let client = server.client()?;
    let token = access_token(&client, id).await?;
    let mut dl = client
        .download_stream(id, &token, remote, user)
        .await
        .with_context(|| format!("downloading {id}:{remote}"))?;

    let partial = partial_name(&target);
    let result = async {
        let mut file = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("cannot create {}", partial.display()))?;
        while let Some(chunk) = dl.chunk().await.context("downloading")? {
            file.write_all(&chunk)
                .await
                .with_context(|| format!("writing {}", partial.display()))?;
        }
        file.flush().await?;
        file.sync_all().await?;
        tokio::fs::rename(&partial, &target)
            .await
            .with_context(|| format!("cannot move the download to {}", target.display()))
    }
    .await;
    if result.is_err() {
        // The partial file is useless; the real error is what matters.
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result?;
    Ok(0)
}

fn partial_name(target: &Path) -> PathBuf {
    let mut name = target
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".cella-partial");
    target.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_into_remote_directory_keeps_the_name() {
        assert_eq!(
            upload_target(Path::new("/tmp/a.txt"), "/home/user/b.txt").expect("t"),
            "/home/user/b.txt"
        );
        assert_eq!(
            upload_target(Path::new("/tmp/a.txt"), "/home/user/").expect("t"),
            "/home/user/a.txt"
        );
        assert!(upload_target(Path::new("/"), "/x/").is_err());
    }

    #[test]
    fn download_into_local_directory_keeps_the_name() {
        assert_eq!(
            download_target("/etc/hostname", Path::new("out"), false).expect("t"),
            PathBuf::from("out")
        );
        assert_eq!(
            download_target("/etc/hostname", Path::new("/tmp"), true).expect("t"),
            PathBuf::from("/tmp/hostname")
        );
        assert!(download_target("/", Path::new("/tmp"), true).is_err());
        assert!(download_target("..", Path::new("/tmp"), true).is_err());
    }

    #[test]
    fn partial_names() {
        assert_eq!(
            partial_name(Path::new("/tmp/x")),
            PathBuf::from("/tmp/x.cella-partial")
        );
        assert_eq!(
            partial_name(Path::new("x")),
            PathBuf::from("x.cella-partial")
        );
    }
}
