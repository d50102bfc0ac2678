//! API keys: generation, import, authentication, listing and revocation.
//!
//! Keys look like E2B's (`e2b_` + lowercase hex) because the JS SDK refuses anything else.
//! Only the SHA-256 of a key is stored; a stolen database file does not reveal usable keys.
//! The key itself has 160 random bits, so a plain (unsalted) hash is enough: there is no
//! dictionary to attack.

use cella_api::{ApiKeyInfo, CreatedApiKey};
use rand::RngCore;
use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::{Store, StoreError, format_rfc3339_ms, now_ms};

/// Every key starts with this.
pub const KEY_PREFIX: &str = "e2b_";

/// Random bytes in a generated key (40 hex digits).
const KEY_RANDOM_BYTES: usize = 20;
/// Hex digits accepted by [`Store::import_key`].
const KEY_HEX_MIN: usize = 8;
const KEY_HEX_MAX: usize = 128;
/// Longest key name.
const MAX_NAME_LEN: usize = 128;

/// Whether `key` is `e2b_` followed by 8 to 128 lowercase hex digits.
pub fn is_valid_key_format(key: &str) -> bool {
    let Some(hex) = key.strip_prefix(KEY_PREFIX) else {
        return false;
    };
    (KEY_HEX_MIN..=KEY_HEX_MAX).contains(&hex.len())
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The recognisable, non-secret form of a key: `e2b_1234…abcd`.
pub fn mask_key(key: &str) -> String {
    let hex = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    let head: String = hex.chars().take(4).collect();
    let tail: String = {
        let n = hex.chars().count();
        hex.chars().skip(n.saturating_sub(4).max(4)).collect()
    };
    format!("{KEY_PREFIX}{head}…{tail}")
}

fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn random_hex(bytes: usize) -> Result<String, StoreError> {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buf)
        .map_err(StoreError::Random)?;
    Ok(hex::encode(buf))
}

fn check_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control)
    {
        return Err(StoreError::InvalidKeyName { max: MAX_NAME_LEN });
    }
    Ok(())
}

impl Store {
    /// Generates a new key named `name`. The returned secret is never retrievable again.
    pub fn create_key(&self, name: &str) -> Result<CreatedApiKey, StoreError> {
        check_name(name)?;
        let key = format!("{KEY_PREFIX}{}", random_hex(KEY_RANDOM_BYTES)?);
        let info = self.insert_key(name, &key)?;
        Ok(CreatedApiKey { info, key })
    }

    /// Registers a key chosen elsewhere (e.g. `CELLA_API_KEY`). Idempotent: importing a key
    /// that is already known returns its existing record and does not change its name. A
    /// revoked key stays revoked.
    pub fn import_key(&self, name: &str, key: &str) -> Result<ApiKeyInfo, StoreError> {
        if !is_valid_key_format(key) {
            return Err(StoreError::InvalidKeyFormat);
        }
        check_name(name)?;
        if let Some(info) = self.key_by_hash(&hash_key(key))? {
            return Ok(info);
        }
        match self.insert_key(name, key) {
            Ok(info) => Ok(info),
            // Another process imported the same key between our lookup and insert.
            Err(err @ StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                self.key_by_hash(&hash_key(key))?.ok_or(err)
            }
            Err(e) => Err(e),
        }
    }

    fn insert_key(&self, name: &str, key: &str) -> Result<ApiKeyInfo, StoreError> {
        let id = format!("k{}", &random_hex(5)?);
        let created = now_ms();
        let mask = mask_key(key);
        self.conn()
            .prepare_cached(
                "INSERT INTO api_keys (id, name, key_hash, mask, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![id, name, hash_key(key), mask, created])?;
        Ok(ApiKeyInfo {
            id,
            name: name.to_owned(),
            mask,
            created_at: format_rfc3339_ms(created),
        })
    }

    fn key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyInfo>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT id, name, mask, created_at_ms FROM api_keys WHERE key_hash = ?1",
            )?
            .query_row(params![hash], row_to_info)
            .optional()?)
    }

    /// The key ID for a valid, unrevoked key; `None` otherwise (including malformed input,
    /// which never reaches the database).
    pub fn authenticate(&self, key: &str) -> Result<Option<String>, StoreError> {
        if !is_valid_key_format(key) {
            return Ok(None);
        }
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT id FROM api_keys WHERE key_hash = ?1 AND revoked_at_ms IS NULL",
            )?
            .query_row(params![hash_key(key)], |r| r.get(0))
            .optional()?)
    }

    /// Active (unrevoked) keys, oldest first.
    pub fn list_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, name, mask, created_at_ms FROM api_keys
             WHERE revoked_at_ms IS NULL ORDER BY created_at_ms, id",
        )?;
        let keys = stmt
            .query_map([], row_to_info)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(keys)
    }

    /// Revokes key `id`. `false` if there is no such active key.
    pub fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .prepare_cached(
                "UPDATE api_keys SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
            )?
            .execute(params![id, now_ms()])?;
        Ok(n > 0)
    }

    /// Number of unrevoked keys (the server refuses to start open to nobody).
    pub fn active_key_count(&self) -> Result<usize, StoreError> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM api_keys WHERE revoked_at_ms IS NULL",
            [],
            |r| r.get(0),
        )?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

fn row_to_info(row: &rusqlite::Row<'_>) -> rusqlite::Result<ApiKeyInfo> {
    Ok(ApiKeyInfo {
        id: row.get(0)?,
        name: row.get(1)?,
        mask: row.get(2)?,
        created_at: format_rfc3339_ms(row.get(3)?),
    })
}

#[cfg(test)]
mod tests {
    use super::super::DB_FILE_NAME;
    use super::*;

    #[test]
    fn generated_keys_have_e2b_format() {
        let store = Store::open_in_memory().expect("open");
        let k = store.create_key("ci").expect("create");
        assert!(k.key.starts_with("e2b_"));
        assert_eq!(k.key.len(), 4 + 40);
        assert!(is_valid_key_format(&k.key));
        assert_eq!(k.info.name, "ci");
        assert!(
            k.info.id.starts_with('k') && k.info.id.len() == 11,
            "{}",
            k.info.id
        );
        assert_eq!(
            k.info.mask,
            format!("e2b_{}…{}", &k.key[4..8], &k.key[40..])
        );
        let other = store.create_key("ci").expect("create 2");
        assert_ne!(other.key, k.key);
        assert_ne!(other.info.id, k.info.id);
    }

    #[test]
    fn authenticate_round_trip_wrong_and_revoked() {
        let store = Store::open_in_memory().expect("open");
        let k = store.create_key("a").expect("create");
        assert_eq!(
            store.authenticate(&k.key).expect("auth"),
            Some(k.info.id.clone())
        );
        let mut wrong = k.key.clone();
        let last = if wrong.ends_with('0') { "1" } else { "0" };
        wrong.replace_range(wrong.len() - 1.., last);
        assert_eq!(store.authenticate(&wrong).expect("auth"), None);
        assert_eq!(store.authenticate("").expect("auth"), None);
        assert_eq!(store.authenticate("Bearer x").expect("auth"), None);
        assert_eq!(
            store.authenticate(&k.key.to_uppercase()).expect("auth"),
            None
        );

        assert_eq!(store.active_key_count().expect("count"), 1);
        assert!(store.revoke_key(&k.info.id).expect("revoke"));
        assert!(!store.revoke_key(&k.info.id).expect("revoke twice"));
        assert!(!store.revoke_key("knope").expect("revoke unknown"));
        assert_eq!(store.authenticate(&k.key).expect("auth"), None);
        assert_eq!(store.active_key_count().expect("count"), 0);
        assert!(store.list_keys().expect("list").is_empty());
    }

    #[test]
    fn list_keys_shows_metadata_only() {
        let store = Store::open_in_memory().expect("open");
        let a = store.create_key("a").expect("a");
        let b = store.create_key("b").expect("b");
        let listed = store.list_keys().expect("list");
        assert_eq!(listed.len(), 2);
        let ids: Vec<_> = listed.iter().map(|k| k.id.clone()).collect();
        assert!(ids.contains(&a.info.id) && ids.contains(&b.info.id));
        let json = serde_json::to_string(&listed).expect("json");
        assert!(!json.contains(&a.key[4..]), "secret leaked into listing");
    }

    #[test]
    fn import_is_idempotent_and_validates() {
        let store = Store::open_in_memory().expect("open");
        let key = "e2b_0123456789abcdef0123456789abcdef01234567";
        let first = store.import_key("env", key).expect("import");
        let again = store.import_key("renamed", key).expect("import again");
        assert_eq!(first, again);
        assert_eq!(store.active_key_count().expect("count"), 1);
        assert_eq!(
            store.authenticate(key).expect("auth"),
            Some(first.id.clone())
        );

        for bad in [
            "",
            "e2b_",
            "e2b_abc",
            "e2b_0123456789ABCDEF",
            "sk_0123456789abcdef",
            "e2b_0123456789abcdeg",
        ] {
            assert!(
                matches!(
                    store.import_key("x", bad),
                    Err(StoreError::InvalidKeyFormat)
                ),
                "{bad:?}"
            );
        }
        let long = format!("e2b_{}", "a".repeat(129));
        assert!(matches!(
            store.import_key("x", &long),
            Err(StoreError::InvalidKeyFormat)
        ));
        assert!(matches!(
            store.import_key("", "e2b_00000000"),
            Err(StoreError::InvalidKeyName { .. })
        ));
        assert!(matches!(
            store.create_key("a\nb"),
            Err(StoreError::InvalidKeyName { .. })
        ));
    }

    #[test]
    fn only_the_hash_reaches_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        let key = {
            let store = Store::open(&path).expect("open");
            let k = store.create_key("secret-test").expect("create");
            // Force the WAL into the main file so both are checked in their final form.
            store
                .conn()
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .expect("checkpoint");
            k.key
        };
        let secret_hex = &key[4..];
        let mut haystack = Vec::new();
        for entry in std::fs::read_dir(dir.path()).expect("readdir") {
            let p = entry.expect("entry").path();
            haystack.extend(std::fs::read(&p).expect("read"));
        }
        let contains = |needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
        assert!(
            !contains(secret_hex.as_bytes()),
            "key found in database files"
        );
        assert!(
            contains(hash_key(&key).as_bytes()),
            "hash not found: test is not looking right"
        );
        assert!(contains(b"secret-test"));
    }

    #[test]
    fn mask_handles_short_input() {
        assert_eq!(mask_key("e2b_12345678"), "e2b_1234…5678");
        assert_eq!(mask_key("e2b_12"), "e2b_12…");
    }
}
