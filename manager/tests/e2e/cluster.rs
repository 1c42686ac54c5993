//! Many machines: `mesh up` processes sharing one etcd (Debian `etcd-server`, started here on
//! loopback with free ports and a temporary data directory). A client on node A reaches a
//! plugin that runs only on node B through A's router; B's death, return, a revoked lease and
//! an etcd that restarts empty are each followed within the bounds docs/multi-node.md states,
//! and so is a partition: a relay between node A and etcd that stops forwarding, closing nothing.
//! Nodes with `[tls]` forward to each other over mTLS with their `mesh certs` certificates.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh::{Address, Channel};
use mesh_proto::echo::v1::echo_client::EchoClient;
use mesh_router::cluster::etcd::pb;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};
use tonic::Code;

use crate::{
    admin::{ADMIN, admin_address, metrics_until, sum},
    routing::{all_four_kinds, echo},
    support::{DEADLINE, Mesh, grpcurl_ok, short_tempdir},
};

/// The lease time to live these tests give each node.
const TTL: Duration = Duration::from_secs(2);

/// A free loopback port (for servers that cannot be handed a bound socket).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member on loopback, stopped with SIGTERM when dropped.
struct Etcd {
    child: Option<Child>,
    client: u16,
    peer: u16,
    dir: tempfile::TempDir,
    runs: u32,
}

impl Etcd {
    async fn start() -> Etcd {
        let mut etcd = Etcd {
            child: None,
            client: free_port(),
            peer: free_port(),
            dir: short_tempdir(),
            runs: 0,
        };
        etcd.spawn().await;
        etcd
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    /// Starts etcd on a data directory of its own (a fresh one each run: a restarted etcd
    /// that lost everything, the hardest case for the nodes).
    async fn spawn(&mut self) {
        self.runs += 1;
        let data = self.dir.path().join(format!("data-{}", self.runs));
        let log =
            std::fs::File::create(self.dir.path().join(format!("etcd-{}.log", self.runs))).unwrap();
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .arg("--name=mesh-test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=mesh-test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run etcd ({e}): install Debian's etcd-server (scripts/test does)")
            });
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        while !self.ctl(&["endpoint", "health"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "etcd not healthy in {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg("--dial-timeout=1s")
            .arg("--command-timeout=2s")
            .args(args)
            .output()
            .expect("run etcdctl (Debian's etcd-client)")
    }

    /// A KV client on etcd's gRPC API, for writes etcdctl would make slow (many, large).
    fn kv(&self) -> pb::kv_client::KvClient<Channel> {
        let address = Address::Tcp(format!("127.0.0.1:{}", self.client));
        pb::kv_client::KvClient::new(Channel::to_server(address))
    }

    /// etcd's revision now.
    async fn revision(&self) -> i64 {
        let request = pb::RangeRequest {
            key: b"/".to_vec(),
            count_only: true,
            ..Default::default()
        };
        let answer = self.kv().range(request).await.unwrap().into_inner();
        answer.header.expect("a response header").revision
    }

    /// etcd's own count of slow watchers (`etcd_debugging_mvcc_slow_watcher_total` on its
    /// `/metrics`): watchers whose client does not take their events as fast as they come.
    async fn slow_watchers(&self) -> f64 {
        // HTTP/1.0: the page comes whole, not in chunks.
        let addr = format!("127.0.0.1:{}", self.client);
        let page = crate::admin::raw(&addr, b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("etcd answers GET /metrics");
        assert_eq!(page.status, 200, "{page:?}");
        let name = "etcd_debugging_mvcc_slow_watcher_total ";
        let line = page
            .body
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no {name}in etcd's /metrics"));
        line[name.len()..].trim().parse().unwrap()
    }

    /// The leases (decimal) of node `node`'s keys of `service`.
    fn leases(&self, service: &str, node: &str) -> Vec<i64> {
        let prefix = format!("/mesh/v1/services/{service}/{node}/");
        let out = self.ctl(&["get", "--prefix", &prefix, "-w", "json"]);
        if !out.status.success() {
            return Vec::new();
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        json["kvs"]
            .as_array()
            .map(|kvs| kvs.iter().filter_map(|kv| kv["lease"].as_i64()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `[mesh]` settings and `[registry]` of node `name` listening on `port`.
fn node(name: &str, port: u16, etcd: &Etcd) -> (String, String) {
    let settings = format!("listen = \"127.0.0.1:{port}\"\nnode = \"{name}\"\n");
    let registry = format!(
        "[registry]\netcd = [\"{}\"]\nlease_ttl = \"{}s\"\n",
        etcd.endpoint(),
        TTL.as_secs()
    );
    (settings, registry)
}

const ECHO: &str = r#"
[[plugin]]
name = "echo"
command = "{echo}"
"#;

/// Starts node `name` with `plugins`.
async fn start_node(name: &str, etcd: &Etcd, plugins: &str) -> Mesh {
    let (settings, registry) = node(name, free_port(), etcd);
    Mesh::start_with(&settings, &format!("{registry}{plugins}")).await
}

/// A channel that sends every call to `mesh`'s router, which routes it by name.
fn through_router(mesh: &Mesh, service: &str) -> EchoClient<Channel> {
    EchoClient::new(Channel::to_address(Address::Unix(mesh.socket.clone()), service).unwrap())
}

/// Waits until an echo call for plugin.echo through node a's router answers `Ok` (`true`) or
/// fails with UNAVAILABLE naming the service as known nowhere (`false`); returns how long it
/// took.
async fn wait_routed(mesh: &Mesh, routed: bool, within: Duration) -> Duration {
    wait_routed_on(mesh, "a", "plugin.echo", routed, within).await
}

/// [`wait_routed`] for `service` through the router of `mesh`, node `node`.
async fn wait_routed_on(
    mesh: &Mesh,
    node: &str,
    service: &str,
    routed: bool,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let mut client = through_router(mesh, service);
    let nowhere = format!("\"{service}\" has no instance on node {node} nor on any other node");
    let mut last = String::new();
    while started.elapsed() < within {
        match client.echo(echo("ping")).await {
            Ok(_) if routed => return started.elapsed(),
            Err(status)
                if !routed
                    && status.code() == Code::Unavailable
                    && status.message().contains(&nowhere) =>
            {
                return started.elapsed();
            }
            Ok(_) => last = "answered".into(),
            Err(status) => last = format!("{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{service} not {} through node {node} within {within:?}; last: {last}\n{}",
        if routed { "routed" } else { "unroutable" },
        mesh.output()
    );
}

/// `mesh status --json`'s registry part.
async fn registry_status(mesh: &Mesh) -> serde_json::Value {
    mesh.status().await["registry"].clone()
}

async fn wait_registry_state(mesh: &Mesh, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = registry_status(mesh).await;
        if status["state"] == state {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "registry not {state} within {DEADLINE:?}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn socket_endpoint(path: &Path) -> String {
    format!("unix:{}", path.display())
}

#[tokio::test]
async fn a_client_on_node_a_reaches_a_plugin_that_runs_only_on_node_b() {
    let etcd = Etcd::start().await;
    let a = start_node("a", &etcd, "").await;
    let b = start_node("b", &etcd, ECHO).await;
    b.wait_instances("plugin.echo", 1).await;

    // A shows the service with one instance: its own router, standing for node b.
    let gateway = a.wait_instances("plugin.echo", 1).await;
    assert_eq!(gateway[0].endpoint, socket_endpoint(&a.socket));

    // mesh::connect on A, unchanged: all four kinds of call reach B's plugin.
    let mut client = EchoClient::new(a.connect("plugin.echo").await);
    all_four_kinds(&mut client).await;

    // grpcurl through A's router, by name, reflection included.
    let socket = a.socket.display().to_string();
    let listed = grpcurl_ok(&["-unix", "-authority", "plugin.echo", &socket, "list"]);
    assert!(listed.contains("echo.v1.Echo"), "{listed}");
    let answer = grpcurl_ok(&[
        "-unix",
        "-authority",
        "plugin.echo",
        "-d",
        r#"{"message":"across"}"#,
        &socket,
        "echo.v1.Echo/Echo",
    ]);
    assert!(
        answer.contains("across") && answer.contains("echo-0"),
        "{answer}"
    );

    let status = wait_registry_state(&a, "connected").await;
    assert_eq!(status["kind"], "etcd");
    assert_eq!(status["node"], "a");
    assert_eq!(status["nodes"], serde_json::json!(["b"]));
    let table = a.cli_ok(&["status"]).await;
    assert!(
        table.contains("registry: etcd, node a") && table.contains("other nodes: b"),
        "{table}"
    );

    // kill -9 of B: A stops routing to it within the lease's time to live plus one second,
    // and says which service no node has.
    let pid = nix::unistd::Pid::from_raw(b.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let took = wait_routed(&a, false, TTL + Duration::from_secs(1)).await;
    eprintln!("node a stopped routing to the killed node b after {took:?}");

    // B again: routed again.
    let b = b.relaunch().await;
    b.wait_instances("plugin.echo", 1).await;
    wait_routed(&a, true, DEADLINE).await;
    all_four_kinds(&mut client).await;
}

#[tokio::test]
async fn nodes_forward_to_each_other_over_mtls_and_a_plaintext_node_gets_nothing() {
    let etcd = Etcd::start().await;
    let certs = crate::mtls::Certs::make();
    let start = |name: &'static str, plugins: &'static str| {
        let (settings, registry) = node(name, free_port(), &etcd);
        let tables = format!("{registry}{}{plugins}", certs.node_table(name));
        async move { Mesh::start_with(&settings, &tables).await }
    };
    let b = start("b", ECHO).await;
    b.wait_instances("plugin.echo", 1).await;
    let a = start("a", "").await;
    a.wait_instances("plugin.echo", 1).await;

    // A's router dials B's TLS listener with node a's certificate: all four kinds of call.
    let mut client = EchoClient::new(a.connect("plugin.echo").await);
    all_four_kinds(&mut client).await;

    // A node without [tls] learns B from the same etcd, but B's listener takes no plaintext:
    // its calls to plugin.echo never reach B's plugin.
    let c = start_node("c", &etcd, "").await;
    c.wait_instances("plugin.echo", 1).await;
    let refused = through_router(&c, "plugin.echo")
        .echo(echo("plaintext"))
        .await
        .expect_err("a plaintext node's call reached a node that speaks only mTLS");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // ... while A's calls still go.
    through_router(&a, "plugin.echo")
        .echo(echo("still"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_call_forwarded_by_another_router_is_never_forwarded_again() {
    let etcd = Etcd::start().await;
    let a = start_node("a", &etcd, "").await;
    let b = start_node("b", &etcd, ECHO).await;
    b.wait_instances("plugin.echo", 1).await;
    wait_routed(&a, true, DEADLINE).await;

    // As if another router had forwarded it: A must not send it on to B.
    let mut client = through_router(&a, "plugin.echo");
    let mut request = tonic::Request::new(echo("loop"));
    request
        .metadata_mut()
        .insert("mesh-forwarded-by", "c".parse().unwrap());
    let status = client.echo(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("\"plugin.echo\" has no instance on node a")
            && status.message().contains("never forwarded again"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_revoked_lease_and_an_etcd_restart_end_with_every_instance_registered_again() {
    let bound = TTL + Duration::from_secs(2);
    let mut etcd = Etcd::start().await;
    let a = start_node("a", &etcd, "").await;
    let b = start_node("b", &etcd, ECHO).await;
    b.wait_instances("plugin.echo", 1).await;
    wait_routed(&a, true, DEADLINE).await;
    let leases = etcd.leases("plugin.echo", "b");
    assert_eq!(leases.len(), 1, "one key for b's one instance");

    // B's lease revoked by hand: its key goes, and comes back under a new lease.
    let revoked = format!("{:x}", leases[0]);
    let out = etcd.ctl(&["lease", "revoke", &revoked]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = Instant::now();
    loop {
        let now = etcd.leases("plugin.echo", "b");
        if now.len() == 1 && now[0] != leases[0] {
            break;
        }
        assert!(
            started.elapsed() < bound,
            "b not registered again within {bound:?} of its lease's revocation: {now:?}\n{}",
            b.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "registered again {:?} after the revocation",
        started.elapsed()
    );
    assert!(registry_status(&b).await["reregistrations"].as_u64() >= Some(1));
    wait_routed(&a, true, DEADLINE).await;

    // etcd stops: both nodes say so, and A keeps routing to B from its last view.
    etcd.stop();
    let status = wait_registry_state(&a, "unreachable").await;
    assert!(
        status["error"]
            .as_str()
            .unwrap_or_default()
            .contains("127.0.0.1"),
        "{status}"
    );
    let table = a.cli_ok(&["status"]).await;
    assert!(
        table.contains("UNREACHABLE") && table.contains("last view"),
        "{table}"
    );
    let mut client = through_router(&a, "plugin.echo");
    for i in 0..5 {
        let reply = client.echo(echo(&format!("meanwhile {i}"))).await.unwrap();
        assert_eq!(reply.into_inner().message, format!("meanwhile {i}"));
    }

    // etcd back, empty: every live instance registered again within the bound.
    etcd.spawn().await;
    let started = Instant::now();
    while etcd.leases("plugin.echo", "b").len() != 1 {
        assert!(
            started.elapsed() < bound,
            "b not registered again within {bound:?} of etcd's return\n{}",
            b.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "registered again {:?} after etcd came back",
        started.elapsed()
    );
    wait_registry_state(&a, "connected").await;
    wait_routed(&a, true, DEADLINE).await;
    all_four_kinds(&mut EchoClient::new(a.connect("plugin.echo").await)).await;
}

/// A process stopped with SIGSTOP, continued (SIGCONT) when dropped: a failing test never
/// leaves it stopped.
struct Stopped(Pid);

impl Stopped {
    fn new(pid: u32) -> Self {
        let pid = Pid::from_raw(pid as i32);
        kill(pid, Signal::SIGSTOP).unwrap();
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// A second echo plugin under another name: a service that only node C serves.
const LATE: &str = r#"
[[plugin]]
name = "late"
command = "{echo}"
"#;

#[tokio::test]
async fn a_node_whose_watch_was_compacted_lists_again_and_learns_what_it_missed() {
    let etcd = Etcd::start().await;
    // A's lease outlives the seconds it is stopped below: what ends its session must be the
    // compacted watch, not a lost lease.
    let (settings, _) = node("a", free_port(), &etcd);
    let registry = format!(
        "[registry]\netcd = [\"{}\"]\nlease_ttl = \"60s\"\n",
        etcd.endpoint()
    );
    let a = Mesh::start_with(&settings, &registry).await;
    let mut b = start_node("b", &etcd, ECHO).await;
    b.wait_instances("plugin.echo", 1).await;
    wait_routed(&a, true, DEADLINE).await;
    wait_registry_state(&a, "connected").await;

    let mut kv = etcd.kv();
    let c;
    {
        // A stopped, etcd goes on sending A's watch its events, until the connection to A is
        // full and etcd sets the watcher aside as slow: it then keeps no events for it, only
        // the revision it must resume from.
        let _stopped = Stopped::new(a.pid());
        // 64 KiB each: etcd holds 128 responses for a watcher, the connection a few MiB.
        let value = vec![b'x'; 64 << 10];
        let flooding = Instant::now();
        let mut puts = 0;
        while etcd.slow_watchers().await < 1.0 {
            assert!(puts < 2000, "etcd never marked node a's watcher slow");
            let request = pb::PutRequest {
                key: format!("/mesh/v1/flood/{puts}").into_bytes(),
                value: value.clone(),
                ..Default::default()
            };
            kv.put(request).await.unwrap();
            puts += 1;
        }
        eprintln!(
            "etcd marked node a's watcher slow after {puts} puts of 64 KiB in {:?}",
            flooding.elapsed()
        );
        // What A misses: the flood goes, B's instance goes, C's service comes.
        let flood = pb::DeleteRangeRequest {
            key: b"/mesh/v1/flood/".to_vec(),
            range_end: b"/mesh/v1/flood0".to_vec(),
            prev_kv: false,
        };
        kv.delete_range(flood).await.unwrap();
        b.stop_with(Signal::SIGTERM).await;
        c = start_node("c", &etcd, LATE).await;
        c.wait_instances("plugin.late", 1).await;
        let deadline = Instant::now() + DEADLINE;
        while etcd.leases("plugin.late", "c").len() != 1 {
            assert!(
                Instant::now() < deadline,
                "c's key not in etcd\n{}",
                c.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            etcd.leases("plugin.echo", "b").is_empty(),
            "b's key still in etcd after it stopped"
        );
        // Compacted to now: the revisions A's watch would resume from are gone.
        let revision = etcd.revision().await.to_string();
        let out = etcd.ctl(&["compact", &revision]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A goes on: etcd tells its watch it was compacted, and A lists again.
    let resumed = Instant::now();
    let line = a.wait_line("watch revision compacted").await;
    assert!(line.contains("listing again"), "{line}");
    eprintln!(
        "node a listed again {:?} after it went on",
        resumed.elapsed()
    );
    // What the list shows: B's instance gone, C's service there.
    wait_routed(&a, false, DEADLINE).await;
    a.wait_instances("plugin.late", 1).await;
    let reply = through_router(&a, "plugin.late")
        .echo(echo("after the compaction"))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().message, "after the compaction");
    // And the new watch follows: B back, routed again.
    let b = b.relaunch().await;
    b.wait_instances("plugin.echo", 1).await;
    wait_routed(&a, true, DEADLINE).await;
    assert_eq!(registry_status(&a).await["state"], "connected");
}

#[tokio::test]
async fn metrics_say_whether_etcd_is_reachable_and_what_the_other_nodes_serve() {
    let mut etcd = Etcd::start().await;
    let b = start_node("b", &etcd, ECHO).await;
    b.wait_instances("plugin.echo", 1).await;
    let (settings, registry) = node("a", free_port(), &etcd);
    let a = Mesh::start_with(&settings, &format!("{registry}{ADMIN}")).await;
    let addr = admin_address(&a).await;

    let page = metrics_until(&addr, "etcd reachable and b serving plugin.echo", |page| {
        sum(page, "mesh_registry_reachable", &[("backend", "etcd")]) == 1.0
            && sum(
                page,
                "mesh_registry_remote_nodes",
                &[("service", "plugin.echo")],
            ) == 1.0
            && sum(page, "mesh_registry_remote_services", &[("node", "b")]) == 1.0
    })
    .await;
    let since = sum(&page, "mesh_registry_since_contact_seconds", &[]);
    assert!(
        (0.0..TTL.as_secs_f64()).contains(&since),
        "last contact {since} s ago while connected"
    );
    assert_eq!(sum(&page, "mesh_registry_reregistrations_total", &[]), 0.0);

    // etcd stops: not reachable, the last contact ages, the last view stays.
    let stopped = Instant::now();
    etcd.stop();
    let page = metrics_until(&addr, "etcd unreachable", |page| {
        sum(page, "mesh_registry_reachable", &[]) == 0.0
            && sum(page, "mesh_registry_since_contact_seconds", &[]) > since
    })
    .await;
    assert_eq!(
        sum(
            &page,
            "mesh_registry_remote_nodes",
            &[("service", "plugin.echo")]
        ),
        1.0,
        "the last view is kept while etcd is away"
    );
    eprintln!(
        "/metrics said unreachable {:?} after etcd stopped",
        stopped.elapsed()
    );

    // etcd back, empty: reachable again, and A's own lease was granted anew.
    etcd.spawn().await;
    let back = Instant::now();
    metrics_until(&addr, "etcd reachable again", |page| {
        sum(page, "mesh_registry_reachable", &[]) == 1.0
            && sum(page, "mesh_registry_reregistrations_total", &[]) >= 1.0
            && sum(
                page,
                "mesh_registry_remote_nodes",
                &[("service", "plugin.echo")],
            ) == 1.0
    })
    .await;
    eprintln!(
        "/metrics said reachable {:?} after etcd answered",
        back.elapsed()
    );
}

/// A TCP relay on loopback between one node and etcd that the test can cut: while cut it
/// neither reads nor writes on its connections and closes none of them (no FIN, no RST), and
/// the connections it accepts meanwhile carry nothing: packets that vanish, as in a network
/// partition, where only the node's own timeouts can tell. Healed, it forwards again.
struct Relay {
    port: u16,
    cut: watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, gate) = watch::channel(false);
        let accepting = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (down_read, down_write) = down.into_split();
                    let (up_read, up_write) = up.into_split();
                    tokio::join!(
                        relay_one_way(down_read, up_write, gate.clone()),
                        relay_one_way(up_read, down_write, gate),
                    );
                });
            }
        });
        Relay {
            port,
            cut,
            accepting,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops (`true`) or resumes (`false`) forwarding on every connection, old and new.
    fn cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The connections end with the sender: every gate then reports it closed.
        self.accepting.abort();
    }
}

/// Waits until the gate is `cut` (or not); `false` once the relay is gone.
async fn until(gate: &mut watch::Receiver<bool>, cut: bool) -> bool {
    gate.wait_for(|now| *now == cut).await.is_ok()
}

/// Copies `from` to `to` while the gate is open; a cut stops the reading where it is and holds
/// what was read until the gate opens again.
async fn relay_one_way(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0; 16 << 10];
    loop {
        if !until(&mut gate, false).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            open = until(&mut gate, true) => if open { continue } else { return },
        };
        if !until(&mut gate, false).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test]
async fn a_node_cut_off_from_etcd_routes_from_its_last_view_and_registers_again_when_healed() {
    // What docs/multi-node.md states for a partition from etcd.
    let noticed_within = TTL + Duration::from_secs(2);
    let expired_within = TTL + Duration::from_secs(1);
    let registered_within = TTL + Duration::from_secs(2);

    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client).await;
    let b = start_node("b", &etcd, ECHO).await;
    b.wait_instances("plugin.echo", 1).await;
    // A reaches etcd only through the relay, and serves plugin.late, which B has not.
    let (settings, _) = node("a", free_port(), &etcd);
    let registry = format!(
        "[registry]\netcd = [\"{}\"]\nlease_ttl = \"{}s\"\n",
        relay.endpoint(),
        TTL.as_secs()
    );
    let a = Mesh::start_with(&settings, &format!("{registry}{ADMIN}{LATE}")).await;
    a.wait_instances("plugin.late", 1).await;
    let addr = admin_address(&a).await;
    wait_registry_state(&a, "connected").await;
    wait_routed(&a, true, DEADLINE).await;
    wait_routed_on(&b, "b", "plugin.late", true, DEADLINE).await;

    relay.cut(true);
    let cut = Instant::now();
    // B still reads etcd: A's lease expires there, and B stops routing to A's plugin.
    // A hears nothing, and must notice by its own timeouts that etcd is gone.
    let a_noticed = async {
        loop {
            let status = registry_status(&a).await;
            if status["state"] == "unreachable" {
                return (cut.elapsed(), status);
            }
            assert!(
                cut.elapsed() < noticed_within,
                "node a still says {status} {noticed_within:?} after the partition\n{}",
                a.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (expired, (noticed, status)) = tokio::join!(
        wait_routed_on(&b, "b", "plugin.late", false, expired_within),
        a_noticed
    );
    eprintln!(
        "after the partition: node a said unreachable after {noticed:?}; \
         node b stopped routing to node a after {expired:?}"
    );
    let relay_address = format!("127.0.0.1:{}", relay.port);
    assert!(
        status["error"]
            .as_str()
            .unwrap_or_default()
            .contains(&relay_address),
        "{status}"
    );
    let table = a.cli_ok(&["status"]).await;
    assert!(
        table.contains("UNREACHABLE") && table.contains("last view"),
        "{table}"
    );
    let line = a.wait_line("registry backend etcd unreachable").await;
    assert!(line.contains("from the last view"), "{line}");
    let page = metrics_until(&addr, "etcd unreachable", |page| {
        sum(page, "mesh_registry_reachable", &[("backend", "etcd")]) == 0.0
    })
    .await;
    assert_eq!(
        sum(
            &page,
            "mesh_registry_remote_nodes",
            &[("service", "plugin.echo")]
        ),
        1.0,
        "the last view is kept while etcd is cut off"
    );
    // A routes from its last view: B's plugin, directly, while etcd stays cut off.
    let mut client = through_router(&a, "plugin.echo");
    for i in 0..5 {
        let reply = client.echo(echo(&format!("cut off {i}"))).await.unwrap();
        assert_eq!(reply.into_inner().message, format!("cut off {i}"));
    }
    assert_eq!(registry_status(&a).await["state"], "unreachable");

    relay.cut(false);
    let healed = Instant::now();
    let took = wait_routed_on(&b, "b", "plugin.late", true, registered_within).await;
    wait_registry_state(&a, "connected").await;
    let connected = healed.elapsed();
    eprintln!(
        "after the heal: node b routed to node a again after {took:?}; \
         node a said connected after {connected:?}"
    );
    assert!(
        connected < registered_within,
        "node a connected again only {connected:?} after the heal"
    );
    assert!(registry_status(&a).await["reregistrations"].as_u64() >= Some(1));
    metrics_until(&addr, "etcd reachable again", |page| {
        sum(page, "mesh_registry_reachable", &[("backend", "etcd")]) == 1.0
            && sum(page, "mesh_registry_reregistrations_total", &[]) >= 1.0
    })
    .await;
    wait_routed(&a, true, DEADLINE).await;
}
