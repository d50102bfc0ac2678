//! The server's durable state in one SQLite file: API keys, sandbox records and the audit log.
//!
//! Why SQLite: a self-hosted single binary should not need a database server, and the CLI
//! (`cella keys ...`) must be able to edit keys while `cella serve` runs. WAL mode gives both:
//! readers never block the writer, and two processes can share the file.
//!
//! What is stored and why:
//! * **API keys** are stored only as SHA-256 hex. The secret is shown once at creation and can
//!   not be recovered from the file. `authenticate` is the hot path of every request: one
//!   lookup on a unique index.
//! * **Sandbox records** are the history of every sandbox, and after a crash of the server the
//!   rows without `finished_at_ms` tell it what was left running and must be reaped.
//! * **The audit log** is append-only, enforced by the database itself (triggers abort any
//!   `UPDATE` or `DELETE`), so a bug in the server can not rewrite history. Appends are queued
//!   to a writer thread that batches them into one transaction, so auditing an event never
//!   makes a request wait for the disk.
//!
//! The schema version lives in `PRAGMA user_version`; [`Store::open`] migrates older files
//! forward and refuses files written by a newer cella.

mod audit;
mod keys;
mod time;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

pub use self::audit::{AuditQuery, DEFAULT_AUDIT_LIMIT, MAX_AUDIT_LIMIT, NewAudit};
pub use self::keys::{KEY_PREFIX, is_valid_key_format, mask_key};
pub use self::time::{format_rfc3339_ms, now_ms, parse_rfc3339_ms};

/// File name of the database inside the data directory.
pub const DB_FILE_NAME: &str = "cella.db";

/// Schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 2;

/// How long a statement waits for another process holding the write lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("cannot open database {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer cella with a schema this build does not know.
    #[error("database schema version {found} is newer than this cella supports ({supported})")]
    SchemaTooNew {
        /// Version found in the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// A query failed.
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    /// A key given to [`Store::import_key`] is not `e2b_` followed by lowercase hex.
    #[error("invalid API key format: expected `e2b_` followed by 8 to 128 lowercase hex digits")]
    InvalidKeyFormat,
    /// A key name is empty or too long.
    #[error("invalid key name: must be 1 to {max} characters without control characters")]
    InvalidKeyName {
        /// Longest allowed name.
        max: usize,
    },
    /// [`Store::finish_sandbox`] named a sandbox that was never recorded.
    #[error("unknown sandbox `{0}`")]
    UnknownSandbox(String),
    /// A stored JSON column could not be encoded or decoded.
    #[error("bad JSON in the database")]
    Json(#[from] serde_json::Error),
    /// The system random generator failed.
    #[error("cannot generate random bytes")]
    Random(#[source] rand::Error),
}

/// A sandbox as recorded in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    /// Sandbox ID.
    pub id: String,
    /// ID of the API key that created it (its owner).
    pub key_id: String,
    /// Template name.
    pub template: String,
    /// Isolation wire name (`jail`, `microvm-kvm`, ...).
    pub isolation: String,
    /// Creation time, Unix ms.
    pub started_at_ms: i64,
    /// Scheduled end (timeout) at creation, Unix ms.
    pub end_at_ms: i64,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// vCPUs.
    pub cpu_count: u32,
    /// Memory limit in MiB.
    pub memory_mb: u64,
    /// Writable disk in MiB.
    pub disk_mb: u64,
}

/// Handle to the database. Cheap to clone; all clones share one connection and one audit
/// writer thread. Methods block on SQLite and are meant for short queries (call them from
/// `spawn_blocking` if a query may be large, e.g. a big audit export).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

struct Inner {
    conn: Arc<Mutex<Connection>>,
    audit: audit::AuditWriter,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.audit.shutdown();
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it to the current schema.
    /// The parent directory must exist.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = open_conn(path)?;
        migrate(&conn)?;
        let writer_conn = open_conn(path)?;
        Self::assemble(conn, audit::WriterConn::Own(Box::new(writer_conn)))
    }

    /// A private database in memory, for tests. The audit writer shares the one connection.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        migrate(&conn)?;
        let conn = Arc::new(Mutex::new(conn));
        let audit = audit::AuditWriter::start(audit::WriterConn::Shared(Arc::clone(&conn)));
        Ok(Store {
            inner: Arc::new(Inner { conn, audit }),
        })
    }

    fn assemble(conn: Connection, writer: audit::WriterConn) -> Result<Store, StoreError> {
        let audit = audit::AuditWriter::start(writer);
        Ok(Store {
            inner: Arc::new(Inner {
                conn: Arc::new(Mutex::new(conn)),
                audit,
            }),
        })
    }

    /// The shared connection. A panic while it was held does not corrupt it (an open
    /// transaction rolls back when dropped), so a poisoned lock is simply taken over.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        lock(&self.inner.conn)
    }

    /// Records a new sandbox (not finished).
    pub fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let metadata = serde_json::to_string(&rec.metadata)?;
        self.conn()
            .prepare_cached(
                "INSERT INTO sandboxes (id, key_id, template, isolation, started_at_ms, end_at_ms,
                    metadata, cpu_count, memory_mb, disk_mb)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                rec.id,
                rec.key_id,
                rec.template,
                rec.isolation,
                rec.started_at_ms,
                rec.end_at_ms,
                metadata,
                rec.cpu_count,
                clamp_u64(rec.memory_mb),
                clamp_u64(rec.disk_mb),
            ])?;
        Ok(())
    }

    /// Records a sandbox that starts again under its ID (resumed from disk): its row, if it has
    /// one for the same key, is reopened; otherwise one is inserted.
    pub fn reopen_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let changed = self
            .conn()
            .prepare_cached(
                "UPDATE sandboxes SET end_at_ms = ?3, isolation = ?4, finished_at_ms = NULL,
                    finish_reason = NULL
                 WHERE id = ?1 AND key_id = ?2",
            )?
            .execute(params![rec.id, rec.key_id, rec.end_at_ms, rec.isolation])?;
        if changed == 0 {
            self.insert_sandbox(rec)?;
        }
        Ok(())
    }

    /// Updates the scheduled end of a sandbox (after `timeout`/`connect`). Unknown or finished
    /// sandboxes are left alone.
    pub fn set_sandbox_end(&self, id: &str, end_at_ms: i64) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "UPDATE sandboxes SET end_at_ms = ?2 WHERE id = ?1 AND finished_at_ms IS NULL",
            )?
            .execute(params![id, end_at_ms])?;
        Ok(())
    }

    /// Marks a sandbox finished now with `reason` (`killed`, `timeout`, `crashed`, ...). The
    /// first finish wins: finishing an already finished sandbox keeps the original reason.
    pub fn finish_sandbox(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        let changed = conn
            .prepare_cached(
                "UPDATE sandboxes SET finished_at_ms = ?2, finish_reason = ?3
                 WHERE id = ?1 AND finished_at_ms IS NULL",
            )?
            .execute(params![id, now_ms(), reason])?;
        if changed == 0 {
            let exists = conn
                .prepare_cached("SELECT 1 FROM sandboxes WHERE id = ?1")?
                .query_row(params![id], |_| Ok(()))
                .optional()?
                .is_some();
            if !exists {
                return Err(StoreError::UnknownSandbox(id.to_owned()));
            }
        }
        Ok(())
    }

    /// Sandboxes recorded as started but never finished, oldest first: after a crash of the
    /// server these are the ones whose remains must be reaped.
    pub fn unfinished_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, key_id, template, isolation, started_at_ms, end_at_ms, metadata,
                    cpu_count, memory_mb, disk_mb
             FROM sandboxes WHERE finished_at_ms IS NULL ORDER BY started_at_ms, id",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((
                SandboxRecord {
                    id: row.get(0)?,
                    key_id: row.get(1)?,
                    template: row.get(2)?,
                    isolation: row.get(3)?,
                    started_at_ms: row.get(4)?,
                    end_at_ms: row.get(5)?,
                    metadata: BTreeMap::new(),
                    cpu_count: row.get(7)?,
                    memory_mb: u64::try_from(row.get::<_, i64>(8)?).unwrap_or(0),
                    disk_mb: u64::try_from(row.get::<_, i64>(9)?).unwrap_or(0),
                },
                row.get::<_, String>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut rec, metadata) = row?;
            rec.metadata = serde_json::from_str(&metadata)?;
            out.push(rec);
        }
        Ok(out)
    }
}

fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// SQLite integers are signed; sizes beyond `i64::MAX` are stored as `i64::MAX`.
fn clamp_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    // WAL: readers do not block the writer and the CLI can edit keys while the server runs.
    // synchronous=NORMAL is durable against process crashes; a power cut may lose the last
    // commits but never corrupts the file.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(open_err)?;
    Ok(conn)
}

/// Schema, one entry per version: entry `i` moves a file from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: initial schema.
    "CREATE TABLE api_keys (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        key_hash      TEXT NOT NULL UNIQUE,
        mask          TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        revoked_at_ms INTEGER
     );
     CREATE TABLE sandboxes (
        id             TEXT PRIMARY KEY,
        key_id         TEXT NOT NULL,
        template       TEXT NOT NULL,
        isolation      TEXT NOT NULL,
        started_at_ms  INTEGER NOT NULL,
        end_at_ms      INTEGER NOT NULL,
        metadata       TEXT NOT NULL,
        cpu_count      INTEGER NOT NULL,
        memory_mb      INTEGER NOT NULL,
        disk_mb        INTEGER NOT NULL,
        finished_at_ms INTEGER,
        finish_reason  TEXT
     );
     CREATE INDEX sandboxes_unfinished ON sandboxes (started_at_ms) WHERE finished_at_ms IS NULL;
     CREATE TABLE audit (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms      INTEGER NOT NULL,
        actor      TEXT NOT NULL,
        sandbox_id TEXT,
        kind       TEXT NOT NULL,
        detail     TEXT NOT NULL
     );
     CREATE INDEX audit_by_sandbox ON audit (sandbox_id, id);
     CREATE INDEX audit_by_actor ON audit (actor, id);
     CREATE INDEX audit_by_time ON audit (ts_ms);
     CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
     CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;",
    // 1 -> 2: per-key audit visibility looks sandboxes up by owner.
    "CREATE INDEX sandboxes_by_key ON sandboxes (key_id);",
];

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let supported = SCHEMA_VERSION;
    debug_assert_eq!(usize::try_from(supported).ok(), Some(MIGRATIONS.len()));
    // IMMEDIATE: two processes opening a fresh file at once must not both run migration 0.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > supported {
            return Err(StoreError::SchemaTooNew { found, supported });
        }
        for (version, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(found).unwrap_or(0))
        {
            conn.execute_batch(sql)?;
            conn.pragma_update(
                None,
                "user_version",
                i64::try_from(version).unwrap_or(0) + 1,
            )?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(e) => {
            // The original error matters more than a failed rollback.
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            key_id: "k0123456789".into(),
            template: "base".into(),
            isolation: "jail".into(),
            started_at_ms: 1_000,
            end_at_ms: 301_000,
            metadata: BTreeMap::from([("team".into(), "a".into())]),
            cpu_count: 2,
            memory_mb: 512,
            disk_mb: 1024,
        }
    }

    #[test]
    fn sandbox_records_track_unfinished() {
        let store = Store::open_in_memory().expect("open");
        store.insert_sandbox(&record("ia")).expect("insert a");
        let mut b = record("ib");
        b.started_at_ms = 2_000;
        store.insert_sandbox(&b).expect("insert b");
        let open = store.unfinished_sandboxes().expect("list");
        assert_eq!(open, vec![record("ia"), b.clone()]);

        store.finish_sandbox("ia", "killed").expect("finish");
        store
            .finish_sandbox("ia", "timeout")
            .expect("finish twice is fine");
        assert_eq!(store.unfinished_sandboxes().expect("list"), vec![b]);
        let reason: String = store
            .conn()
            .query_row(
                "SELECT finish_reason FROM sandboxes WHERE id='ia'",
                [],
                |r| r.get(0),
            )
            .expect("reason");
        assert_eq!(reason, "killed");

        assert!(matches!(
            store.finish_sandbox("nope", "killed"),
            Err(StoreError::UnknownSandbox(id)) if id == "nope"
        ));
        assert!(store.insert_sandbox(&record("ia")).is_err(), "duplicate id");
        // a sandbox resumed from disk reopens its row
        store.reopen_sandbox(&record("ia")).expect("reopen");
        assert!(
            store
                .unfinished_sandboxes()
                .expect("list")
                .iter()
                .any(|r| r.id == "ia")
        );
        store
            .reopen_sandbox(&record("ic"))
            .expect("reopen of an unknown row inserts");
        assert!(
            store
                .unfinished_sandboxes()
                .expect("list")
                .iter()
                .any(|r| r.id == "ic")
        );
    }

    #[test]
    fn set_sandbox_end_updates_unfinished_only() {
        let store = Store::open_in_memory().expect("open");
        store.insert_sandbox(&record("ia")).expect("insert");
        store.set_sandbox_end("ia", 999_000).expect("set end");
        assert_eq!(
            store.unfinished_sandboxes().expect("list")[0].end_at_ms,
            999_000
        );
        store
            .set_sandbox_end("unknown", 5)
            .expect("unknown is ignored");
    }

    #[test]
    fn reopen_persists_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        let key = {
            let store = Store::open(&path).expect("open");
            store.insert_sandbox(&record("ia")).expect("insert");
            store.audit(NewAudit::new(
                "k1",
                Some("ia"),
                "sandbox.create",
                serde_json::json!({"x": 1}),
            ));
            store.create_key("ci").expect("key").key
            // Dropping the store flushes the audit queue.
        };
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.unfinished_sandboxes().expect("list"),
            vec![record("ia")]
        );
        assert!(store.authenticate(&key).expect("auth").is_some());
        let audit = store.query_audit(&AuditQuery::default()).expect("audit");
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].kind, "sandbox.create");
    }

    #[test]
    fn old_schema_is_migrated_forward() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        {
            // A version-1 file, as the first release wrote it, with a key in it.
            let conn = Connection::open(&path).expect("raw open");
            conn.execute_batch(MIGRATIONS[0]).expect("v1 schema");
            conn.pragma_update(None, "user_version", 1).expect("v1");
            conn.execute(
                "INSERT INTO api_keys (id, name, key_hash, mask, created_at_ms)
                 VALUES ('kold', 'old', 'h', 'm', 0)",
                [],
            )
            .expect("row");
        }
        let store = Store::open(&path).expect("open migrates");
        let conn = store.conn();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        let index: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'sandboxes_by_key'",
                [],
                |r| r.get(0),
            )
            .expect("index");
        assert_eq!(index, 1);
        drop(conn);
        assert_eq!(store.list_keys().expect("keys")[0].id, "kold");
    }

    #[test]
    fn open_refuses_newer_schema_and_missing_parent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        {
            let conn = Connection::open(&path).expect("raw open");
            conn.pragma_update(None, "user_version", 99).expect("bump");
        }
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::SchemaTooNew {
                found: 99,
                supported: SCHEMA_VERSION
            })
        ));
        let missing = dir.path().join("no/such/dir/cella.db");
        assert!(matches!(
            Store::open(&missing),
            Err(StoreError::Open { .. })
        ));
    }

    #[test]
    fn two_handles_on_one_file_see_each_other() {
        // The CLI edits keys while the server has the file open.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        let server = Store::open(&path).expect("server");
        let cli = Store::open(&path).expect("cli");
        let created = cli.create_key("added-by-cli").expect("create");
        assert_eq!(
            server.authenticate(&created.key).expect("auth"),
            Some(created.info.id.clone())
        );
        assert!(cli.revoke_key(&created.info.id).expect("revoke"));
        assert_eq!(server.authenticate(&created.key).expect("auth"), None);
    }
}
