//! Parsers for command-line values: `K=V` pairs, `cp` endpoints, `--since` times, and turning
//! a command's argv into one shell line.
//!
//! They are plain functions with their own tests because they decide what reaches the
//! server: a mis-split `K=V` or a local path taken for a sandbox path would silently do the
//! wrong thing.

use std::time::Duration;

/// Parses `KEY=VALUE` (the value may itself contain `=`; the key may not be empty).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

/// One side of `cella cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpEndpoint {
    /// A path on this machine.
    Local(String),
    /// `ID:/path` inside a sandbox.
    Sandbox {
        /// Sandbox ID.
        id: String,
        /// Path inside it.
        path: String,
    },
}

/// `ID:/path` is a sandbox path when `ID` is a valid sandbox ID (lowercase letters and
/// digits) and the path is not empty; anything else is local. Write `./name:x` for a local
/// file whose name looks like a sandbox spec.
pub fn parse_cp_endpoint(s: &str) -> CpEndpoint {
    if let Some((id, path)) = s.split_once(':')
        && cella_api::is_valid_sandbox_id(id)
        && !path.is_empty()
    {
        return CpEndpoint::Sandbox {
            id: id.to_owned(),
            path: path.to_owned(),
        };
    }
    CpEndpoint::Local(s.to_owned())
}

/// `--since`: a duration ago (`10m`, `1h30m`, `2d`), an RFC 3339 time, or Unix milliseconds.
/// Returns Unix milliseconds.
pub fn parse_since(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<i64>()
            .map_err(|_| format!("`{s}` is too large for a Unix time in milliseconds"));
    }
    if let Some(ms) = cella_core::store::parse_rfc3339_ms(s) {
        return Ok(ms);
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now_ms.saturating_sub(duration_ms(d))),
        Err(_) => Err(format!(
            "invalid --since `{s}`: expected a duration like 10m or 2h, an RFC 3339 time, or Unix milliseconds"
        )),
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The line handed to `bash -l -c`. A single argument is used as written, so shell syntax
/// works (`cella run -- 'ls | wc -l'`); several arguments are quoted one by one, so they reach
/// the program exactly as given (`cella run -- printf '%s\n' 'a b'`).
pub fn command_line(argv: &[String]) -> String {
    match argv {
        [one] => one.clone(),
        many => many
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Quotes `s` for POSIX shells (only when needed).
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%^".contains(&b));
    if safe {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_pairs() {
        assert_eq!(parse_key_value("A=1"), Ok(("A".into(), "1".into())));
        assert_eq!(parse_key_value("A="), Ok(("A".into(), String::new())));
        assert_eq!(
            parse_key_value("URL=http://x?a=b"),
            Ok(("URL".into(), "http://x?a=b".into()))
        );
        assert!(parse_key_value("A").is_err());
        assert!(parse_key_value("=1").is_err());
        assert!(parse_key_value("").is_err());
    }

    #[test]
    fn cp_endpoints() {
        assert_eq!(
            parse_cp_endpoint("iabc123:/home/user/x.txt"),
            CpEndpoint::Sandbox {
                id: "iabc123".into(),
                path: "/home/user/x.txt".into()
            }
        );
        assert_eq!(
            parse_cp_endpoint("iabc:rel/path"),
            CpEndpoint::Sandbox {
                id: "iabc".into(),
                path: "rel/path".into()
            }
        );
        for local in [
            "./iabc:/x",
            "/tmp/a:b",
            "file.txt",
            "C:/x",
            "iabc:",
            "IABC:/x",
            "a-b:/x",
            ":/x",
        ] {
            assert_eq!(
                parse_cp_endpoint(local),
                CpEndpoint::Local(local.into()),
                "{local}"
            );
        }
    }

    #[test]
    fn since_values() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_since("10m", now), Ok(now - 600_000));
        assert_eq!(parse_since("1h 30m", now), Ok(now - 5_400_000));
        assert_eq!(parse_since("2d", now), Ok(now - 172_800_000));
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z", now),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            parse_since("2023-11-14T23:13:20.5+01:00", now),
            Ok(1_700_000_000_500)
        );
        assert_eq!(parse_since("1699999999000", now), Ok(1_699_999_999_000));
        assert!(parse_since("", now).is_err());
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("10x", now).is_err());
        assert!(parse_since("99999999999999999999999", now).is_err());
    }

    #[test]
    fn command_lines() {
        assert_eq!(command_line(&["ls | wc -l".into()]), "ls | wc -l");
        assert_eq!(
            command_line(&["printf".into(), "%s\n".into(), "a b".into()]),
            "printf '%s\n' 'a b'"
        );
        assert_eq!(
            command_line(&["echo".into(), "it's".into(), String::new()]),
            r"echo 'it'\''s' ''"
        );
        assert_eq!(
            command_line(&["python3".into(), "-c".into(), "print(1)".into()]),
            "python3 -c 'print(1)'"
        );
        assert_eq!(
            command_line(&["echo".into(), "$HOME".into()]),
            "echo '$HOME'"
        );
    }
}
