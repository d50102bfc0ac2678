//! `cella keys`: manage API keys directly in the server's database.
//!
//! Keys are edited on the local SQLite file rather than through the REST API so that the
//! first key can be made before any key exists (there would be nobody to authenticate), and so
//! that an operator with access to the machine can always revoke a leaked key. SQLite's WAL
//! mode lets this run while `cella serve` has the file open; the server sees changes at once.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cella_core::store::{DB_FILE_NAME, NewAudit, Store};

use crate::output::{print_json, print_table, sanitize, short_time};

/// `cella keys` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCmd {
    /// Create a key and print it (it is shown only this once).
    Create {
        #[command(flatten)]
        data: DataDir,
        /// Name to recognise the key by.
        #[arg(long, default_value = "default")]
        name: String,
        /// Print JSON (id, name, mask, createdAt, key).
        #[arg(long)]
        json: bool,
    },
    /// List active keys (never the secrets).
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        data: DataDir,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its ID (see `cella keys list`).
    Revoke {
        #[command(flatten)]
        data: DataDir,
        /// Key ID (`k...`).
        id: String,
    },
}

/// Where the server keeps its state.
#[derive(Debug, Clone, clap::Args)]
pub struct DataDir {
    /// Data directory of the server (holds cella.db).
    #[arg(long, env = "CELLA_DATA_DIR", default_value = "/var/lib/cella")]
    pub data_dir: PathBuf,
}

fn open(dir: &Path, create: bool) -> anyhow::Result<Store> {
    if !dir.is_dir() {
        if !create {
            bail!(
                "data directory {} does not exist (pass --data-dir, or create a key first)",
                dir.display()
            );
        }
        create_private_dir(dir)?;
    }
    let path = dir.join(DB_FILE_NAME);
    Store::open(&path).with_context(|| format!("opening {}", path.display()))
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))
}

/// Runs a `keys` subcommand.
pub fn run(cmd: KeysCmd) -> anyhow::Result<u8> {
    match cmd {
        KeysCmd::Create { data, name, json } => {
            let store = open(&data.data_dir, true)?;
            let created = store.create_key(&name)?;
            store.audit(NewAudit::new(
                "cli",
                None,
                "key.create",
                serde_json::json!({ "keyID": created.info.id, "name": created.info.name }),
            ));
            store.flush_audit();
            if json {
                print_json(&created)?;
            } else {
                println!("{}", created.key);
                eprintln!(
                    "cella: created key {} ({}); it is shown only this once",
                    created.info.id,
                    sanitize(&created.info.name)
                );
            }
            Ok(0)
        }
        KeysCmd::List { data, json } => {
            let store = open(&data.data_dir, false)?;
            let keys = store.list_keys()?;
            if json {
                print_json(&keys)?;
            } else {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            sanitize(&k.name),
                            k.mask.clone(),
                            short_time(&k.created_at),
                        ]
                    })
                    .collect();
                print_table(&["ID", "NAME", "KEY", "CREATED (UTC)"], &rows)?;
            }
            Ok(0)
        }
        KeysCmd::Revoke { data, id } => {
            let store = open(&data.data_dir, false)?;
            if !store.revoke_key(&id)? {
                bail!("no active key with ID `{}`", sanitize(&id));
            }
            store.audit(NewAudit::new(
                "cli",
                None,
                "key.revoke",
                serde_json::json!({ "keyID": id }),
            ));
            store.flush_audit();
            let left = store.active_key_count()?;
            eprintln!("cella: revoked {id}; {left} active key(s) left");
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_list_revoke_on_a_data_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        assert!(
            open(&dir, false).is_err(),
            "list must not create the directory"
        );
        let data = DataDir {
            data_dir: dir.clone(),
        };
        run(KeysCmd::Create {
            data: data.clone(),
            name: "ci".into(),
            json: true,
        })
        .expect("create");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let store = open(&dir, false).expect("open");
        let keys = store.list_keys().expect("list");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].name, "ci");
        run(KeysCmd::Revoke {
            data: data.clone(),
            id: keys[0].id.clone(),
        })
        .expect("revoke");
        assert_eq!(store.active_key_count().expect("count"), 0);
        assert!(
            run(KeysCmd::Revoke {
                data,
                id: keys[0].id.clone()
            })
            .is_err()
        );
        let audit = store
            .query_audit(&cella_core::store::AuditQuery::default())
            .expect("audit");
        let kinds: Vec<_> = audit.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["key.create", "key.revoke"]);
    }
}
