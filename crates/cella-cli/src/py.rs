//! `cella py`: run Python in a code-interpreter sandbox from a shell.
//!
//! It speaks the same `POST /execute` stream (JSON lines on port 49999, reached through the
//! server's proxy) as the `e2b-code-interpreter` SDK, so what works here works there. Output
//! is printed as it arrives; results are printed as text, and image results are written to
//! files (`result-1.png`, ...) because a terminal cannot show them. A cell that raises exits
//! with 1 after printing the traceback.
//!
//! Every line comes from inside a sandbox: lines are bounded, unknown types ignored, and file
//! names are ours, never taken from the stream.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::pin::pin;

use anyhow::{Context, bail};
use base64::Engine as _;
use cella_api::NewSandbox;
use cella_client::Client;
use serde_json::Value;

use crate::args::parse_key_value;
use crate::sandbox::{EXIT_INTERRUPTED, ServerOpts, Signals, access_token};

/// Port of the code interpreter server inside the sandbox.
const CODE_INTERPRETER_PORT: u16 = 49999;
/// Longest stream line accepted (a line carries whole images, base64).
const MAX_LINE: usize = 64 * 1024 * 1024;
/// Largest code accepted from a file or stdin.
const MAX_CODE: u64 = 8 * 1024 * 1024;

/// `cella py`.
#[derive(Debug, clap::Args)]
pub struct PyArgs {
    #[command(flatten)]
    server: ServerOpts,
    /// Template of the sandbox created for the code.
    #[arg(long, short = 't', default_value = "code-interpreter")]
    template: String,
    /// Run in this existing sandbox (its variables persist between calls) instead of a fresh
    /// one that is destroyed afterwards.
    #[arg(long, short = 's', value_name = "ID")]
    sandbox: Option<String>,
    /// Lifetime of the created sandbox in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Interrupt the code after this many seconds (the context stays usable).
    #[arg(long, value_name = "SECS")]
    exec_timeout: Option<f64>,
    /// Environment variable for this execution (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// Directory image results are written to.
    #[arg(long, short = 'o', default_value = ".")]
    out_dir: PathBuf,
    /// Read the code from this file (`-`: stdin).
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with = "code")]
    file: Option<PathBuf>,
    /// Python code to run.
    #[arg(value_name = "CODE", required_unless_present = "file")]
    code: Option<String>,
}

/// What one execution produced, for the exit code.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    errors: usize,
    files: Vec<PathBuf>,
    ended: bool,
}

/// Splits a byte stream into lines, refusing lines longer than [`MAX_LINE`].
#[derive(Debug, Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn push(&mut self, chunk: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let rest = self.buf.split_off(pos + 1);
            let mut line = std::mem::replace(&mut self.buf, rest);
            line.pop();
            out.push(line);
        }
        if self.buf.len() > MAX_LINE {
            bail!("the code interpreter sent a line longer than {MAX_LINE} bytes");
        }
        Ok(out)
    }

    fn finish(self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then_some(self.buf)
    }
}

/// Handles one stream line: prints output, writes images. Unknown or malformed lines are
/// ignored (newer servers may add types).
fn handle_line(
    line: &[u8],
    out_dir: &Path,
    summary: &mut Summary,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<()> {
    let Ok(event) = serde_json::from_slice::<Value>(line) else {
        return Ok(());
    };
    let text = |key: &str| event.get(key).and_then(Value::as_str).unwrap_or_default();
    match event.get("type").and_then(Value::as_str) {
        Some("stdout") => {
            stdout.write_all(text("text").as_bytes())?;
            stdout.flush()?;
        }
        Some("stderr") => {
            stderr.write_all(text("text").as_bytes())?;
            stderr.flush()?;
        }
        Some("result") => {
            let is_main = event.get("is_main_result").and_then(Value::as_bool) == Some(true);
            let mut wrote = false;
            for (key, ext) in [("png", "png"), ("jpeg", "jpg"), ("svg", "svg")] {
                let Some(data) = event.get(key).and_then(Value::as_str) else {
                    continue;
                };
                let bytes = if key == "svg" {
                    data.as_bytes().to_vec()
                } else {
                    base64::engine::general_purpose::STANDARD
                        .decode(data.trim())
                        .with_context(|| format!("decoding a {key} result"))?
                };
                let path = out_dir.join(format!("result-{}.{ext}", summary.files.len() + 1));
                std::fs::write(&path, bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
                writeln!(stderr, "cella: wrote {}", path.display())?;
                summary.files.push(path);
                wrote = true;
            }
            // A figure's text is just `<Figure size ...>`; print text for everything else.
            if (is_main || !wrote)
                && let Some(t) = event.get("text").and_then(Value::as_str)
            {
                writeln!(stdout, "{t}")?;
            }
        }
        Some("error") => {
            summary.errors += 1;
            let traceback = text("traceback");
            if traceback.is_empty() {
                writeln!(stderr, "{}: {}", text("name"), text("value"))?;
            } else {
                writeln!(stderr, "{traceback}")?;
            }
        }
        Some("end_of_execution") => summary.ended = true,
        _ => {}
    }
    Ok(())
}

fn read_code(args: &PyArgs) -> anyhow::Result<String> {
    if let Some(code) = &args.code {
        return Ok(code.clone());
    }
    let mut code = String::new();
    match args.file.as_deref() {
        Some(p) if p == Path::new("-") => {
            std::io::stdin()
                .take(MAX_CODE)
                .read_to_string(&mut code)
                .context("reading code from stdin")?;
        }
        Some(p) => {
            std::fs::File::open(p)
                .and_then(|f| f.take(MAX_CODE).read_to_string(&mut code))
                .with_context(|| format!("reading {}", p.display()))?;
        }
        None => bail!("give the code as an argument or with --file"),
    }
    Ok(code)
}

/// Runs `body` through `POST /execute` in sandbox `id` and handles the stream.
async fn execute(
    client: &Client,
    id: &str,
    token: &str,
    body: &Value,
    out_dir: &Path,
) -> anyhow::Result<Summary> {
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/execute", client.base_url()))
        .header("E2b-Sandbox-Id", id)
        .header("E2b-Sandbox-Port", CODE_INTERPRETER_PORT.to_string())
        .header("X-Access-Token", token)
        .json(body)
        .send()
        .await
        .context("sending the code")?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!(
            "the code interpreter answered {status}: {}",
            crate::output::sanitize(text.trim())
        );
    }
    let mut resp = resp;
    let mut lines = Lines::default();
    let mut summary = Summary::default();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    while let Some(chunk) = resp.chunk().await.context("reading the output")? {
        for line in lines.push(&chunk)? {
            handle_line(&line, out_dir, &mut summary, &mut stdout, &mut stderr)?;
        }
    }
    if let Some(line) = lines.finish() {
        handle_line(&line, out_dir, &mut summary, &mut stdout, &mut stderr)?;
    }
    if !summary.ended {
        bail!("the code interpreter's stream ended early");
    }
    Ok(summary)
}

/// `cella py`.
pub async fn run(args: PyArgs) -> anyhow::Result<u8> {
    let code = read_code(&args)?;
    let client = args.server.client()?;
    let mut body = serde_json::json!({
        "code": code,
        "env_vars": args.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
    });
    if let Some(t) = args.exec_timeout {
        body["timeout"] = serde_json::json!(t);
    }
    let mut signals = Signals::new();
    let (id, token, owned) = match &args.sandbox {
        Some(id) => (id.clone(), access_token(&client, id).await?, false),
        None => {
            let req = NewSandbox {
                template_id: args.template.clone(),
                timeout: Some(args.timeout),
                ..Default::default()
            };
            let mut create = pin!(client.create_sandbox(&req));
            let sandbox = tokio::select! {
                r = &mut create => r.context("creating the sandbox")?,
                () = signals.recv() => {
                    eprintln!("cella: interrupted; removing the sandbox being created");
                    if let Ok(s) = create.await {
                        let _ = client.kill_sandbox(&s.sandbox_id).await;
                    }
                    return Ok(EXIT_INTERRUPTED);
                }
            };
            let token = sandbox.envd_access_token.clone().with_context(|| {
                format!(
                    "the server did not return an access token for sandbox {}",
                    sandbox.sandbox_id
                )
            })?;
            (sandbox.sandbox_id, token, true)
        }
    };
    let outcome = tokio::select! {
        r = execute(&client, &id, &token, &body, &args.out_dir) => r.map(Some),
        () = signals.recv() => Ok(None),
    };
    if owned && let Err(e) = client.kill_sandbox(&id).await {
        eprintln!(
            "cella: warning: could not destroy sandbox {id} ({}); it ends at its timeout",
            crate::one_line(&anyhow::Error::from(e))
        );
    }
    match outcome? {
        Some(summary) if summary.errors > 0 => Ok(1),
        Some(_) => Ok(0),
        None => Ok(EXIT_INTERRUPTED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_chunks() {
        let mut l = Lines::default();
        assert!(l.push(b"{\"a\"").expect("push").is_empty());
        let got = l.push(b":1}\n{\"b\":2}\n{\"c\"").expect("push");
        assert_eq!(got, vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        assert_eq!(l.finish(), Some(b"{\"c\"".to_vec()));
        let mut l = Lines::default();
        assert!(l.push(&vec![b'x'; MAX_LINE + 1]).is_err());
    }

    #[test]
    fn events_print_output_and_write_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut summary = Summary::default();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG fake");
        let lines = [
            r#"{"type":"number_of_executions","execution_count":1}"#.to_owned(),
            r#"{"type":"stdout","text":"hello\n","timestamp":"t"}"#.to_owned(),
            r#"{"type":"stderr","text":"warn\n","timestamp":"t"}"#.to_owned(),
            format!(
                r#"{{"type":"result","text":"<Figure>","png":"{png}","is_main_result":false}}"#
            ),
            r#"{"type":"result","text":"42","is_main_result":true}"#.to_owned(),
            r#"{"type":"keepalive"}"#.to_owned(),
            r#"{"type":"something_new","x":1}"#.to_owned(),
            "not json at all".to_owned(),
            r#"{"type":"error","name":"ValueError","value":"v","traceback":"Traceback: boom"}"#
                .to_owned(),
            r#"{"type":"end_of_execution"}"#.to_owned(),
        ];
        for line in &lines {
            handle_line(
                line.as_bytes(),
                dir.path(),
                &mut summary,
                &mut out,
                &mut err,
            )
            .expect("handle");
        }
        assert_eq!(String::from_utf8_lossy(&out), "hello\n42\n");
        let err = String::from_utf8_lossy(&err);
        assert!(err.starts_with("warn\ncella: wrote "), "{err}");
        assert!(err.ends_with("Traceback: boom\n"), "{err}");
        assert_eq!(summary.errors, 1);
        assert!(summary.ended);
        assert_eq!(summary.files, vec![dir.path().join("result-1.png")]);
        assert_eq!(
            std::fs::read(&summary.files[0]).expect("read"),
            b"\x89PNG fake"
        );
    }

    #[test]
    fn bad_image_data_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut summary = Summary::default();
        let line = br#"{"type":"result","png":"%%% not base64","is_main_result":false}"#;
        let r = handle_line(
            line,
            dir.path(),
            &mut summary,
            &mut Vec::new(),
            &mut Vec::new(),
        );
        assert!(r.is_err());
        assert!(summary.files.is_empty());
    }
}
