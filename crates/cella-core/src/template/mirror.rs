//! Finding the Debian mirror to debootstrap from, in the machine's own apt configuration.
//!
//! Users' machines have their own mirrors (a local cache, a corporate proxy, a snapshot), and
//! some can reach only those, so the builder never writes a host name into the code: it takes
//! the mirror apt already uses. Both formats are read: deb822 `.sources` files (`URIs:`) and
//! one-line `sources.list` entries (`deb [options] URI suite components`).

use std::path::{Path, PathBuf};

use super::TemplateError;

/// Largest apt sources file read; real ones are a few hundred bytes.
const MAX_SOURCES_FILE: u64 = 1 << 20;

/// One `deb` source found in the apt configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    /// Archive URI (`http://deb.debian.org/debian`).
    pub uri: String,
    /// Suites (`bookworm`, `bookworm-updates`).
    pub suites: Vec<String>,
}

impl AptSource {
    /// A security archive (`debian-security`, `bookworm-security`): it only carries updates, so
    /// it cannot be a debootstrap mirror.
    fn is_security(&self) -> bool {
        self.uri.contains("security") || self.suites.iter().any(|s| s.contains("security"))
    }
}

/// The apt sources files of a machine whose apt configuration is in `etc_apt` (`/etc/apt`):
/// `sources.list`, then `sources.list.d/*.list` and `*.sources` in name order (as apt reads
/// them). Missing files are simply not listed.
pub fn apt_source_files(etc_apt: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let list = etc_apt.join("sources.list");
    if list.is_file() {
        files.push(list);
    }
    if let Ok(entries) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut parts: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("list" | "sources")
                    )
            })
            .collect();
        parts.sort();
        files.extend(parts);
    }
    files
}

/// Every enabled `deb` source in `files` (deb822 when the name ends in `.sources`, one-line
/// format otherwise), in file order. Unreadable files are skipped.
pub fn parse_apt_sources(files: &[PathBuf]) -> Vec<AptSource> {
    let mut sources = Vec::new();
    for file in files {
        let Some(text) = read_bounded(file) else {
            continue;
        };
        if file.extension().and_then(|e| e.to_str()) == Some("sources") {
            sources.extend(parse_deb822(&text));
        } else {
            sources.extend(parse_one_line(&text));
        }
    }
    sources
}

/// The mirror to debootstrap `distribution` from: the first non-security source that carries
/// that suite, else the first non-security source at all (a bookworm host's mirror also
/// serves trixie).
pub fn find_mirror(files: &[PathBuf], distribution: &str) -> Result<String, TemplateError> {
    let sources = parse_apt_sources(files);
    let usable: Vec<&AptSource> = sources
        .iter()
        .filter(|s| !s.is_security() && is_fetchable_uri(&s.uri))
        .collect();
    usable
        .iter()
        .find(|s| s.suites.iter().any(|suite| suite == distribution))
        .or_else(|| usable.first())
        .map(|s| s.uri.trim_end_matches('/').to_owned())
        .ok_or_else(|| {
            TemplateError::NoMirror(format!(
                "no usable `deb` source in {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

fn is_fetchable_uri(uri: &str) -> bool {
    ["http://", "https://", "file:/", "ftp://"]
        .iter()
        .any(|scheme| uri.starts_with(scheme))
}

fn read_bounded(path: &Path) -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_SOURCES_FILE).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// deb822: stanzas separated by blank lines; `Field: value` with continuation lines starting
/// with whitespace; `#` comments. Types, URIs and Suites are whitespace-separated lists.
fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut flush = |fields: &mut Vec<(String, String)>| {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let is_deb = get("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let enabled = get("Enabled").is_none_or(|e| !e.trim().eq_ignore_ascii_case("no"));
        if is_deb && enabled {
            let suites: Vec<String> = get("Suites")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            for uri in get("URIs").unwrap_or_default().split_whitespace() {
                out.push(AptSource {
                    uri: uri.to_owned(),
                    suites: suites.clone(),
                });
            }
        }
        fields.clear();
    };
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut fields);
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            fields.push((key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    flush(&mut fields);
    out
}

/// One-line format: `deb [opt=val ...] URI suite [component ...]`.
fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some(rest) = line.strip_prefix("deb") else {
            continue;
        };
        // `deb-src` and anything else starting with "deb" but not the word itself.
        if !rest.starts_with([' ', '\t']) {
            continue;
        }
        let mut rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('[') {
            match after.split_once(']') {
                Some((_, tail)) => rest = tail.trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(AptSource {
            uri: uri.to_owned(),
            suites: vec![suite.to_owned()],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, text).expect("write");
        path
    }

    const DEB822: &str = "\
Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb deb-src
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

    #[test]
    fn deb822_skips_security_and_takes_matching_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(dir.path(), "sources.list.d/debian.sources", DEB822);
        assert_eq!(
            find_mirror(std::slice::from_ref(&f), "bookworm").expect("mirror"),
            "http://mirror.example.org/debian"
        );
        // Another suite falls back to the first non-security source.
        assert_eq!(
            find_mirror(&[f], "trixie").expect("mirror"),
            "http://mirror.example.org/debian"
        );
    }

    #[test]
    fn deb822_disabled_stanzas_and_continuation_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(
            dir.path(),
            "a.sources",
            "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n\
             Types: deb\nURIs:\n http://one.example/debian\n http://two.example/debian\n\
             Suites: bookworm\n",
        );
        let sources = parse_apt_sources(std::slice::from_ref(&f));
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[1].uri, "http://two.example/debian");
        assert_eq!(
            find_mirror(&[f], "bookworm").expect("mirror"),
            "http://one.example/debian"
        );
    }

    #[test]
    fn one_line_format_with_options_and_comments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(
            dir.path(),
            "sources.list",
            "# deb http://commented.example/debian bookworm main\n\
             deb-src http://src.example/debian bookworm main\n\
             deb http://security.debian.org/debian-security bookworm-security main\n\
             deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://ftp.example.net/debian bookworm main # comment\n\
             deb http://other.example/debian trixie main\n",
        );
        assert_eq!(
            find_mirror(std::slice::from_ref(&f), "bookworm").expect("mirror"),
            "http://ftp.example.net/debian"
        );
        assert_eq!(
            find_mirror(&[f], "trixie").expect("mirror"),
            "http://other.example/debian"
        );
    }

    #[test]
    fn source_files_are_found_in_apt_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "sources.list.d/b.sources", DEB822);
        write(
            dir.path(),
            "sources.list.d/a.list",
            "deb http://a.example/debian bookworm main\n",
        );
        write(
            dir.path(),
            "sources.list.d/c.list.disabled",
            "deb http://c.example/ x y\n",
        );
        write(dir.path(), "sources.list", "# nothing\n");
        let files = apt_source_files(dir.path());
        let names: Vec<_> = files
            .iter()
            .map(|f| {
                f.strip_prefix(dir.path())
                    .expect("prefix")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "sources.list",
                "sources.list.d/a.list",
                "sources.list.d/b.sources"
            ]
        );
        assert_eq!(
            find_mirror(&files, "bookworm").expect("mirror"),
            "http://a.example/debian"
        );
    }

    #[test]
    fn no_usable_source_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(
            dir.path(),
            "sources.list",
            "deb http://security.debian.org/debian-security bookworm-security main\n\
             deb cdrom:[Debian]/ bookworm main\n",
        );
        assert!(matches!(
            find_mirror(&[f], "bookworm"),
            Err(TemplateError::NoMirror(_))
        ));
        assert!(matches!(
            find_mirror(&[], "bookworm"),
            Err(TemplateError::NoMirror(_))
        ));
    }
}
