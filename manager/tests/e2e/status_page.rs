//! The status page in a real headless Chromium (Debian `chromium`; `scripts/test` installs
//! it), driven over the DevTools protocol on `--remote-debugging-pipe`: the page shows the
//! instances, a real mouse click on one's `logs` button opens its log lines, a line a plugin
//! wrote as HTML shows as text, and the phone layout stacks the table. Screenshots go to
//! `target/status-page.png` and `target/status-page-phone.png`.

use std::{path::PathBuf, process::Stdio, time::Duration};

use mesh::{Address, Channel};
use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, ChildStdout, Command},
};

use crate::{
    admin::{ADMIN, admin_address},
    support::{DEADLINE, Mesh, echo_plugin, script, short_tempdir},
};

/// A headless Chromium and one page in it, spoken to over the DevTools pipe (fd 3 in, fd 4
/// out, each message ended by a NUL byte).
struct Browser {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    next: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let mut command = Command::new("sh");
        // The pipe's ends become Chromium's fd 3 and 4 without any unsafe pre-exec code.
        command
            .arg("-c")
            .arg("exec 3<&0 4>&1 </dev/null >/dev/null; exec \"$0\" \"$@\"")
            .arg(&chromium)
            .args([
                "--headless",
                "--remote-debugging-pipe",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()));
        if nix::unistd::geteuid().is_root() {
            // Chromium's sandbox refuses to run as root.
            command.arg("--no-sandbox");
        }
        command
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(profile.path().join("stderr")).unwrap())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot run {chromium}: {e}; install Debian's chromium (scripts/test does)")
        });
        let to = child.stdin.take().unwrap();
        let from = BufReader::new(child.stdout.take().unwrap());
        let mut browser = Browser {
            child,
            to,
            from,
            next: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = browser
            .send(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let target = target["targetId"].as_str().unwrap().to_owned();
        let attached = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser
    }

    /// Sends one command and waits for its answer (events in between are skipped).
    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).await.unwrap();
        let reading = async {
            loop {
                let mut buffer = Vec::new();
                let n = self.from.read_until(0, &mut buffer).await.unwrap();
                assert!(n > 0, "chromium closed the DevTools pipe");
                buffer.pop();
                let answer: Value = serde_json::from_slice(&buffer).unwrap();
                if answer["id"] == id {
                    if let Some(error) = answer.get("error") {
                        panic!("{method}: {error}");
                    }
                    return answer["result"].clone();
                }
            }
        };
        tokio::time::timeout(DEADLINE, reading)
            .await
            .unwrap_or_else(|_| panic!("chromium did not answer {method}"))
    }

    /// A command to the page.
    async fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    /// Evaluates `expression` in the page; its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .page(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is true.
    async fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.eval(expression).await != json!(true) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page never showed {what}; it shows: {}",
                self.eval("document.body.innerText").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.page(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .await;
    }

    /// A left click with the mouse at the middle of the element `selector` matches.
    async fn click(&mut self, selector: &str) {
        let at = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({selector:?}); e.scrollIntoView({{block: 'center'}}); \
                 const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await;
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.page(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await;
        }
    }

    /// A PNG of the page as it is now, written to `path`.
    async fn screenshot(&mut self, path: &PathBuf) {
        let shot = self
            .page(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let png = decode_base64(shot["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.send(None, "Browser.close", json!({})),
        )
        .await;
        if let Some(pid) = self.child.id() {
            // The renderer and helpers are in its process group.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait().await;
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|chunk| {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &d)| n | (u32::from(d) << (18 - 6 * i)));
            let bytes = n.to_be_bytes();
            bytes[1..chunk.len()].to_vec()
        })
        .collect()
}

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

#[tokio::test]
async fn the_status_page_shows_instances_and_their_logs_in_a_real_browser() {
    // An echo plugin whose first line is HTML: the page must show it as text.
    let dir = short_tempdir();
    let plugin = script(
        dir.path(),
        "echo-html",
        &format!(
            "echo '<img id=injected src=x onerror=\"document.title=1\"> <b>bold</b>'\nexec {}",
            echo_plugin().display()
        ),
    );
    let plugins = format!(
        "[[plugin]]\nname = \"echo\"\ncommand = \"{}\"\ninstances = 2\n",
        plugin.display()
    );
    let mesh = Mesh::start_with(ADMIN, &plugins).await;
    let addr = admin_address(&mesh).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let channel = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let mut client = EchoClient::new(channel);
    for i in 0..20 {
        let request = EchoRequest {
            message: format!("call {i}"),
        };
        client.echo(request).await.unwrap();
    }
    let status = mesh.status().await;
    let pid_of = |id: &str| {
        status["plugins"][0]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap()["pid"]
            .clone()
    };

    let mut browser = Browser::start().await;
    browser.viewport(1280, 800, false).await;
    browser
        .page("Page.navigate", json!({ "url": format!("http://{addr}/") }))
        .await;
    browser
        .wait_for(
            "both instances ready",
            "document.querySelectorAll('tr[data-instance-row] .state-ready').length === 2",
        )
        .await;
    // What a user reads: each instance's id, state and the pid `mesh status` reports.
    let rows = browser
        .eval(
            "[...document.querySelectorAll('tr[data-instance-row]')].map(r => \
             Object.fromEntries([...r.querySelectorAll('td[data-label]')].map(c => [c.dataset.label, c.innerText])))",
        )
        .await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in rows {
        let id = row["instance"].as_str().unwrap();
        assert_eq!(row["state"], "ready", "{row}");
        assert_eq!(row["pid"], pid_of(id).to_string(), "{row}");
        assert_eq!(row["restarts"], "0", "{row}");
    }
    let heading = browser
        .eval("document.querySelector('.plugin-head').innerText")
        .await;
    let heading = heading.as_str().unwrap();
    assert!(
        heading.contains("plugin.echo") && heading.contains("2/2 ready"),
        "{heading}"
    );
    // Calls per second appear once two samples of the window span the calls made.
    browser
        .wait_for(
            "a call rate",
            "/[0-9.]+ calls\\/s/.test(document.querySelector('.plugin-head').innerText) && \
             !document.querySelector('.plugin-head').innerText.includes('– calls/s')",
        )
        .await;

    // A real click on echo-0's logs button opens its lines, and only its own.
    browser.click("button[data-instance='echo-0']").await;
    browser
        .wait_for(
            "echo-0's log lines",
            "!document.getElementById('logs').hidden && \
             document.getElementById('logs-lines').innerText.includes('echo-plugin echo-0 starting')",
        )
        .await;
    let logs = browser
        .eval("document.getElementById('logs-lines').innerText")
        .await;
    let logs = logs.as_str().unwrap();
    assert!(!logs.contains("echo-1"), "{logs}");
    assert!(
        logs.contains("<img id=injected"),
        "HTML is shown as text: {logs}"
    );
    assert_eq!(
        browser
            .eval("document.getElementById('injected') === null && document.querySelector('#logs-lines b') === null && document.title")
            .await,
        json!("mesh status"),
        "nothing a plugin wrote became markup"
    );
    assert_eq!(
        browser
            .eval("document.getElementById('logs-instance').innerText")
            .await,
        json!("echo-0")
    );
    browser
        .screenshot(&target_dir().join("status-page.png"))
        .await;

    // On a phone the table becomes labelled cards.
    browser.viewport(390, 844, true).await;
    browser
        .wait_for(
            "the phone layout",
            "getComputedStyle(document.querySelector('thead')).display === 'none' && \
             document.documentElement.scrollWidth <= 390",
        )
        .await;
    browser
        .screenshot(&target_dir().join("status-page-phone.png"))
        .await;
    browser.close().await;
}

#[test]
fn base64_decodes() {
    assert_eq!(decode_base64("aGVsbG8="), b"hello");
    assert_eq!(decode_base64("aGk="), b"hi");
    assert_eq!(decode_base64("YWJj"), b"abc");
}
