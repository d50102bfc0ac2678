//! User database lookups from `/etc/passwd` and `/etc/group`, parsed by hand.
//!
//! The agent is linked statically against glibc, where `getpwnam` and friends need NSS modules
//! loaded at run time (and can crash or silently fail in a static binary). Sandboxes only use
//! local files anyway, so we read them directly. Lookups take a root directory so tests can
//! point them at a temp dir, and re-read the files every time: commands inside the sandbox may
//! `useradd` at any moment.

use std::path::{Path, PathBuf};

/// Longest user database file we read (anything larger is treated as hostile).
const MAX_DB_FILE: u64 = 8 * 1024 * 1024;

/// One account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
    /// Supplementary group IDs (from `/etc/group` member lists), primary group excluded.
    pub groups: Vec<u32>,
}

/// Why a user could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No such user in `/etc/passwd`.
    #[error("user '{0}' not found")]
    NotFound(String),
    /// `/etc/passwd` could not be read.
    #[error("cannot read {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the user database under a root directory.
#[derive(Debug, Clone)]
pub struct UserDb {
    root: PathBuf,
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut s = String::new();
    let mut bytes = Vec::new();
    f.take(MAX_DB_FILE).read_to_end(&mut bytes)?;
    s.push_str(&String::from_utf8_lossy(&bytes));
    Ok(s)
}

/// Parse one `/etc/passwd` line: `name:pw:uid:gid:gecos:home:shell`.
pub fn parse_passwd_line(line: &str) -> Option<User> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 || f[0].is_empty() {
        return None;
    }
    Some(User {
        name: f[0].to_string(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: f[5].to_string(),
        shell: f[6].to_string(),
        groups: Vec::new(),
    })
}

/// One `/etc/group` entry: name, gid, members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Group name.
    pub name: String,
    /// Group ID.
    pub gid: u32,
    /// Member login names.
    pub members: Vec<String>,
}

/// Parse one `/etc/group` line: `name:pw:gid:member,member`.
pub fn parse_group_line(line: &str) -> Option<Group> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 3 || f[0].is_empty() {
        return None;
    }
    let members = f
        .get(3)
        .map(|m| {
            m.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Some(Group {
        name: f[0].to_string(),
        gid: f[2].parse().ok()?,
        members,
    })
}

impl UserDb {
    /// A database rooted at `root` (`/` in production).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        UserDb { root: root.into() }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.root.join("etc").join(name)
    }

    fn groups(&self) -> Vec<Group> {
        read_bounded(&self.file("group"))
            .map(|s| s.lines().filter_map(parse_group_line).collect())
            .unwrap_or_default()
    }

    fn users(&self) -> Result<Vec<User>, UserError> {
        let path = self.file("passwd");
        let text = read_bounded(&path).map_err(|source| UserError::Read { path, source })?;
        Ok(text.lines().filter_map(parse_passwd_line).collect())
    }

    /// Look a user up by name, with supplementary groups filled in.
    pub fn lookup(&self, name: &str) -> Result<User, UserError> {
        let mut user = self
            .users()?
            .into_iter()
            .find(|u| u.name == name)
            .ok_or_else(|| UserError::NotFound(name.to_string()))?;
        let mut groups: Vec<u32> = self
            .groups()
            .into_iter()
            .filter(|g| g.gid != user.gid && g.members.iter().any(|m| m == name))
            .map(|g| g.gid)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        user.groups = groups;
        Ok(user)
    }

    /// Look a user up by UID.
    pub fn by_uid(&self, uid: u32) -> Option<User> {
        self.users().ok()?.into_iter().find(|u| u.uid == uid)
    }

    /// Name for a UID (numeric string when unknown).
    pub fn user_name(&self, uid: u32) -> String {
        self.by_uid(uid)
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string())
    }

    /// Name for a GID (numeric string when unknown).
    #[cfg(test)]
    pub fn group_name(&self, gid: u32) -> String {
        self.groups()
            .into_iter()
            .find(|g| g.gid == gid)
            .map(|g| g.name)
            .unwrap_or_else(|| gid.to_string())
    }

    /// Cached name lookups for listing many entries at once.
    pub fn names(&self) -> NameCache {
        let users = self
            .users()
            .unwrap_or_default()
            .into_iter()
            .map(|u| (u.uid, u.name))
            .collect();
        let groups = self.groups().into_iter().map(|g| (g.gid, g.name)).collect();
        NameCache { users, groups }
    }
}

/// A snapshot of uid→name and gid→name maps.
#[derive(Debug, Clone, Default)]
pub struct NameCache {
    users: std::collections::HashMap<u32, String>,
    groups: std::collections::HashMap<u32, String>,
}

impl NameCache {
    /// Owner name (numeric when unknown).
    pub fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    /// Group name, when the group exists.
    pub fn known_group(&self, gid: u32) -> Option<&str> {
        self.groups.get(&gid).map(String::as_str)
    }

    /// Group name (numeric when unknown).
    pub fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, UserDb) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "# comment\nroot:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000:,,,:/home/user:/bin/bash\nbroken:x:nope:1:::\n\nshort:x:1\n",
        )
        .expect("passwd");
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nuser:x:1000:\nsudo:x:27:user,other\ndocker:x:999: user \nbad:x:zz:user\n",
        )
        .expect("group");
        let db = UserDb::new(dir.path());
        (dir, db)
    }

    #[test]
    fn lookup_with_supplementary_groups() {
        let (_d, db) = db();
        let u = db.lookup("user").expect("user");
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.home, "/home/user");
        assert_eq!(u.shell, "/bin/bash");
        assert_eq!(u.groups, vec![27, 999]);
        let r = db.lookup("root").expect("root");
        assert_eq!((r.uid, r.home.as_str()), (0, "/root"));
        assert!(r.groups.is_empty());
        assert!(matches!(db.lookup("broken"), Err(UserError::NotFound(_))));
        assert!(matches!(db.lookup("nobody"), Err(UserError::NotFound(_))));
    }

    #[test]
    fn names_fall_back_to_numbers() {
        let (_d, db) = db();
        assert_eq!(db.user_name(1000), "user");
        assert_eq!(db.user_name(4242), "4242");
        assert_eq!(db.group_name(27), "sudo");
        assert_eq!(db.group_name(5), "5");
        let c = db.names();
        assert_eq!(c.user(0), "root");
        assert_eq!(c.group(999), "docker");
        assert_eq!(c.group(1), "1");
        assert_eq!(c.known_group(27), Some("sudo"));
        assert_eq!(c.known_group(1), None);
    }

    #[test]
    fn missing_database_is_an_error_not_a_panic() {
        let db = UserDb::new("/nonexistent-root-for-test");
        assert!(matches!(db.lookup("root"), Err(UserError::Read { .. })));
        assert_eq!(db.user_name(0), "0");
    }

    #[test]
    fn hostile_lines() {
        assert_eq!(parse_passwd_line(":x:0:0::/:/bin/sh"), None);
        assert_eq!(parse_passwd_line("a:x:99999999999:0::/:/bin/sh"), None);
        assert_eq!(parse_group_line("g:x"), None);
        let g = parse_group_line("g:x:5").expect("no member field");
        assert!(g.members.is_empty());
    }
}
