//! `filesystem.Filesystem` messages (envd `filesystem/filesystem.proto`) and the JSON bodies of
//! the plain `/files` routes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::json::{Timestamp, i64_str, u32_lenient};
use crate::proto_enum;

/// Connect path prefix of the service.
pub const SERVICE: &str = "filesystem.Filesystem";

proto_enum! {
    /// Kind of a filesystem entry.
    FileType {
        /// Unknown (sockets, devices...).
        Unspecified = (0, "FILE_TYPE_UNSPECIFIED"),
        /// Regular file.
        File = (1, "FILE_TYPE_FILE"),
        /// Directory.
        Directory = (2, "FILE_TYPE_DIRECTORY"),
        /// Symbolic link.
        Symlink = (3, "FILE_TYPE_SYMLINK"),
    }
}

proto_enum! {
    /// Kind of a watch event.
    EventType {
        /// Not set.
        Unspecified = (0, "EVENT_TYPE_UNSPECIFIED"),
        /// Created.
        Create = (1, "EVENT_TYPE_CREATE"),
        /// Written.
        Write = (2, "EVENT_TYPE_WRITE"),
        /// Removed.
        Remove = (3, "EVENT_TYPE_REMOVE"),
        /// Renamed (moved away; the new name shows up as CREATE).
        Rename = (4, "EVENT_TYPE_RENAME"),
        /// Permissions changed.
        Chmod = (5, "EVENT_TYPE_CHMOD"),
    }
}

/// Information about one filesystem entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EntryInfo {
    /// Base name.
    pub name: String,
    /// Kind.
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// Absolute path.
    pub path: String,
    /// Size in bytes.
    #[serde(with = "i64_str")]
    pub size: i64,
    /// Permission bits (`0o644`).
    #[serde(with = "u32_lenient")]
    pub mode: u32,
    /// `ls -l` style permission string (`-rw-r--r--`).
    pub permissions: String,
    /// Owner user name (numeric when unknown).
    pub owner: String,
    /// Owner group name (numeric when unknown).
    pub group: String,
    /// Last modification time.
    #[serde(alias = "modified_time", skip_serializing_if = "Option::is_none")]
    pub modified_time: Option<Timestamp>,
    /// Target of a symbolic link.
    #[serde(alias = "symlink_target", skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    /// `user.e2b.*` extended attributes, prefix stripped.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// Request carrying one path (`Stat`, `MakeDir`, `Remove`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PathRequest {
    /// Path (relative paths resolve against the user's home).
    pub path: String,
}

/// `Stat` request.
pub type StatRequest = PathRequest;
/// `MakeDir` request.
pub type MakeDirRequest = PathRequest;
/// `Remove` request.
pub type RemoveRequest = PathRequest;

/// Response carrying one entry (`Stat`, `MakeDir`, `Move`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EntryResponse {
    /// The entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

/// `Move` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MoveRequest {
    /// Source path.
    pub source: String,
    /// Destination path.
    pub destination: String,
}

/// `ListDir` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListDirRequest {
    /// Directory.
    pub path: String,
    /// How deep to descend (0 means 1).
    #[serde(with = "u32_lenient")]
    pub depth: u32,
}

/// `ListDir` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListDirResponse {
    /// Entries, parents before children.
    pub entries: Vec<EntryInfo>,
}

/// `WatchDir` / `CreateWatcher` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WatchDirRequest {
    /// Directory to watch.
    pub path: String,
    /// Watch subdirectories too.
    pub recursive: bool,
    /// Attach an [`EntryInfo`] to events.
    #[serde(alias = "include_entry")]
    pub include_entry: bool,
    /// Allow NFS/FUSE mounts (ignored: inotify works or it does not).
    #[serde(alias = "allow_network_mounts")]
    pub allow_network_mounts: bool,
}

/// `CreateWatcher` request.
pub type CreateWatcherRequest = WatchDirRequest;

/// One filesystem event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FilesystemEvent {
    /// Path relative to the watched directory.
    pub name: String,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Entry info when requested and still available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

/// Empty start marker of a watch stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchStart {}

/// Message of the `WatchDir` server stream (oneof `event`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchDirResponse {
    /// Watch established.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<WatchStart>,
    /// A filesystem event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FilesystemEvent>,
    /// Keepalive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<super::process::KeepAlive>,
}

/// `CreateWatcher` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct CreateWatcherResponse {
    /// Opaque watcher ID.
    #[serde(alias = "watcher_id")]
    pub watcher_id: String,
}

/// `GetWatcherEvents` / `RemoveWatcher` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WatcherIdRequest {
    /// Watcher ID.
    #[serde(alias = "watcher_id")]
    pub watcher_id: String,
}

/// `GetWatcherEvents` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GetWatcherEventsResponse {
    /// Events since the last poll.
    pub events: Vec<FilesystemEvent>,
}

/// One entry of the `POST /files` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteInfo {
    /// Absolute path written.
    pub path: String,
    /// Base name.
    pub name: String,
    /// Always `file`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Metadata stored with the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `POST /files/compose` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ComposeRequest {
    /// Files to concatenate, in order.
    #[serde(alias = "sourcePaths")]
    pub source_paths: Vec<String>,
    /// Output file.
    pub destination: String,
    /// User to act as (default user when empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
}

/// Render `ls -l` style permissions from a raw `st_mode`.
pub fn permission_string(st_mode: u32) -> String {
    let kind = match st_mode & 0o170_000 {
        0o040_000 => 'd',
        0o120_000 => 'L',
        0o020_000 => 'c',
        0o060_000 => 'D',
        0o010_000 => 'p',
        0o140_000 => 'S',
        _ => '-',
    };
    // Go's FileMode.String() uses these letters; the SDK shows the string verbatim.
    let mut s = String::with_capacity(10);
    s.push(kind);
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (bit, c) in bits {
        s.push(if st_mode & bit != 0 { c } else { '-' });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_info_json_shape() {
        let e = EntryInfo {
            name: "a.txt".into(),
            file_type: FileType::File,
            path: "/home/user/a.txt".into(),
            size: 5,
            mode: 0o644,
            permissions: "-rw-r--r--".into(),
            owner: "user".into(),
            group: "user".into(),
            modified_time: Some(Timestamp::new(1_700_000_000, 0)),
            symlink_target: None,
            metadata: BTreeMap::new(),
        };
        let v: serde_json::Value = serde_json::to_value(&e).expect("ser");
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["size"], "5");
        assert_eq!(v["mode"], 420);
        assert_eq!(v["modifiedTime"], "2023-11-14T22:13:20Z");
        assert!(v.get("symlinkTarget").is_none());
        let back: EntryInfo = serde_json::from_value(v).expect("de");
        assert_eq!(back, e);
    }

    #[test]
    fn sdk_requests_parse() {
        let r: ListDirRequest = serde_json::from_str(r#"{"path":"/tmp","depth":2}"#).expect("list");
        assert_eq!((r.path.as_str(), r.depth), ("/tmp", 2));
        let r: ListDirRequest = serde_json::from_str(r#"{"path":"x"}"#).expect("default depth");
        assert_eq!(r.depth, 0);
        let r: WatchDirRequest = serde_json::from_str(
            r#"{"path":"/d","recursive":true,"includeEntry":true,"allow_network_mounts":true}"#,
        )
        .expect("watch");
        assert!(r.recursive && r.include_entry && r.allow_network_mounts);
        let r: WatcherIdRequest =
            serde_json::from_str(r#"{"watcher_id":"w1"}"#).expect("snake watcher id");
        assert_eq!(r.watcher_id, "w1");
        let r: ComposeRequest = serde_json::from_str(
            r#"{"source_paths":["a","b"],"destination":"c","username":"root"}"#,
        )
        .expect("compose");
        assert_eq!(r.source_paths, vec!["a", "b"]);
    }

    #[test]
    fn events_serialize() {
        let ev = WatchDirResponse {
            filesystem: Some(FilesystemEvent {
                name: "sub/x".into(),
                event_type: EventType::Create,
                entry: None,
            }),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&ev).expect("ser"),
            r#"{"filesystem":{"name":"sub/x","type":"EVENT_TYPE_CREATE"}}"#
        );
        assert_eq!(
            serde_json::to_string(&WatchDirResponse {
                start: Some(WatchStart {}),
                ..Default::default()
            })
            .expect("ser"),
            r#"{"start":{}}"#
        );
    }

    #[test]
    fn permissions_like_go() {
        assert_eq!(permission_string(0o100_644), "-rw-r--r--");
        assert_eq!(permission_string(0o040_755), "drwxr-xr-x");
        assert_eq!(permission_string(0o120_777), "Lrwxrwxrwx");
        assert_eq!(permission_string(0o100_000), "----------");
    }
}
