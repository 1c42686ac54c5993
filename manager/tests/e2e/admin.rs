//! The admin listener of `mesh up`: `/metrics` parsed as Prometheus text against the calls
//! this test made, the restart counter and `/readyz` across a kill -9, and attacks on the
//! listener itself.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use mesh::{Address, Channel};
use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::{DEADLINE, Mesh};

/// `[admin]` on a free loopback port, with the router's call metrics.
pub const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n[telemetry]\nmetrics = true\n";

/// The admin address `mesh up` printed.
pub async fn admin_address(mesh: &Mesh) -> String {
    let line = mesh.wait_line("admin listening on http://").await;
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned()
}

/// An answer: status code, headers (lower-case names), body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// Sends `request` as it is and reads the answer until the server closes.
pub async fn raw(addr: &str, request: &[u8]) -> Option<Answer> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may close before reading all of an oversized request: that is an answer.
    let _ = stream.write_all(request).await;
    let mut bytes = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut bytes))
        .await
        .expect("the admin listener closes the connection")
        .ok()?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Answer {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// `GET path`, as a browser on this machine would send it.
pub async fn get(addr: &str, path: &str) -> Answer {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    raw(addr, request.as_bytes())
        .await
        .unwrap_or_else(|| panic!("no answer to GET {path}"))
}

/// One sample of a Prometheus text page.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses Prometheus text format 0.0.4 (what `/metrics` serves); panics on a malformed line,
/// so a page Prometheus could not read fails the test.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name_and_labels, value) = match line.rfind('}') {
            Some(end) => (&line[..=end], line[end + 1..].trim()),
            None => line.split_once(' ').expect("name value"),
        };
        let value = value.split_whitespace().next().expect("a value");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match name_and_labels.split_once('{') {
            None => (name_and_labels.trim(), BTreeMap::new()),
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'), line)),
        };
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name in {line:?}"
        );
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

fn parse_labels(mut text: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (key, rest) = text
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad labels in {line:?}"));
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => panic!("bad escape in {line:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label in {line:?}"),
            }
        };
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        text = rest[end + 1..].trim_start_matches(',');
    }
    labels
}

/// The sum of the samples named `name` whose labels include all of `with`.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

pub async fn metrics(addr: &str) -> Vec<Sample> {
    let answer = get(addr, "/metrics").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer.headers["content-type"].starts_with("text/plain; version=0.0.4"),
        "{answer:?}"
    );
    parse_prometheus(&answer.body)
}

/// Asks `/metrics` until `done` holds of it; returns that page.
pub async fn metrics_until(
    addr: &str,
    what: &str,
    done: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let asking = async {
        loop {
            let samples = metrics(addr).await;
            if done(&samples) {
                return samples;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, asking)
        .await
        .unwrap_or_else(|_| panic!("/metrics never showed {what}"))
}

fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
    }
}

#[tokio::test]
async fn metrics_count_the_routed_calls_of_each_instance() {
    let mesh = Mesh::start_with(ADMIN, crate::lifecycle::TWO_ECHOES).await;
    let addr = admin_address(&mesh).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let channel = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let mut client = EchoClient::new(channel);
    let mut answered = BTreeMap::<String, u32>::new();
    const CALLS: u32 = 40;
    for i in 0..CALLS {
        let reply = client.echo(echo(&format!("call {i}"))).await.unwrap();
        *answered.entry(reply.into_inner().instance).or_default() += 1;
    }
    // A service nobody registered: refused by the router, never a label of its own.
    let nowhere = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.nope").unwrap();
    let refused = EchoClient::new(nowhere).echo(echo("anyone?")).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unavailable);

    let calls = "rpc_server_calls_total";
    let echo_ok = [
        ("mesh_service", "plugin.echo"),
        ("rpc_service", "echo.v1.Echo"),
        ("rpc_method", "Echo"),
        ("rpc_grpc_status_code", "0"),
    ];
    // A call is counted when the router drops its answer, a moment after the client has it.
    let samples = metrics_until(&addr, "every call", |s| {
        sum(s, calls, &echo_ok) == f64::from(CALLS)
            && sum(s, "mesh_router_refused_total", &[("reason", "no_instance")]) >= 1.0
    })
    .await;
    for (instance, count) in &answered {
        let mut labels = echo_ok.to_vec();
        labels.push(("mesh_instance", instance));
        assert_eq!(
            sum(&samples, calls, &labels),
            f64::from(*count),
            "{instance}"
        );
        // The duration histogram counts the same calls.
        assert_eq!(
            sum(&samples, "rpc_server_duration_milliseconds_count", &labels),
            f64::from(*count),
            "{instance}"
        );
        let inf = [labels.clone(), vec![("le", "+Inf")]].concat();
        assert_eq!(
            sum(&samples, "rpc_server_duration_milliseconds_bucket", &inf),
            f64::from(*count)
        );
    }
    assert_eq!(answered.len(), 2, "both instances answered: {answered:?}");
    assert!(
        !samples
            .iter()
            .any(|s| s.labels.get("mesh_service").map(String::as_str) == Some("plugin.nope")),
        "an unknown service gets no series"
    );
    assert_eq!(
        sum(
            &samples,
            "rpc_server_active_requests",
            &[("rpc_method", "Echo")]
        ),
        0.0
    );
    assert_eq!(
        sum(
            &samples,
            "mesh_supervisor_ready_instances",
            &[("plugin", "echo")]
        ),
        2.0
    );
}

/// Metrics and traces on together, in one `[telemetry]` table: the router's span wraps the
/// answer after the metrics have read who gave it, so calls still count by instance.
#[tokio::test]
async fn metrics_count_by_instance_with_traces_on_too() {
    // Nothing listens there: the exporter drops the spans, the calls are not affected.
    let endpoint = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let settings = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[telemetry]\nmetrics = true\n\
         otlp_endpoint = \"{endpoint}\"\nsample_ratio = 1\n"
    );
    let mesh = Mesh::start_with(&settings, crate::lifecycle::TWO_ECHOES).await;
    let addr = admin_address(&mesh).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let channel = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let mut client = EchoClient::new(channel);
    let mut answered = BTreeMap::<String, u32>::new();
    const CALLS: u32 = 20;
    for i in 0..CALLS {
        let reply = client.echo(echo(&format!("call {i}"))).await.unwrap();
        *answered.entry(reply.into_inner().instance).or_default() += 1;
    }
    let calls = "rpc_server_calls_total";
    let ok = [
        ("mesh_service", "plugin.echo"),
        ("rpc_grpc_status_code", "0"),
    ];
    let samples = metrics_until(&addr, "every call", |s| {
        sum(s, calls, &ok) == f64::from(CALLS)
    })
    .await;
    for (instance, count) in &answered {
        let mut labels = ok.to_vec();
        labels.push(("mesh_instance", instance));
        assert_eq!(
            sum(&samples, calls, &labels),
            f64::from(*count),
            "{instance}"
        );
    }
    assert_eq!(
        sum(&samples, "mesh_router_refused_total", &[]),
        0.0,
        "no answer counted as the router's own"
    );
}

#[tokio::test]
async fn restarts_are_counted_and_readyz_follows_a_killed_instance() {
    // A backoff long enough that the instance is seen down.
    let plugins = "[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\ninstances = 2\nbackoff_base = \"1500ms\"\n";
    let mesh = Mesh::start_with(ADMIN, plugins).await;
    let addr = admin_address(&mesh).await;
    let before = mesh.wait_instances("plugin.echo", 2).await;
    wait_readyz(&addr, 200).await;
    let samples = metrics(&addr).await;
    assert_eq!(
        sum(
            &samples,
            "mesh_supervisor_restarts_total",
            &[("mesh_instance", "echo-0")]
        ),
        0.0
    );

    let victim = before.iter().find(|i| i.id == "echo-0").unwrap();
    nix::sys::signal::kill(Pid::from_raw(victim.pid as i32), Signal::SIGKILL).unwrap();
    let down = wait_readyz(&addr, 503).await;
    assert!(down.body.contains("echo 1/2 ready"), "{down:?}");
    assert!(down.body.contains("echo-0"), "{down:?}");
    assert!(!down.body.contains("echo-1"), "{down:?}");

    wait_readyz(&addr, 200).await;
    let samples = metrics(&addr).await;
    let restarts = |id| {
        sum(
            &samples,
            "mesh_supervisor_restarts_total",
            &[("plugin", "echo"), ("mesh_instance", id)],
        )
    };
    assert_eq!(restarts("echo-0"), 1.0);
    assert_eq!(restarts("echo-1"), 0.0);
    let ready = [
        ("mesh_instance", "echo-0"),
        ("state", "ready"),
        ("plugin", "echo"),
    ];
    assert_eq!(sum(&samples, "mesh_supervisor_instance_state", &ready), 1.0);
    assert_eq!(get(&addr, "/healthz").await.status, 200);
}

async fn wait_readyz(addr: &str, status: u16) -> Answer {
    let asking = async {
        loop {
            let answer = get(addr, "/readyz").await;
            if answer.status == status {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, asking)
        .await
        .unwrap_or_else(|_| panic!("/readyz never answered {status}"))
}

#[tokio::test]
async fn the_admin_listener_withstands_hostile_clients() {
    let mesh = Mesh::start_with(ADMIN, crate::lifecycle::TWO_ECHOES).await;
    let addr = addr_of(&mesh).await;
    let alive = |addr: String| async move {
        assert_eq!(get(&addr, "/healthz").await.body, "ok\n");
    };

    // The page and its assets carry a strict policy.
    let page = get(&addr, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-security-policy"].contains("default-src 'none'"));
    assert!(page.headers["content-security-policy"].contains("script-src 'self'"));
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    assert_eq!(page.headers["x-frame-options"], "DENY");

    // Oversized head: refused, nothing else harmed.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    if let Some(answer) = raw(&addr, huge.as_bytes()).await {
        assert_eq!(answer.status, 431, "{answer:?}");
    }
    let many = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\n{}\r\n",
        (0..500)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect::<String>()
    );
    if let Some(answer) = raw(&addr, many.as_bytes()).await {
        assert!(answer.status == 431 || answer.status == 400, "{answer:?}");
    }
    alive(addr.clone()).await;

    // Slow headers (slowloris): the connection is closed once the head is overdue.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a connection that never ends its head is closed"
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains("rpc_"),
        "no metrics for half a request"
    );

    // Unknown paths and attempts at files: never a file, never a directory listing.
    for path in [
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/metrics/../../etc/passwd",
        "//etc/passwd",
        "/api/logs?instance=../../../../etc/passwd",
        "/api/logs?instance=%2e%2e%2f",
        "/api/logs?instance=nope-0",
        "/api/logs",
        "/app.js/",
        "/index.html",
    ] {
        let answer = get(&addr, path).await;
        assert!(
            matches!(answer.status, 400 | 404),
            "{path}: {}",
            answer.status
        );
        assert!(!answer.body.contains("root:"), "{path}");
    }

    // Wrong methods.
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT"] {
        let request = format!(
            "{method} /metrics HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let answer = raw(&addr, request.as_bytes()).await;
        if let Some(answer) = answer {
            assert!(matches!(answer.status, 405 | 400), "{method}: {answer:?}");
            if answer.status == 405 {
                assert_eq!(answer.headers["allow"], "GET, HEAD");
            }
        }
    }
    let head = raw(
        &addr,
        format!("HEAD /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!((head.status, head.body.as_str()), (200, ""));

    // A DNS-rebinding page names its own host: refused.
    let rebound = raw(
        &addr,
        b"GET /api/status HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(rebound.status, 421, "{rebound:?}");
    assert!(!rebound.body.contains("plugin.echo"));

    // HTTP/2 and binary garbage: refused, the listener keeps answering.
    let mut garbage = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    garbage.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    if let Some(answer) = raw(&addr, &garbage).await {
        assert!(answer.status >= 400, "{answer:?}");
    }
    let mut binary: Vec<u8> = (0..8192u32).map(|i| (i * 7919 % 251) as u8).collect();
    binary.extend_from_slice(b"\r\n\r\n");
    let _ = raw(&addr, &binary).await;
    alive(addr.clone()).await;

    // Another local user reaches the loopback port, but is not served: the kernel says whose
    // socket it is. (Switching users needs root, which CI has.)
    if nix::unistd::geteuid().is_root() {
        for path in ["/metrics", "/api/status", "/api/logs?instance=echo-0", "/"] {
            let out = std::process::Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "curl",
                    "-s",
                ])
                .args(["-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://{addr}{path}"))
                .output()
                .expect("setpriv and curl (util-linux, curl)");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "403",
                "{path} as nobody"
            );
        }
    }

    // The router is unharmed too.
    let channel = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let reply = EchoClient::new(channel).echo(echo("still")).await.unwrap();
    assert_eq!(reply.into_inner().message, "still");
}

async fn addr_of(mesh: &Mesh) -> String {
    let addr = admin_address(mesh).await;
    mesh.wait_instances("plugin.echo", 2).await;
    addr
}

#[test]
fn the_parser_reads_escapes_and_rejects_garbage() {
    let samples = parse_prometheus(
        "# HELP x y\nx_total{a=\"b\\\"c\",d=\"e\\\\\"} 3\ny 1.5\nz_bucket{le=\"+Inf\"} 2\n",
    );
    assert_eq!(samples[0].labels["a"], "b\"c");
    assert_eq!(samples[0].labels["d"], "e\\");
    assert_eq!(samples[1].value, 1.5);
    assert_eq!(samples[2].labels["le"], "+Inf");
    assert!(std::panic::catch_unwind(|| parse_prometheus("x{a=\"b} 1\n")).is_err());
}

/// A process inside a plugin's tree that lends the test its position: for each connection to
/// its Unix socket it reads one line, `unix` (the router's socket) or `tcp PORT` (127.0.0.1),
/// dials that itself and pipes both ways. Whatever the test sends then comes from the plugin,
/// as the kernel tells it (`SO_PEERCRED`, the socket table).
const SPY: &str = r#"
import os, socket, sys, threading
def pipe(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
def serve(conn):
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            return
        line += byte
    where = line.decode().split()
    if where[0] == "unix":
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(os.environ["MESH_SOCKET"])
    else:
        upstream = socket.create_connection(("127.0.0.1", int(where[1])))
    threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
    pipe(upstream, conn)
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(64)
print("spy: listening", flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// The spy's socket, beside the `[[plugin]]` table of plugin `name` whose command starts it
/// next to echo-plugin (wait for `spy: listening` before [`spy`]).
pub(crate) fn spy_plugin(dir: &std::path::Path, name: &str) -> (String, std::path::PathBuf) {
    let code = dir.join("spy.py");
    std::fs::write(&code, SPY).unwrap();
    let socket = dir.join("spy.sock");
    let command = crate::support::script(
        dir,
        &format!("{name}.sh"),
        &format!(
            "/usr/bin/python3 {} {} &\nexec {}",
            code.display(),
            socket.display(),
            crate::support::echo_plugin().display()
        ),
    );
    let table = format!("[[plugin]]\nname = \"{name}\"\ncommand = {command:?}\n");
    (table, socket)
}

/// A connection made by the spy at `socket` to `to` (`unix`, `tcp PORT`).
pub(crate) async fn spy(socket: &std::path::Path, to: &str) -> tokio::net::UnixStream {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    stream
        .write_all(format!("{to}\n").as_bytes())
        .await
        .unwrap();
    stream
}

/// `GET path` from inside the plugin whose spy listens at `socket`.
async fn spy_get(socket: &std::path::Path, addr: &str, path: &str) -> Answer {
    let port = addr.rsplit(':').next().unwrap();
    let mut stream = spy(socket, &format!("tcp {port}")).await;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut bytes))
        .await
        .expect("the admin listener answers the spy")
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer to the spy's GET {path}: {text:?}"));
    Answer {
        status: head.split_whitespace().nth(1).unwrap().parse().unwrap(),
        headers: HashMap::new(),
        body: body.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_process_is_not_served_other_plugins_logs() {
    let dir = crate::support::short_tempdir();
    let (spy_table, socket) = spy_plugin(dir.path(), "spy");
    let mesh = Mesh::start_with(
        ADMIN,
        &format!("{spy_table}{}", crate::lifecycle::TWO_ECHOES),
    )
    .await;
    let addr = addr_of(&mesh).await;
    mesh.wait_line("spy: listening").await;
    mesh.wait_instances("plugin.spy", 1).await;

    // The spy, of the owner's uid, asks for echo's logs and status: refused, named.
    for path in ["/api/logs?instance=echo-0", "/api/status", "/", "/metrics"] {
        let answer = spy_get(&socket, &addr, path).await;
        assert_eq!(answer.status, 403, "{path}: {answer:?}");
        assert!(
            answer.body.contains("of plugin \"spy\"") && answer.body.contains("/healthz only"),
            "{path}: {answer:?}"
        );
    }
    // Its liveness check is answered.
    let health = spy_get(&socket, &addr, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    // The owner is served meanwhile: echo's logs, and echo's calls.
    let logs = get(&addr, "/api/logs?instance=echo-0").await;
    assert_eq!(logs.status, 200, "{logs:?}");
    assert!(logs.body.contains("\"instance\":\"echo-0\""), "{logs:?}");
    let channel = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let reply = tokio::time::timeout(DEADLINE, EchoClient::new(channel).echo(echo("served")))
        .await
        .expect("echo answers within the deadline")
        .unwrap();
    assert_eq!(reply.into_inner().message, "served");
}

/// Run as uid 65534: keeps `CONNECTIONS` connections to the admin port open (reopening those
/// the listener closes), every other one sending a keep-alive `GET /healthz`, until a line
/// arrives on stdin or 60 s pass; prints `holding N` once they are open, then its tally.
const FLOOD: &str = r#"
import select, socket, sys, threading, time
CONNECTIONS = 80
port = int(sys.argv[1])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
deadline = time.monotonic() + 60
opened = answered = refused_at_once = 0
socks = []
announced = False
while not stop.is_set() and time.monotonic() < deadline:
    while len(socks) < CONNECTIONS:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            refused_at_once += 1
            break
        if opened % 2 == 0:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.setblocking(False)
        socks.append(s)
        opened += 1
    if not announced:
        print("holding", len(socks), flush=True)
        announced = True
    readable, _, _ = select.select(socks, [], [], 0.05)
    for s in readable:
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if b" 403 " in data:
            answered += 1
        if not data:
            socks.remove(s)
            s.close()
print("opened", opened, "answered403", answered, "open_at_end", len(socks), flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_flooding_the_admin_listener_leaves_the_owner_served() {
    // Switching users needs root, which CI has.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to act as uid 65534");
        return;
    }
    let mesh = Mesh::start_with(ADMIN, crate::lifecycle::TWO_ECHOES).await;
    let addr = addr_of(&mesh).await;
    let port = addr.rsplit(':').next().unwrap().to_owned();
    let mut flood = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", FLOOD, &port])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("setpriv and python3");
    let mut out = tokio::io::BufReader::new(flood.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        DEADLINE,
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line),
    )
    .await
    .expect("the flood opens its connections")
    .unwrap();
    assert!(line.starts_with("holding"), "{line:?}");

    // The owner, ten times during the flood, each within its own deadline.
    let started = std::time::Instant::now();
    let mut answered = 0;
    for _ in 0..10 {
        let health = tokio::time::timeout(Duration::from_secs(2), get(&addr, "/healthz")).await;
        if health.is_ok_and(|answer| answer.body == "ok\n") {
            answered += 1;
        }
    }
    let took = started.elapsed();
    // And the router's plugins, meanwhile.
    let channel = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let reply = tokio::time::timeout(DEADLINE, EchoClient::new(channel).echo(echo("served")))
        .await
        .expect("echo answers within the deadline")
        .unwrap();
    assert_eq!(reply.into_inner().message, "served");

    let mut stdin = flood.stdin.take().unwrap();
    stdin.write_all(b"stop\n").await.unwrap();
    let mut tally = String::new();
    tokio::time::timeout(
        DEADLINE,
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut tally),
    )
    .await
    .expect("the flood stops")
    .unwrap();
    eprintln!("admin flood as uid 65534: {line}{tally}owner's /healthz: {answered}/10 in {took:?}");
    assert_eq!(
        answered, 10,
        "the owner's /healthz during the flood ({tally})"
    );
    // The flood did hold connections and was answered 403 (closed after each answer).
    let count = |key: &str| -> usize {
        let words: Vec<&str> = tally.split_whitespace().collect();
        let at = words.iter().position(|w| *w == key).unwrap();
        words[at + 1].parse().unwrap()
    };
    assert!(count("opened") >= 80, "{tally}");
    assert!(count("answered403") >= 1, "{tally}");
    let _ = flood.wait().await;
}
