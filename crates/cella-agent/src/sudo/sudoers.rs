//! A small, tolerant reader of `/etc/sudoers` that only ever grants what E2B-style templates
//! grant: `NOPASSWD: ALL` rules.
//!
//! There are no passwords in a sandbox, so a rule that asks for one can never be satisfied, and
//! the broker cannot enforce command restrictions (`/usr/bin/apt`, `!/bin/sh`, `NOEXEC`), so a
//! rule is honoured only when it allows *every* command without a password. Anything this
//! parser does not understand (aliases, negations, netgroups, restricting tags, odd runas
//! specs) is dropped, never read as an allow: the failure mode is "sudo refuses", not "sudo
//! grants". `Defaults` lines are ignored. Files are read from under a root path so the parser
//! can be tested against a temp dir.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Largest sudoers file read (a larger one is skipped).
const MAX_FILE: u64 = 1024 * 1024;
/// Include nesting limit.
const MAX_DEPTH: usize = 8;
/// Most files read in total.
const MAX_FILES: usize = 128;

/// Who a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// `ALL`.
    All,
    /// A user name.
    User(String),
    /// `#uid`.
    Uid(u32),
    /// `%group`.
    Group(String),
    /// `%#gid`.
    Gid(u32),
}

/// Which target users a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// `(ALL)` / `(ALL:ALL)`: any user.
    Any,
    /// `(root)` or no runas spec: root only.
    Root,
}

/// One honoured rule: principals allowed to run everything without a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Who (any of these).
    pub principals: Vec<Principal>,
    /// As whom.
    pub runas: RunAs,
    /// The rule as written (for `sudo -l`).
    pub text: String,
}

/// The identity asking to elevate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User name (numeric string when the uid has no passwd entry).
    pub name: String,
    /// User ID.
    pub uid: u32,
    /// Every group the process holds: (gid, name when known).
    pub groups: Vec<(u32, Option<String>)>,
}

impl Rule {
    fn applies_to(&self, who: &Identity) -> bool {
        self.principals.iter().any(|p| match p {
            Principal::All => true,
            Principal::User(n) => *n == who.name,
            Principal::Uid(u) => *u == who.uid,
            Principal::Group(n) => who.groups.iter().any(|(_, g)| g.as_deref() == Some(n)),
            Principal::Gid(g) => who.groups.iter().any(|(id, _)| id == g),
        })
    }

    fn allows_target(&self, target_uid: u32) -> bool {
        match self.runas {
            RunAs::Any => true,
            RunAs::Root => target_uid == 0,
        }
    }
}

/// Whether `who` may run anything as the user `target_uid`. uid 0 always may.
pub fn authorize(rules: &[Rule], who: &Identity, target_uid: u32) -> bool {
    who.uid == 0
        || rules
            .iter()
            .any(|r| r.applies_to(who) && r.allows_target(target_uid))
}

/// The rules that apply to `who` (for `sudo -l`).
pub fn rules_for<'a>(rules: &'a [Rule], who: &Identity) -> Vec<&'a Rule> {
    rules.iter().filter(|r| r.applies_to(who)).collect()
}

/// A directive to read more files.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Include {
    File(String),
    Dir(String),
}

/// One logical line: a rule, an include, or nothing we honour.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Rule(Rule),
    Include(Include),
    Ignored,
}

/// Join `\`-continued lines.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for raw in text.lines() {
        let raw = raw.trim_end_matches('\r');
        if let Some(head) = raw.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(raw);
        out.push(std::mem::take(&mut cur));
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Cut a comment: `#` not followed by a digit (`#1000` is a uid).
fn strip_comment(line: &str) -> &str {
    let b = line.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'#' && !b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            return &line[..i];
        }
    }
    line
}

fn parse_include(line: &str) -> Option<Include> {
    let (word, rest) = line.split_once(char::is_whitespace)?;
    let arg = rest.trim();
    if arg.is_empty() || arg.contains(char::is_whitespace) || arg.contains('"') {
        return None;
    }
    match word {
        "@include" | "#include" => Some(Include::File(arg.to_string())),
        "@includedir" | "#includedir" => Some(Include::Dir(arg.to_string())),
        _ => None,
    }
}

fn is_alias_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && !is_alias_name(s)
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'))
}

/// Split a comma list, trimming items; `None` when any item is negated (a list with `!` is a
/// restriction we do not evaluate).
fn list(s: &str) -> Option<Vec<&str>> {
    let items: Vec<&str> = s.split(',').map(str::trim).collect();
    if items.iter().any(|i| i.is_empty() || i.starts_with('!')) {
        return None;
    }
    Some(items)
}

fn principal(item: &str) -> Option<Principal> {
    if item == "ALL" {
        return Some(Principal::All);
    }
    if let Some(g) = item.strip_prefix("%#") {
        return g.parse().ok().map(Principal::Gid);
    }
    if let Some(g) = item.strip_prefix('%') {
        return is_plain_name(g).then(|| Principal::Group(g.to_string()));
    }
    if let Some(u) = item.strip_prefix('#') {
        return u.parse().ok().map(Principal::Uid);
    }
    is_plain_name(item).then(|| Principal::User(item.to_string()))
}

fn runas(spec: &str) -> Option<RunAs> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u.trim(), g.trim()),
        None => (spec.trim(), ""),
    };
    if !matches!(group, "" | "ALL" | "root") {
        return None;
    }
    match user {
        "ALL" => Some(RunAs::Any),
        "root" => Some(RunAs::Root),
        _ => None,
    }
}

/// Tags that neither ask for a password nor restrict what runs.
const NEUTRAL_TAGS: [&str; 9] = [
    "SETENV",
    "LOG_INPUT",
    "NOLOG_INPUT",
    "LOG_OUTPUT",
    "NOLOG_OUTPUT",
    "MAIL",
    "NOMAIL",
    "FOLLOW",
    "NOFOLLOW",
];

/// Parse `users hosts = [(runas)] TAG: ... ALL`; `None` for anything else.
fn parse_rule(line: &str) -> Option<Rule> {
    let (left, right) = line.split_once('=')?;
    // "alice, bob ALL" → "alice,bob ALL"
    let left: String = left.split(',').map(str::trim).collect::<Vec<_>>().join(",");
    let mut words = left.split_whitespace();
    let (users, hosts) = (words.next()?, words.next()?);
    if words.next().is_some() {
        return None;
    }
    let hosts = list(hosts)?;
    if !hosts.contains(&"ALL") {
        return None;
    }
    let principals: Vec<Principal> = list(users)?.into_iter().filter_map(principal).collect();
    if principals.is_empty() {
        return None;
    }
    let mut rest = right.trim();
    let mut run = RunAs::Root;
    if let Some(r) = rest.strip_prefix('(') {
        let (spec, after) = r.split_once(')')?;
        run = runas(spec)?;
        rest = after.trim_start();
    }
    let mut nopasswd = false;
    while let Some((tag, after)) = rest.split_once(':') {
        let tag = tag.trim();
        if !is_alias_name(tag) {
            break;
        }
        match tag {
            "NOPASSWD" => nopasswd = true,
            "PASSWD" => nopasswd = false,
            t if NEUTRAL_TAGS.contains(&t) => {}
            _ => return None,
        }
        rest = after.trim_start();
    }
    if !nopasswd || rest.trim() != "ALL" {
        return None;
    }
    Some(Rule {
        principals,
        runas: run,
        text: line.split_whitespace().collect::<Vec<_>>().join(" "),
    })
}

fn parse_line(line: &str) -> Line {
    let trimmed = line.trim();
    if let Some(inc) = parse_include(trimmed) {
        return Line::Include(inc);
    }
    let body = strip_comment(trimmed).trim();
    if body.is_empty() {
        return Line::Ignored;
    }
    let first = body.split_whitespace().next().unwrap_or_default();
    let keyword = first.split([':', '@', '>', '!']).next().unwrap_or_default();
    if matches!(
        keyword,
        "Defaults" | "User_Alias" | "Runas_Alias" | "Host_Alias" | "Cmnd_Alias" | "Cmd_Alias"
    ) {
        return Line::Ignored;
    }
    match parse_rule(body) {
        Some(r) => Line::Rule(r),
        None => Line::Ignored,
    }
}

/// Parse one file's text: its honoured rules and its include directives.
fn parse_text(text: &str) -> (Vec<Rule>, Vec<Include>) {
    let mut rules = Vec::new();
    let mut includes = Vec::new();
    for l in logical_lines(text) {
        match parse_line(&l) {
            Line::Rule(r) => rules.push(r),
            Line::Include(i) => includes.push(i),
            Line::Ignored => {}
        }
    }
    (rules, includes)
}

/// Reads the sudoers policy under a root directory (`/` in a sandbox).
#[derive(Debug, Clone)]
pub struct Sudoers {
    root: PathBuf,
    owner: u32,
}

struct Walk {
    seen: BTreeSet<PathBuf>,
    rules: Vec<Rule>,
}

impl Sudoers {
    /// Policy files under `root`, honoured only when owned by `owner` (root, 0, in a sandbox)
    /// and not writable by group or others, as sudo requires.
    pub fn new(root: impl Into<PathBuf>, owner: u32) -> Self {
        Sudoers {
            root: root.into(),
            owner,
        }
    }

    /// Map a sandbox path onto the root.
    fn under_root(&self, path: &str, base: &Path) -> Option<PathBuf> {
        if path.contains('%') || path.split('/').any(|c| c == "..") {
            return None;
        }
        Some(match path.strip_prefix('/') {
            Some(rel) => self.root.join(rel),
            None => base.join(path),
        })
    }

    fn read(&self, path: &Path) -> Option<String> {
        use std::io::Read;
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_file() || meta.uid() != self.owner || meta.mode() & 0o022 != 0 {
            tracing::debug!(path = %path.display(), "sudoers file skipped (owner or mode)");
            return None;
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .ok()?
            .take(MAX_FILE + 1)
            .read_to_end(&mut bytes)
            .ok()?;
        if bytes.len() as u64 > MAX_FILE {
            return None;
        }
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn file(&self, walk: &mut Walk, path: PathBuf, depth: usize) {
        if depth > MAX_DEPTH || walk.seen.len() >= MAX_FILES || !walk.seen.insert(path.clone()) {
            return;
        }
        let Some(text) = self.read(&path) else { return };
        let (rules, includes) = parse_text(&text);
        walk.rules.extend(rules);
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for inc in includes {
            match inc {
                Include::File(p) => {
                    if let Some(p) = self.under_root(&p, &base) {
                        self.file(walk, p, depth + 1);
                    }
                }
                Include::Dir(d) => {
                    if let Some(d) = self.under_root(&d, &base) {
                        self.dir(walk, &d, depth + 1);
                    }
                }
            }
        }
    }

    /// Every file of an include dir, in name order, skipping names with `~` or `.` (sudo's
    /// rule, which keeps editor backups and package-manager leftovers out).
    fn dir(&self, walk: &mut Walk, dir: &Path, depth: usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.contains('~') && !n.contains('.'))
            .collect();
        names.sort();
        for n in names {
            self.file(walk, dir.join(n), depth);
        }
    }

    /// All honoured rules: `/etc/sudoers` (and what it includes), then `/etc/sudoers.d/*`.
    pub fn rules(&self) -> Vec<Rule> {
        let mut walk = Walk {
            seen: BTreeSet::new(),
            rules: Vec::new(),
        };
        self.file(&mut walk, self.root.join("etc/sudoers"), 0);
        self.dir(&mut walk, &self.root.join("etc/sudoers.d"), 1);
        walk.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn one(line: &str) -> Option<Rule> {
        match parse_line(line) {
            Line::Rule(r) => Some(r),
            _ => None,
        }
    }

    fn who(name: &str, uid: u32, groups: &[(u32, &str)]) -> Identity {
        Identity {
            name: name.into(),
            uid,
            groups: groups
                .iter()
                .map(|(g, n)| (*g, Some(n.to_string())))
                .collect(),
        }
    }

    #[test]
    fn nopasswd_all_variants() {
        for ok in [
            "user ALL=(ALL:ALL) NOPASSWD: ALL",
            "user ALL=(ALL) NOPASSWD:ALL",
            "user   ALL = (ALL : ALL)   NOPASSWD : ALL",
            "user ALL=(ALL) SETENV: NOPASSWD: ALL",
            "user ALL=(ALL) PASSWD: NOPASSWD: ALL",
            "alice, user ALL=(ALL) NOPASSWD: ALL",
        ] {
            let r = one(ok).unwrap_or_else(|| panic!("{ok:?} should parse"));
            assert_eq!(r.runas, RunAs::Any, "{ok}");
            assert!(
                r.principals.contains(&Principal::User("user".into())),
                "{ok}"
            );
        }
        let root_only = one("user ALL=(root) NOPASSWD: ALL").expect("root");
        assert_eq!(root_only.runas, RunAs::Root);
        let implicit = one("user ALL = NOPASSWD: ALL").expect("no runas");
        assert_eq!(implicit.runas, RunAs::Root);
        assert_eq!(
            one("%sudo ALL=(ALL:ALL) NOPASSWD: ALL")
                .expect("group")
                .principals,
            vec![Principal::Group("sudo".into())]
        );
        assert_eq!(
            one("#1000 ALL=(ALL) NOPASSWD: ALL # trailing")
                .expect("uid")
                .principals,
            vec![Principal::Uid(1000)]
        );
        assert_eq!(
            one("%#27 ALL=(ALL) NOPASSWD: ALL").expect("gid").principals,
            vec![Principal::Gid(27)]
        );
    }

    #[test]
    fn anything_else_never_allows() {
        for bad in [
            "user ALL=(ALL:ALL) ALL",                           // needs a password
            "user ALL=(ALL) NOPASSWD: ALL, !/bin/sh",           // restricted
            "user ALL=(ALL) NOPASSWD: /usr/bin/apt",            // one command
            "user ALL=(ALL) NOPASSWD: PASSWD: ALL",             // last tag wins
            "user ALL=(ALL) NOEXEC: NOPASSWD: ALL",             // restriction we cannot enforce
            "user ALL=(ALL) NOPASSWD: NOSETENV: ALL",           // ditto
            "user ALL=(bob) NOPASSWD: ALL",                     // other runas
            "user ALL=(:ALL) NOPASSWD: ALL",                    // group only
            "user ALL=(ALL:wheel) NOPASSWD: ALL",               // odd group
            "user sandbox=(ALL) NOPASSWD: ALL",                 // host we do not match
            "user ALL,!sandbox=(ALL) NOPASSWD: ALL",            // negated host
            "ALL,!user ALL=(ALL) NOPASSWD: ALL",                // negated user
            "ADMINS ALL=(ALL) NOPASSWD: ALL",                   // alias, unresolved
            "+netgroup ALL=(ALL) NOPASSWD: ALL",                // netgroup
            "\"user\" ALL=(ALL) NOPASSWD: ALL",                 // quoting
            "Defaults:user !authenticate",                      // defaults ignored
            "User_Alias ADMINS = user",                         // aliases ignored
            "Cmnd_Alias ALLCMD = ALL",                          // ditto
            "user ALL=(ALL) NOPASSWD: ALL : other = (ALL) ALL", // host sections
            "# user ALL=(ALL) NOPASSWD: ALL",                   // comment
            "user ALL=(ALL NOPASSWD: ALL",                      // unbalanced
            "garbage",
            "",
        ] {
            assert_eq!(one(bad), None, "{bad:?} must not allow");
        }
        // A negation-free list keeps its understood items.
        assert_eq!(
            one("ADMINS, user ALL=(ALL) NOPASSWD: ALL")
                .expect("mixed")
                .principals,
            vec![Principal::User("user".into())]
        );
    }

    #[test]
    fn continuation_comments_and_includes() {
        let (rules, inc) = parse_text(
            "# header\n\
             Defaults env_reset\n\
             user ALL=(ALL) \\\n   NOPASSWD: ALL\n\
             #includedir /etc/sudoers.d\n\
             @include /etc/sudoers.local\n\
             #include\n\
             @includedir two words\n",
        );
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].text, "user ALL=(ALL) NOPASSWD: ALL");
        assert_eq!(
            inc,
            vec![
                Include::Dir("/etc/sudoers.d".into()),
                Include::File("/etc/sudoers.local".into())
            ]
        );
    }

    #[test]
    fn authorization() {
        let rules = vec![
            one("user ALL=(ALL:ALL) NOPASSWD: ALL").expect("r"),
            one("%admin ALL=(root) NOPASSWD: ALL").expect("r"),
        ];
        assert!(authorize(&rules, &who("user", 1000, &[]), 0));
        assert!(authorize(&rules, &who("user", 1000, &[]), 65534));
        assert!(authorize(&rules, &who("carol", 1001, &[(50, "admin")]), 0));
        assert!(!authorize(
            &rules,
            &who("carol", 1001, &[(50, "admin")]),
            1000
        ));
        assert!(!authorize(&rules, &who("bob", 1002, &[(1002, "bob")]), 0));
        assert!(
            authorize(&[], &who("root", 0, &[]), 1000),
            "root always may"
        );
        assert_eq!(rules_for(&rules, &who("bob", 1002, &[])).len(), 0);
        assert_eq!(rules_for(&rules, &who("user", 1000, &[])).len(), 1);
    }

    fn write(root: &Path, rel: &str, text: &str, mode: u32) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn files_and_include_dirs() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path();
        // SAFETY: getuid has no memory effects.
        let me = unsafe { libc::getuid() };
        write(
            root,
            "etc/sudoers",
            "root ALL=(ALL:ALL) ALL\n@includedir /etc/sudoers.d\n@include extra\n@include /etc/sudoers\n@include ../../escape\n",
            0o440,
        );
        write(root, "etc/extra", "carol ALL=(ALL) NOPASSWD: ALL\n", 0o440);
        write(
            root,
            "etc/sudoers.d/user",
            "user ALL=(ALL:ALL) NOPASSWD: ALL\n",
            0o440,
        );
        write(
            root,
            "etc/sudoers.d/bob~",
            "bob ALL=(ALL) NOPASSWD: ALL\n",
            0o440,
        );
        write(
            root,
            "etc/sudoers.d/bob.bak",
            "bob ALL=(ALL) NOPASSWD: ALL\n",
            0o440,
        );
        write(
            root,
            "etc/sudoers.d/dave",
            "dave ALL=(ALL) NOPASSWD: ALL\n",
            0o666,
        );
        let rules = Sudoers::new(root, me).rules();
        let names: Vec<&Principal> = rules.iter().flat_map(|r| &r.principals).collect();
        assert_eq!(
            names,
            vec![
                &Principal::User("user".into()),
                &Principal::User("carol".into())
            ],
            "sudoers.d read once, relative include followed, backups and writable files skipped"
        );
        assert!(
            Sudoers::new(root, me.wrapping_add(1)).rules().is_empty(),
            "wrong owner"
        );
        assert!(Sudoers::new("/nonexistent-root", 0).rules().is_empty());
    }

    #[test]
    fn include_loops_terminate() {
        let d = tempfile::tempdir().expect("tempdir");
        // SAFETY: getuid has no memory effects.
        let me = unsafe { libc::getuid() };
        write(d.path(), "etc/sudoers", "@include /etc/a\n", 0o440);
        write(
            d.path(),
            "etc/a",
            "@include /etc/sudoers\n@include b\n",
            0o440,
        );
        write(
            d.path(),
            "etc/b",
            "@include a\nuser ALL=(ALL) NOPASSWD: ALL\n",
            0o440,
        );
        assert_eq!(Sudoers::new(d.path(), me).rules().len(), 1);
    }
}
