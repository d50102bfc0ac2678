//! Template specs: what a template is made of, the builtin ones, and the build ID.
//!
//! The build ID is the cache key of a built root filesystem. It is a hash over the whole spec
//! (canonical JSON: struct fields in declaration order, `env` as a sorted map) plus
//! [`BUILDER_VERSION`], and for a template built `from` a builtin parent, the parent's build ID.
//! So a template is rebuilt exactly when its spec, its parent or the way we build changes.

use std::collections::BTreeMap;

pub use cella_proto::control::StartCommand;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::TemplateError;

/// Version of the build procedure. Bump it whenever a change to the builder changes the
/// resulting root filesystem, so existing builds are rebuilt.
pub const BUILDER_VERSION: &str = "cella-template-builder/1";

/// Longest template name, alias or user name accepted.
const MAX_NAME_LEN: usize = 64;

/// Most entries accepted in each list of a spec.
const MAX_LIST_LEN: usize = 256;

/// Longest single entry (package name, command, env value) accepted.
const MAX_ENTRY_LEN: usize = 8192;

/// Largest template file accepted.
const MAX_FILE_LEN: usize = 1024 * 1024;

/// Longest template file path accepted.
const MAX_PATH_LEN: usize = 1024;

/// Where the code interpreter's server lives inside the `code-interpreter` template.
const CODE_INTERPRETER_DIR: &str = "/opt/cella/code-interpreter";

/// A template: a root filesystem recipe plus the defaults sandboxes started from it get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// Name (`base`), `[a-z0-9][a-z0-9._-]*`; also the directory name in the store.
    pub name: String,
    /// Other names the template answers to (`code-interpreter-v1`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Parent template whose built root filesystem is copied instead of running debootstrap.
    #[serde(default)]
    pub from: Option<String>,
    /// Debian suite for debootstrap (`bookworm`). Ignored when `from` is set.
    pub distribution: String,
    /// Debian packages: passed to debootstrap `--include`, or installed with apt-get on top of
    /// the parent.
    #[serde(default)]
    pub apt_packages: Vec<String>,
    /// Python packages (pip requirement specifiers) installed system-wide.
    #[serde(default)]
    pub pip_packages: Vec<String>,
    /// Shell commands run in the chroot as root, in order, after the packages.
    #[serde(default)]
    pub run: Vec<String>,
    /// User that commands run as by default (`user`, home `/home/<user>`, uid 1000).
    pub default_user: String,
    /// Environment every process in the sandbox gets.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Default vCPUs of sandboxes.
    pub cpu_count: u32,
    /// Default memory limit of sandboxes, MiB.
    pub memory_mb: u64,
    /// Default size of the writable layer, MiB.
    pub disk_mb: u64,
    /// Command every sandbox of this template starts at boot (a server such as the code
    /// interpreter). Omitted from the JSON when absent, so specs without one keep their
    /// build ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<StartCommand>,
    /// Files written into the root filesystem before packages are installed. Their contents
    /// are part of the spec, so changing one changes the build ID. Omitted when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<TemplateFile>,
}

/// A file the build writes into the template (owned by root, mode 0644 or 0755).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateFile {
    /// Absolute path inside the sandbox, without `.`/`..` components.
    pub path: String,
    /// UTF-8 contents.
    pub contents: String,
    /// Make it executable (0755 instead of 0644).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub executable: bool,
}

impl TemplateSpec {
    /// `base`: Debian 12 minbase with bash, coreutils, python3 + pip, git, curl,
    /// ca-certificates, sudo, and the user `user` (home `/home/user`, passwordless sudo).
    ///
    /// `procps` gives `ps`/`kill`/`top`, which agents expect; `libnss-myhostname` makes the
    /// sandbox's hostname resolvable without writing `/etc/hosts` per sandbox (otherwise
    /// `sudo` prints "unable to resolve host" on every call).
    pub fn base() -> TemplateSpec {
        TemplateSpec {
            name: "base".to_owned(),
            aliases: Vec::new(),
            from: None,
            distribution: "bookworm".to_owned(),
            apt_packages: [
                "bash",
                "ca-certificates",
                "coreutils",
                "curl",
                "git",
                "libnss-myhostname",
                "procps",
                "python3",
                "python3-pip",
                "sudo",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            pip_packages: Vec::new(),
            run: Vec::new(),
            default_user: "user".to_owned(),
            env: BTreeMap::from([("LANG".to_owned(), "C.UTF-8".to_owned())]),
            cpu_count: 2,
            memory_mb: 512,
            disk_mb: 1024,
            start_cmd: None,
            files: Vec::new(),
        }
    }

    /// `code-interpreter`: `base` plus the scientific Python stack and a Jupyter kernel, the
    /// template the `e2b-code-interpreter` SDK asks for (`code-interpreter-v1`).
    ///
    /// Its start command runs the code interpreter server (`templates/code-interpreter/` in
    /// the repository, compiled into the spec) on port 49999 as the default user.
    pub fn code_interpreter() -> TemplateSpec {
        TemplateSpec {
            name: "code-interpreter".to_owned(),
            aliases: vec!["code-interpreter-v1".to_owned()],
            from: Some("base".to_owned()),
            distribution: "bookworm".to_owned(),
            apt_packages: Vec::new(),
            // The kernel stack plus what E2B's code-interpreter template ships and agents use
            // most (docs/code-interpreter.md lists it, and what was left out and why).
            pip_packages: [
                "aiohttp",
                "beautifulsoup4",
                "bokeh",
                "imageio",
                "ipykernel",
                "ipython",
                "joblib",
                "jupyter-client",
                "jupyter-server",
                "matplotlib",
                "nltk",
                "numpy",
                "openpyxl",
                "orjson",
                "pandas",
                "pillow",
                "plotly",
                "pytest",
                "python-docx",
                "pytz",
                "requests",
                "scikit-learn",
                "scipy",
                "seaborn",
                "sympy",
                "tabulate",
                "textblob",
                "tornado",
                "xarray",
                "xlrd",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            // Build matplotlib's font cache now, for the default user, instead of in the
            // user's first plotting cell (several seconds).
            run: vec![
                "HOME=/home/user runuser -u user -- python3 -c 'import matplotlib.pyplot'"
                    .to_owned(),
            ],
            default_user: "user".to_owned(),
            env: BTreeMap::from([
                ("LANG".to_owned(), "C.UTF-8".to_owned()),
                ("MPLBACKEND".to_owned(), "Agg".to_owned()),
            ]),
            cpu_count: 2,
            memory_mb: 1024,
            disk_mb: 2048,
            start_cmd: Some(StartCommand {
                cmd: format!(
                    "exec python3 -u {CODE_INTERPRETER_DIR}/server.py \
                     >>/tmp/.cella-code-interpreter.log 2>&1"
                ),
                user: "user".to_owned(),
                cwd: "/home/user".to_owned(),
            }),
            files: [
                (
                    "server.py",
                    include_str!("../../../../templates/code-interpreter/server.py"),
                ),
                (
                    "protocol.py",
                    include_str!("../../../../templates/code-interpreter/protocol.py"),
                ),
                (
                    "app.py",
                    include_str!("../../../../templates/code-interpreter/app.py"),
                ),
                (
                    "kernel_startup.py",
                    include_str!("../../../../templates/code-interpreter/kernel_startup.py"),
                ),
                (
                    "charts.py",
                    include_str!("../../../../templates/code-interpreter/charts.py"),
                ),
            ]
            .into_iter()
            .map(|(name, contents)| TemplateFile {
                path: format!("{CODE_INTERPRETER_DIR}/{name}"),
                contents: contents.to_owned(),
                executable: false,
            })
            .collect(),
        }
    }

    /// Every builtin template, parents before children.
    pub fn builtins() -> Vec<TemplateSpec> {
        vec![TemplateSpec::base(), TemplateSpec::code_interpreter()]
    }

    /// The builtin template called `name_or_alias` (by name or alias).
    pub fn builtin(name_or_alias: &str) -> Option<TemplateSpec> {
        TemplateSpec::builtins()
            .into_iter()
            .find(|spec| spec.answers_to(name_or_alias))
    }

    /// Whether `name_or_alias` is this template's name or one of its aliases.
    pub fn answers_to(&self, name_or_alias: &str) -> bool {
        self.name == name_or_alias || self.aliases.iter().any(|a| a == name_or_alias)
    }

    /// The build ID: 16 hex digits of SHA-256 over [`BUILDER_VERSION`], the canonical JSON of
    /// the spec and, for a builtin parent, the parent's build ID.
    pub fn build_id(&self) -> String {
        self.build_id_depth(0)
    }

    fn build_id_depth(&self, depth: usize) -> String {
        let mut hasher = Sha256::new();
        hasher.update(BUILDER_VERSION.as_bytes());
        hasher.update(b"\n");
        // Serializing a struct of strings, numbers and a BTreeMap cannot fail; fall back to
        // the Debug form (also deterministic) rather than panicking if it ever did.
        match serde_json::to_vec(self) {
            Ok(json) => hasher.update(&json),
            Err(_) => hasher.update(format!("{self:?}").as_bytes()),
        }
        if let Some(parent) = &self.from {
            hasher.update(b"\nfrom:");
            // Depth bound: a (mis)configured cycle of builtins must not recurse forever.
            match TemplateSpec::builtin(parent) {
                Some(p) if depth < 8 && p.name != self.name => {
                    hasher.update(p.build_id_depth(depth + 1).as_bytes());
                }
                _ => hasher.update(parent.as_bytes()),
            }
        }
        let digest = hasher.finalize();
        hex::encode(&digest[..8])
    }

    /// Check every field; specs come from files and API requests, and their strings end up in
    /// paths and on command lines.
    pub fn validate(&self) -> Result<(), TemplateError> {
        let bad = |what: String| Err(TemplateError::InvalidSpec(what));
        if !is_template_name(&self.name) {
            return bad(format!(
                "template name {:?} must match [a-z0-9][a-z0-9._-]* (at most {MAX_NAME_LEN} chars)",
                self.name
            ));
        }
        for alias in &self.aliases {
            if !is_template_name(alias) {
                return bad(format!("alias {alias:?} must match [a-z0-9][a-z0-9._-]*"));
            }
        }
        if let Some(from) = &self.from
            && (!is_template_name(from) || from == &self.name)
        {
            return bad(format!("invalid parent template {from:?}"));
        }
        if self.distribution.is_empty()
            || self.distribution.len() > MAX_NAME_LEN
            || !self
                .distribution
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad(format!("invalid distribution {:?}", self.distribution));
        }
        check_list("apt_packages", &self.apt_packages, is_apt_package)?;
        check_list("pip_packages", &self.pip_packages, is_pip_requirement)?;
        check_list("run", &self.run, |c| {
            !c.trim().is_empty() && !c.contains('\0')
        })?;
        if !is_user_name(&self.default_user) {
            return bad(format!(
                "default user {:?} must match [a-z_][a-z0-9_-]*",
                self.default_user
            ));
        }
        if self.env.len() > MAX_LIST_LEN {
            return bad(format!("too many env entries (max {MAX_LIST_LEN})"));
        }
        for (key, value) in &self.env {
            if !is_env_key(key) || value.len() > MAX_ENTRY_LEN || value.contains('\0') {
                return bad(format!("invalid env entry {key:?}"));
            }
        }
        if self.cpu_count == 0 || self.memory_mb == 0 || self.disk_mb == 0 {
            return bad("cpu_count, memory_mb and disk_mb must be positive".to_owned());
        }
        if let Some(start) = &self.start_cmd {
            if start.cmd.trim().is_empty()
                || start.cmd.len() > MAX_ENTRY_LEN
                || start.cmd.contains('\0')
            {
                return bad("start_cmd: invalid command".to_owned());
            }
            if !start.user.is_empty() && !is_user_name(&start.user) {
                return bad(format!("start_cmd: invalid user {:?}", start.user));
            }
            if !start.cwd.is_empty() && !is_template_path(&start.cwd) {
                return bad(format!("start_cmd: invalid cwd {:?}", start.cwd));
            }
        }
        if self.files.len() > MAX_LIST_LEN {
            return bad(format!("too many files (max {MAX_LIST_LEN})"));
        }
        for file in &self.files {
            if !is_template_path(&file.path) || file.path.ends_with('/') {
                return bad(format!("files: invalid path {:?}", file.path));
            }
            if file.contents.len() > MAX_FILE_LEN {
                return bad(format!(
                    "files: {} is larger than {MAX_FILE_LEN} bytes",
                    file.path
                ));
            }
        }
        Ok(())
    }
}

fn check_list(
    field: &str,
    items: &[String],
    ok: impl Fn(&str) -> bool,
) -> Result<(), TemplateError> {
    if items.len() > MAX_LIST_LEN {
        return Err(TemplateError::InvalidSpec(format!(
            "{field}: too many entries (max {MAX_LIST_LEN})"
        )));
    }
    match items
        .iter()
        .find(|item| item.len() > MAX_ENTRY_LEN || !ok(item))
    {
        Some(item) => Err(TemplateError::InvalidSpec(format!(
            "{field}: invalid entry {item:?}"
        ))),
        None => Ok(()),
    }
}

/// `[a-z0-9][a-z0-9._-]*`, at most 64 characters. Never `.`/`..`, never a path.
pub fn is_template_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.len() <= MAX_NAME_LEN
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Debian package names (policy §5.6.1), optionally with `:arch`.
fn is_apt_package(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-:".contains(&b))
}

/// A pip requirement specifier (`pandas`, `numpy>=1.26`, `jupyter[server]==1.0`). Passed as
/// one argument without a shell, so the only danger is an option (`-r file`), which a
/// leading letter/digit rules out.
fn is_pip_requirement(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"._-[],<>=!~*; ".contains(&b))
}

/// An absolute path inside the sandbox: starts with `/`, no `.`/`..` components, no NUL,
/// not `/` itself.
pub fn is_template_path(s: &str) -> bool {
    s.len() > 1
        && s.len() <= MAX_PATH_LEN
        && s.starts_with('/')
        && !s.contains('\0')
        && s.split('/').skip(1).all(|c| c != "." && c != "..")
        && !s.contains("//")
}

/// `[a-z_][a-z0-9_-]*`, at most 32 characters (useradd's limit).
fn is_user_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b == b'_')
        && s.len() <= 32
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
}

fn is_env_key(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && s.len() <= 256
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    type Mutation = Box<dyn Fn(&mut TemplateSpec)>;

    #[test]
    fn build_id_is_stable_and_16_hex() {
        let a = TemplateSpec::base().build_id();
        let b = TemplateSpec::base().build_id();
        assert_eq!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn base_build_id_is_unchanged_by_optional_fields() {
        // Specs without a start command or files serialize exactly as before those fields
        // existed, so builds made then stay valid.
        assert_eq!(TemplateSpec::base().build_id(), "af0257113ce30398");
        let json = serde_json::to_string(&TemplateSpec::base()).expect("json");
        assert!(
            !json.contains("start_cmd") && !json.contains("files"),
            "{json}"
        );
    }

    #[test]
    fn code_interpreter_carries_its_server() {
        let spec = TemplateSpec::code_interpreter();
        let start = spec.start_cmd.as_ref().expect("start command");
        assert!(start.cmd.contains("/opt/cella/code-interpreter/server.py"));
        assert_eq!(start.user, "user");
        let server = spec
            .files
            .iter()
            .find(|f| f.path == "/opt/cella/code-interpreter/server.py")
            .expect("server file");
        assert!(server.contents.contains("49999"));
        let mut changed = spec.clone();
        changed.files[0].contents.push('\n');
        assert_ne!(changed.build_id(), spec.build_id());
    }

    #[test]
    fn build_id_changes_with_every_field() {
        let base = TemplateSpec::base();
        let id = base.build_id();
        let mutations: Vec<(&str, Mutation)> = vec![
            ("name", Box::new(|s| s.name.push('x'))),
            ("aliases", Box::new(|s| s.aliases.push("b2".into()))),
            ("from", Box::new(|s| s.from = Some("other".into()))),
            (
                "distribution",
                Box::new(|s| s.distribution = "trixie".into()),
            ),
            ("apt", Box::new(|s| s.apt_packages.push("vim".into()))),
            ("apt order", Box::new(|s| s.apt_packages.reverse())),
            ("pip", Box::new(|s| s.pip_packages.push("requests".into()))),
            ("run", Box::new(|s| s.run.push("true".into()))),
            ("user", Box::new(|s| s.default_user = "alice".into())),
            (
                "env",
                Box::new(|s| {
                    s.env.insert("A".into(), "1".into());
                }),
            ),
            (
                "env value",
                Box::new(|s| {
                    s.env.insert("LANG".into(), "C".into());
                }),
            ),
            ("cpu", Box::new(|s| s.cpu_count += 1)),
            ("memory", Box::new(|s| s.memory_mb += 1)),
            ("disk", Box::new(|s| s.disk_mb += 1)),
            (
                "start",
                Box::new(|s| {
                    s.start_cmd = Some(StartCommand {
                        cmd: "sleep 1".into(),
                        user: String::new(),
                        cwd: String::new(),
                    })
                }),
            ),
            (
                "files",
                Box::new(|s| {
                    s.files.push(TemplateFile {
                        path: "/etc/x".into(),
                        contents: "x".into(),
                        executable: false,
                    })
                }),
            ),
        ];
        let mut seen = std::collections::HashSet::new();
        seen.insert(id.clone());
        for (what, mutate) in mutations {
            let mut spec = base.clone();
            mutate(&mut spec);
            let changed = spec.build_id();
            assert_ne!(changed, id, "changing {what} must change the build id");
            assert!(
                seen.insert(changed),
                "{what} collided with another mutation"
            );
        }
    }

    #[test]
    fn build_id_follows_builtin_parent() {
        let child = TemplateSpec::code_interpreter();
        let mut orphan = child.clone();
        orphan.from = Some("not-a-builtin".into());
        assert_ne!(child.build_id(), orphan.build_id());
    }

    #[test]
    fn builtin_lookup_by_name_and_alias() {
        assert_eq!(
            TemplateSpec::builtin("base").map(|s| s.name),
            Some("base".into())
        );
        assert_eq!(
            TemplateSpec::builtin("code-interpreter-v1").map(|s| s.name),
            Some("code-interpreter".into())
        );
        assert_eq!(
            TemplateSpec::builtin("code-interpreter").map(|s| s.name),
            Some("code-interpreter".into())
        );
        assert!(TemplateSpec::builtin("nope").is_none());
        assert!(TemplateSpec::builtin("").is_none());
    }

    #[test]
    fn builtins_are_valid_and_parents_come_first() {
        let builtins = TemplateSpec::builtins();
        for (i, spec) in builtins.iter().enumerate() {
            spec.validate().expect("builtin spec is valid");
            if let Some(parent) = &spec.from {
                let pos = builtins.iter().position(|p| &p.name == parent);
                assert!(
                    matches!(pos, Some(p) if p < i),
                    "{} before its parent",
                    spec.name
                );
            }
        }
    }

    #[test]
    fn validate_rejects_hostile_fields() {
        let cases: Vec<Mutation> = vec![
            Box::new(|s| s.name = "../etc".into()),
            Box::new(|s| s.name = ".hidden".into()),
            Box::new(|s| s.name = "Base".into()),
            Box::new(|s| s.name = "a/b".into()),
            Box::new(|s| s.name = "x".repeat(65)),
            Box::new(|s| s.aliases.push("".into())),
            Box::new(|s| s.apt_packages.push("--allow-unauthenticated".into())),
            Box::new(|s| s.apt_packages.push("a b".into())),
            Box::new(|s| s.pip_packages.push("-r/etc/shadow".into())),
            Box::new(|s| s.pip_packages.push("x\nY".into())),
            Box::new(|s| s.run.push("   ".into())),
            Box::new(|s| s.default_user = "root; rm".into()),
            Box::new(|s| s.default_user = "1user".into()),
            Box::new(|s| {
                s.env.insert("A=B".into(), "x".into());
            }),
            Box::new(|s| s.distribution = "bookworm stable".into()),
            Box::new(|s| s.from = Some("base".into())), // its own parent
            Box::new(|s| s.cpu_count = 0),
            Box::new(|s| {
                s.files.push(TemplateFile {
                    path: "/opt/../etc/shadow".into(),
                    contents: String::new(),
                    executable: false,
                })
            }),
            Box::new(|s| {
                s.files.push(TemplateFile {
                    path: "relative".into(),
                    contents: String::new(),
                    executable: false,
                })
            }),
            Box::new(|s| {
                s.files.push(TemplateFile {
                    path: "/big".into(),
                    contents: "x".repeat(MAX_FILE_LEN + 1),
                    executable: false,
                })
            }),
            Box::new(|s| {
                s.start_cmd = Some(StartCommand {
                    cmd: " ".into(),
                    user: String::new(),
                    cwd: String::new(),
                })
            }),
            Box::new(|s| {
                s.start_cmd = Some(StartCommand {
                    cmd: "x".into(),
                    user: "root; rm".into(),
                    cwd: String::new(),
                })
            }),
        ];
        for (i, mutate) in cases.into_iter().enumerate() {
            let mut spec = TemplateSpec::base();
            mutate(&mut spec);
            assert!(
                matches!(spec.validate(), Err(TemplateError::InvalidSpec(_))),
                "case {i} must be rejected: {spec:?}"
            );
        }
        let mut ok = TemplateSpec::base();
        ok.pip_packages = vec!["numpy>=1.26".into(), "jupyter[server]==1.0".into()];
        ok.apt_packages.push("g++".into());
        ok.validate().expect("valid");
    }

    #[test]
    fn spec_json_round_trips_and_rejects_unknown_fields() {
        let spec = TemplateSpec::code_interpreter();
        let json = serde_json::to_string(&spec).expect("serialize");
        let back: TemplateSpec = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, spec);
        let bad = json.replacen('{', "{\"surprise\":1,", 1);
        assert!(serde_json::from_str::<TemplateSpec>(&bad).is_err());
    }
}
