//! The append-only audit log and its writer thread.
//!
//! Callers (request handlers, the agent event pump) must never wait for the disk, so
//! [`Store::audit`] only stamps the time and queues the row. One thread drains the queue and
//! writes everything that has accumulated in a single transaction: under load, rows are
//! batched; when idle, each row is committed almost at once.
//!
//! The queue is bounded by a row count rather than by blocking: a sandbox that floods events
//! can not make the server run out of memory. Rows beyond the bound are counted and the count
//! is logged as an `audit.dropped` row as soon as the writer catches up, so the loss itself is
//! on the record.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use cella_api::AuditEntry;
use rusqlite::{Connection, params, params_from_iter};

use super::{Store, StoreError, format_rfc3339_ms, lock, now_ms};

/// Rows returned by [`Store::query_audit`] when the query sets no limit.
pub const DEFAULT_AUDIT_LIMIT: usize = 1000;
/// Largest limit [`Store::query_audit`] honours.
pub const MAX_AUDIT_LIMIT: usize = 10_000;

/// Rows queued but not yet written beyond which new rows are dropped (and counted).
const MAX_PENDING: usize = 100_000;
/// Rows written per transaction at most.
const BATCH_MAX: usize = 1024;
/// Longest `detail` JSON text kept; longer details are replaced by a truncated marker.
const MAX_DETAIL_BYTES: usize = 64 * 1024;
/// Longest actor / kind / sandbox ID kept.
const MAX_FIELD_CHARS: usize = 128;

/// An audit event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAudit {
    /// Who: an API key ID, `agent` for in-sandbox events, `server` for the server.
    pub actor: String,
    /// Sandbox concerned, if any.
    pub sandbox_id: Option<String>,
    /// Event kind, dotted (`sandbox.create`, `process.start`, ...).
    pub kind: String,
    /// Details (a JSON object by convention).
    pub detail: serde_json::Value,
}

impl NewAudit {
    /// Convenience constructor.
    pub fn new(
        actor: impl Into<String>,
        sandbox_id: Option<&str>,
        kind: impl Into<String>,
        detail: serde_json::Value,
    ) -> NewAudit {
        NewAudit {
            actor: actor.into(),
            sandbox_id: sandbox_id.map(str::to_owned),
            kind: kind.into(),
            detail,
        }
    }
}

/// Filters of [`Store::query_audit`]; all optional and combined with AND.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only rows about this sandbox.
    pub sandbox_id: Option<String>,
    /// Only rows by this actor (key ID, `agent`, `server`).
    pub actor: Option<String>,
    /// Only rows this API key may see: those it caused (actor) and those about sandboxes it
    /// created. The REST API sets it so that one tenant never reads another's log.
    pub visible_to: Option<String>,
    /// Only rows at or after this time (Unix ms).
    pub since_ms: Option<i64>,
    /// Only rows whose kind starts with this text (`process` matches `process.start`).
    pub kind_prefix: Option<String>,
    /// At most this many rows ([`DEFAULT_AUDIT_LIMIT`] if unset, capped at [`MAX_AUDIT_LIMIT`]).
    pub limit: Option<usize>,
}

struct Row {
    ts_ms: i64,
    actor: String,
    sandbox_id: Option<String>,
    kind: String,
    detail: String,
}

enum Msg {
    Row(Row),
    Flush(SyncSender<()>),
}

/// How the writer thread reaches the database.
pub(super) enum WriterConn {
    /// Its own connection to the file (the normal case: readers are not held up by writes).
    Own(Box<Connection>),
    /// The store's connection (in-memory databases can not be opened twice).
    Shared(Arc<Mutex<Connection>>),
}

#[derive(Default)]
struct Counters {
    pending: AtomicUsize,
    dropped: AtomicU64,
}

pub(super) struct AuditWriter {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl AuditWriter {
    pub(super) fn start(conn: WriterConn) -> AuditWriter {
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("cella-audit".into())
            .spawn(move || writer_loop(conn, &rx, &thread_counters));
        match thread {
            Ok(handle) => AuditWriter {
                tx: Some(tx),
                thread: Some(handle),
                counters,
            },
            Err(e) => {
                // Without a writer the log can not be kept; say so loudly but keep serving.
                tracing::error!(error = %e, "cannot start the audit writer thread; audit rows will be dropped");
                AuditWriter {
                    tx: None,
                    thread: None,
                    counters,
                }
            }
        }
    }

    fn enqueue(&self, row: Row) {
        let Some(tx) = &self.tx else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if self.counters.pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING {
            self.counters.pending.fetch_sub(1, Ordering::AcqRel);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if tx.send(Msg::Row(row)).is_err() {
            self.counters.pending.fetch_sub(1, Ordering::AcqRel);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        if tx.send(Msg::Flush(ack_tx)).is_ok() {
            // An error means the writer is gone; nothing more will be written either way.
            let _ = ack_rx.recv();
        }
    }

    /// Writes everything queued, then stops the thread.
    pub(super) fn shutdown(&mut self) {
        drop(self.tx.take());
        if let Some(handle) = self.thread.take()
            && handle.join().is_err()
        {
            tracing::error!("the audit writer thread panicked");
        }
    }
}

fn writer_loop(mut conn: WriterConn, rx: &Receiver<Msg>, counters: &Counters) {
    while let Ok(first) = rx.recv() {
        let mut rows = Vec::new();
        let mut acks = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Row(r) => rows.push(r),
                Msg::Flush(ack) => acks.push(ack),
            }
            if rows.len() < BATCH_MAX {
                next = rx.try_recv().ok();
            }
        }
        let taken = rows.len();
        let dropped = counters.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            rows.push(Row {
                ts_ms: now_ms(),
                actor: "server".into(),
                sandbox_id: None,
                kind: "audit.dropped".into(),
                detail: serde_json::json!({ "count": dropped }).to_string(),
            });
        }
        if !rows.is_empty() {
            let result = write_batch(&mut conn, &rows).or_else(|e| {
                // The usual cause is another process holding the write lock past the busy
                // timeout; one more try costs little.
                tracing::warn!(error = %e, "audit write failed, retrying");
                std::thread::sleep(Duration::from_millis(200));
                write_batch(&mut conn, &rows)
            });
            if let Err(e) = result {
                tracing::error!(error = %e, rows = rows.len(), "audit rows lost");
            }
        }
        counters.pending.fetch_sub(taken, Ordering::AcqRel);
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

fn write_batch(conn: &mut WriterConn, rows: &[Row]) -> rusqlite::Result<()> {
    match conn {
        WriterConn::Own(c) => insert_rows(c, rows),
        WriterConn::Shared(m) => insert_rows(&mut lock(m), rows),
    }
}

fn insert_rows(conn: &mut Connection, rows: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO audit (ts_ms, actor, sandbox_id, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for r in rows {
            stmt.execute(params![r.ts_ms, r.actor, r.sandbox_id, r.kind, r.detail])?;
        }
    }
    tx.commit()
}

fn cap(s: &str) -> String {
    s.chars().take(MAX_FIELD_CHARS).collect()
}

fn detail_text(detail: &serde_json::Value) -> String {
    let text = detail.to_string();
    if text.len() <= MAX_DETAIL_BYTES {
        return text;
    }
    let mut end = 1024;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    serde_json::json!({ "truncated": true, "bytes": text.len(), "prefix": &text[..end] })
        .to_string()
}

impl Store {
    /// Appends an audit row. Returns at once: the row is stamped now and written by the
    /// writer thread. Oversized fields are truncated.
    pub fn audit(&self, rec: NewAudit) {
        self.inner.audit.enqueue(Row {
            ts_ms: now_ms(),
            actor: cap(&rec.actor),
            sandbox_id: rec.sandbox_id.as_deref().map(cap),
            kind: cap(&rec.kind),
            detail: detail_text(&rec.detail),
        });
    }

    /// Returns once every row queued before the call is committed (tests, shutdown).
    pub fn flush_audit(&self) {
        self.inner.audit.flush();
    }

    /// Audit rows matching `q`, ascending by ID.
    pub fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        use rusqlite::types::Value;
        let mut sql = String::from(
            "SELECT id, ts_ms, actor, sandbox_id, kind, detail FROM audit WHERE 1 = 1",
        );
        let mut args: Vec<Value> = Vec::new();
        if let Some(s) = &q.sandbox_id {
            args.push(Value::Text(s.clone()));
            sql.push_str(&format!(" AND sandbox_id = ?{}", args.len()));
        }
        if let Some(a) = &q.actor {
            args.push(Value::Text(a.clone()));
            sql.push_str(&format!(" AND actor = ?{}", args.len()));
        }
        if let Some(k) = &q.visible_to {
            args.push(Value::Text(k.clone()));
            let n = args.len();
            sql.push_str(&format!(
                " AND (actor = ?{n} OR sandbox_id IN (SELECT id FROM sandboxes WHERE key_id = ?{n}))"
            ));
        }
        if let Some(t) = q.since_ms {
            args.push(Value::Integer(t));
            sql.push_str(&format!(" AND ts_ms >= ?{}", args.len()));
        }
        if let Some(p) = &q.kind_prefix {
            args.push(Value::Text(p.clone()));
            let n = args.len();
            sql.push_str(&format!(" AND substr(kind, 1, length(?{n})) = ?{n}"));
        }
        let limit = q.limit.unwrap_or(DEFAULT_AUDIT_LIMIT).min(MAX_AUDIT_LIMIT);
        args.push(Value::Integer(i64::try_from(limit).unwrap_or(0)));
        sql.push_str(&format!(" ORDER BY id LIMIT ?{}", args.len()));

        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |r| {
            let detail: String = r.get(5)?;
            Ok(AuditEntry {
                id: r.get(0)?,
                time: format_rfc3339_ms(r.get(1)?),
                actor: r.get(2)?,
                sandbox_id: r.get(3)?,
                kind: r.get(4)?,
                // Rows are written from a serialized Value, so this only fails on a file
                // edited by hand; keep the text rather than fail the whole query.
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::DB_FILE_NAME;
    use super::*;

    fn ev(actor: &str, sbx: Option<&str>, kind: &str, n: i64) -> NewAudit {
        NewAudit::new(actor, sbx, kind, json!({ "n": n }))
    }

    #[test]
    fn append_flush_and_query_filters() {
        let store = Store::open_in_memory().expect("open");
        store.audit(ev("k1", Some("ia"), "sandbox.create", 1));
        store.audit(ev("agent", Some("ia"), "process.start", 2));
        store.audit(ev("agent", Some("ib"), "process.exit", 3));
        store.audit(ev("k2", None, "api", 4));
        store.flush_audit();

        let all = store.query_audit(&AuditQuery::default()).expect("all");
        assert_eq!(all.len(), 4);
        assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ascending ids");
        assert_eq!(all[0].detail, json!({"n": 1}));
        assert_eq!(all[0].sandbox_id.as_deref(), Some("ia"));
        assert!(all[0].time.ends_with('Z'));

        let q = |q: AuditQuery| -> Vec<i64> {
            store
                .query_audit(&q)
                .expect("query")
                .iter()
                .map(|e| e.detail["n"].as_i64().expect("n"))
                .collect()
        };
        assert_eq!(
            q(AuditQuery {
                sandbox_id: Some("ia".into()),
                ..Default::default()
            }),
            [1, 2]
        );
        assert_eq!(
            q(AuditQuery {
                actor: Some("agent".into()),
                ..Default::default()
            }),
            [2, 3]
        );
        assert_eq!(
            q(AuditQuery {
                kind_prefix: Some("process".into()),
                ..Default::default()
            }),
            [2, 3]
        );
        assert_eq!(
            q(AuditQuery {
                kind_prefix: Some("process.e".into()),
                ..Default::default()
            }),
            [3]
        );
        assert_eq!(
            q(AuditQuery {
                kind_prefix: Some("%".into()),
                ..Default::default()
            }),
            [] as [i64; 0]
        );
        assert_eq!(
            q(AuditQuery {
                limit: Some(2),
                ..Default::default()
            }),
            [1, 2]
        );
        assert_eq!(
            q(AuditQuery {
                sandbox_id: Some("ia".into()),
                actor: Some("agent".into()),
                ..Default::default()
            }),
            [2]
        );
        assert_eq!(
            q(AuditQuery {
                since_ms: Some(now_ms() + 60_000),
                ..Default::default()
            }),
            [] as [i64; 0]
        );
        assert_eq!(
            q(AuditQuery {
                since_ms: Some(now_ms() - 60_000),
                ..Default::default()
            })
            .len(),
            4
        );
    }

    #[test]
    fn visible_to_limits_rows_to_own_calls_and_sandboxes() {
        let store = Store::open_in_memory().expect("open");
        let mut mine = super::super::tests::record("imine");
        mine.key_id = "kalice".into();
        store.insert_sandbox(&mine).expect("insert");
        let mut theirs = super::super::tests::record("itheirs");
        theirs.key_id = "kbob".into();
        store.insert_sandbox(&theirs).expect("insert");
        store.audit(ev("kalice", None, "api", 1));
        store.audit(ev("agent", Some("imine"), "process.start", 2));
        store.audit(ev("kbob", Some("itheirs"), "api", 3));
        store.audit(ev("agent", Some("itheirs"), "process.start", 4));
        store.audit(ev("server", None, "server.start", 5));
        store.flush_audit();
        let ns = |q: AuditQuery| -> Vec<i64> {
            store
                .query_audit(&q)
                .expect("query")
                .iter()
                .map(|e| e.detail["n"].as_i64().expect("n"))
                .collect()
        };
        let alice = || AuditQuery {
            visible_to: Some("kalice".into()),
            ..Default::default()
        };
        assert_eq!(ns(alice()), [1, 2]);
        assert_eq!(
            ns(AuditQuery {
                sandbox_id: Some("itheirs".into()),
                ..alice()
            }),
            [] as [i64; 0]
        );
        assert_eq!(
            ns(AuditQuery {
                visible_to: Some("kbob".into()),
                ..Default::default()
            }),
            [3, 4]
        );
    }

    #[test]
    fn since_uses_enqueue_time() {
        let store = Store::open_in_memory().expect("open");
        store.audit(ev("k", None, "a", 1));
        store.flush_audit();
        let first = store.query_audit(&AuditQuery::default()).expect("q")[0].clone();
        std::thread::sleep(Duration::from_millis(20));
        let cut = now_ms();
        store.audit(ev("k", None, "a", 2));
        store.flush_audit();
        let after = store
            .query_audit(&AuditQuery {
                since_ms: Some(cut),
                ..Default::default()
            })
            .expect("q");
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].detail["n"], 2);
        assert!(after[0].time >= first.time);
    }

    #[test]
    fn update_and_delete_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join(DB_FILE_NAME)).expect("open");
        store.audit(ev("k1", Some("ia"), "sandbox.create", 1));
        store.flush_audit();
        let conn = store.conn();
        let upd = conn.execute("UPDATE audit SET actor = 'forged'", []);
        let err = upd.expect_err("update must fail").to_string();
        assert!(err.contains("append-only"), "{err}");
        let del = conn.execute("DELETE FROM audit", []);
        assert!(
            del.expect_err("delete must fail")
                .to_string()
                .contains("append-only")
        );
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM audit WHERE actor = 'k1'", [], |r| {
                r.get(0)
            })
            .expect("count");
        assert_eq!(n, 1);
    }

    #[test]
    fn concurrent_audit_from_many_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join(DB_FILE_NAME)).expect("open");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..250 {
                        store.audit(ev(&format!("t{t}"), None, "load", i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        store.flush_audit();
        let all = store
            .query_audit(&AuditQuery {
                limit: Some(MAX_AUDIT_LIMIT),
                ..Default::default()
            })
            .expect("query");
        assert_eq!(all.len(), 2000);
        for t in 0..8 {
            let mine: Vec<i64> = all
                .iter()
                .filter(|e| e.actor == format!("t{t}"))
                .map(|e| e.detail["n"].as_i64().expect("n"))
                .collect();
            assert_eq!(mine, (0..250).collect::<Vec<_>>(), "per-thread order kept");
        }
    }

    #[test]
    fn limit_defaults_and_caps() {
        let store = Store::open_in_memory().expect("open");
        for i in 0..1005 {
            store.audit(ev("k", None, "x", i));
        }
        store.flush_audit();
        assert_eq!(
            store.query_audit(&AuditQuery::default()).expect("q").len(),
            DEFAULT_AUDIT_LIMIT
        );
        let big = AuditQuery {
            limit: Some(usize::MAX),
            ..Default::default()
        };
        assert_eq!(store.query_audit(&big).expect("q").len(), 1005);
    }

    #[test]
    fn oversized_fields_are_truncated() {
        let store = Store::open_in_memory().expect("open");
        store.audit(NewAudit::new(
            "a".repeat(1000),
            Some(&"s".repeat(1000)),
            "k".repeat(1000),
            json!({ "blob": "x".repeat(MAX_DETAIL_BYTES * 2) }),
        ));
        store.flush_audit();
        let e = &store.query_audit(&AuditQuery::default()).expect("q")[0];
        assert_eq!(e.actor.len(), MAX_FIELD_CHARS);
        assert_eq!(e.kind.len(), MAX_FIELD_CHARS);
        assert_eq!(
            e.sandbox_id.as_ref().map(String::len),
            Some(MAX_FIELD_CHARS)
        );
        assert_eq!(e.detail["truncated"], true);
        assert!(e.detail.to_string().len() < 4096);
    }

    #[test]
    fn flush_after_drop_of_other_clone_still_works() {
        let store = Store::open_in_memory().expect("open");
        let clone = store.clone();
        clone.audit(ev("k", None, "x", 1));
        drop(clone);
        store.flush_audit();
        assert_eq!(
            store.query_audit(&AuditQuery::default()).expect("q").len(),
            1
        );
    }
}
