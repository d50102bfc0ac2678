//! Human and JSON output.
//!
//! Human output is for people at a terminal (aligned columns, short times); `--json` is for
//! scripts and prints exactly the server's objects, so scripts do not depend on the layout of
//! the human form.

use std::io::Write;

use serde::Serialize;

/// Our stdout was closed by the reader (`cella ls | head -1`): not an error worth a message;
/// `main` exits quietly with 141 (128 + SIGPIPE), as a program killed by SIGPIPE would.
#[derive(Debug, thiserror::Error)]
#[error("stdout closed")]
pub struct StdoutClosed;

/// Wraps an error from writing our stdout/stderr, recognising a closed pipe.
pub fn write_error(e: std::io::Error, what: &'static str) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context(what)
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|e| write_error(e, "writing stdout"))
}

/// Prints a table with a header row; columns are padded to their widest cell. The last column
/// is not padded (so no trailing spaces).
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    std::io::stdout()
        .lock()
        .write_all(render_table(headers, rows).as_bytes())
        .map_err(|e| write_error(e, "writing stdout"))
}

/// The text of [`print_table`].
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate().take(cols) {
            if i + 1 == cols {
                l.push_str(cell);
            } else {
                l.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 2;
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text.push_str(l.trim_end());
        text.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    text
}

/// Replaces control characters (terminal escapes from a hostile sandbox's metadata or audit
/// details) so they can not drive the user's terminal.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `2024-05-06T07:08:09.010Z` → `2024-05-06 07:08:09` (UTC, for tables).
pub fn short_time(rfc3339: &str) -> String {
    match rfc3339.get(..19) {
        Some(head) if rfc3339.len() >= 20 => head.replacen('T', " ", 1),
        _ => sanitize(rfc3339),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let text = render_table(
            &["ID", "TEMPLATE", "NOTE"],
            &[
                vec!["ia".into(), "base".into(), "x".into()],
                vec!["ilonger".into(), "b".into(), String::new()],
            ],
        );
        assert_eq!(
            text,
            "ID       TEMPLATE  NOTE\nia       base      x\nilonger  b\n"
        );
    }

    #[test]
    fn sanitize_and_short_time() {
        assert_eq!(sanitize("a\u{1b}[31mb\n"), "a?[31mb?");
        assert_eq!(
            short_time("2024-05-06T07:08:09.010Z"),
            "2024-05-06 07:08:09"
        );
        assert_eq!(short_time("bogus"), "bogus");
    }
}
