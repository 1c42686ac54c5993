//! The router as a data plane, over its TCP listener: every kind of call with its metadata,
//! big messages, deadlines and cancellation, flow control, balance, an instance killed under
//! load, an instance added under load, grpcurl, and overload.
//!
//! Every load loop is bounded in calls and in time; every wait has a deadline.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh::{Address, Channel};
use mesh_proto::{
    echo::v1::{EchoRequest, ExpandRequest, echo_client::EchoClient},
    mesh::v1::{
        Instance, KeepAliveRequest, ListRequest, RegisterRequest, registry_client::RegistryClient,
    },
};
use tokio::task::JoinSet;
use tonic::{Code, Request};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    routing::{all_four_kinds, echo, metadata_and_trailers_round_trip},
    support::{DEADLINE, Mesh, echo_plugin, eventually, grpcurl_ok, short_tempdir},
};

/// Three echo instances, `Echo` marked idempotent (so a call lost with an instance is retried).
const THREE_ECHOES: &str = r#"
[[plugin]]
name = "echo"
command = "{echo}"
instances = 3
idempotent = ["echo.v1.Echo/Echo"]
"#;

const ONE_ECHO: &str = r#"
[[plugin]]
name = "echo"
command = "{echo}"
"#;

/// The TCP listener on a free port.
const TCP: &str = "listen = \"127.0.0.1:0\"\n";

/// Clients take messages as large as the mesh carries (tonic's own default is 4 MiB).
const CLIENT_LIMIT: usize = mesh::plugin::DEFAULT_MAX_MESSAGE_SIZE;

/// A client through the router's TCP listener, addressing `plugin.echo` by `:authority`.
async fn via_tcp(mesh: &Mesh) -> EchoClient<Channel> {
    let address: Address = mesh.tcp_address().await.parse().unwrap();
    client(Channel::to_address(address, "plugin.echo").unwrap())
}

fn client(channel: Channel) -> EchoClient<Channel> {
    EchoClient::new(channel).max_decoding_message_size(CLIENT_LIMIT)
}

fn slow(message: &str, delay_ms: u64) -> Request<EchoRequest> {
    let mut request = Request::new(echo(message));
    request
        .metadata_mut()
        .insert("x-echo-delay-ms", delay_ms.to_string().parse().unwrap());
    request
}

#[tokio::test]
async fn tcp_carries_every_kind_of_call_with_metadata_trailers_and_4_mib_messages() {
    let mesh = Mesh::start_with(
        &format!("{TCP}max_message_size = \"5MiB\"\n"),
        crate::lifecycle::TWO_ECHOES,
    )
    .await;
    mesh.wait_instances("plugin.echo", 2).await;
    let mut tcp = via_tcp(&mesh).await;
    all_four_kinds(&mut tcp).await;

    metadata_and_trailers_round_trip(&mut tcp).await;

    // 4 MiB each way, through the router and directly.
    let big = "x".repeat(4 << 20);
    let mut direct = client(mesh.connect("plugin.echo").await);
    for (path, client) in [("router", &mut tcp), ("direct", &mut direct)] {
        let reply = client.echo(echo(&big)).await.unwrap().into_inner();
        assert_eq!(reply.message.len(), big.len(), "{path}");
    }
    // Over the configured limit the plugin refuses it, naming the limit (RESOURCE_EXHAUSTED, as
    // gRPC says for a message over the limit; tonic's own decoder would say OUT_OF_RANGE).
    let status = tcp.echo(echo(&"x".repeat(6 << 20))).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("5242880"), "{status:?}");
}

#[tokio::test]
async fn deadlines_come_back_as_deadline_exceeded_and_cancel_the_plugin_call() {
    let mesh = Mesh::start_with(&format!("{TCP}call_timeout = \"1500ms\"\n"), ONE_ECHO).await;
    mesh.wait_instances("plugin.echo", 1).await;
    let mut tcp = via_tcp(&mesh).await;

    // The caller's grpc-timeout, shorter than the default.
    let mut request = slow("late", 10_000);
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = tcp.echo(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline exceeded"), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not the plugin's 10 s"
    );
    mesh.wait_lines("Echo cancelled after", 1).await;

    // No grpc-timeout: the router's call_timeout applies.
    let started = Instant::now();
    let status = tcp.echo(slow("later", 10_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("1.5s"), "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    mesh.wait_lines("Echo cancelled after", 2).await;

    // A stream cut off by its deadline after it began: some replies, then DEADLINE_EXCEEDED.
    let mut request = Request::new(ExpandRequest {
        message: "tick".into(),
        count: 1000,
    });
    request
        .metadata_mut()
        .insert("x-echo-delay-ms", "50".parse().unwrap());
    request.set_timeout(Duration::from_millis(600));
    let mut stream = tcp.expand(request).await.unwrap().into_inner();
    let mut replies = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => replies += 1,
            Ok(None) => panic!("the stream ended without its deadline"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        (1..1000).contains(&replies),
        "{replies} replies before the deadline"
    );
    mesh.wait_line("Expand cancelled after").await;

    // A call that finishes in time is untouched.
    let mut request = slow("in time", 10);
    request.set_timeout(Duration::from_secs(5));
    assert_eq!(
        tcp.echo(request).await.unwrap().into_inner().message,
        "in time"
    );
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[tokio::test]
async fn a_slow_reader_holds_the_router_to_bounded_memory_and_cancelling_reaches_the_plugin() {
    let mesh = Mesh::start_with(TCP, ONE_ECHO).await;
    mesh.wait_instances("plugin.echo", 1).await;
    let mut tcp = via_tcp(&mesh).await;
    tcp.echo(echo("warm up")).await.unwrap();
    let before = rss_kib(mesh.pid());

    // 100 000 replies of 64 KiB (6.4 GB) to a caller that reads one and then stalls.
    let request = ExpandRequest {
        message: "x".repeat(64 << 10),
        count: 100_000,
    };
    let mut stream = tcp.expand(request).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    // Watch the router for a second while nobody reads (an observation window, not a wait
    // for something to happen): unbounded buffering would grow by hundreds of MiB.
    let mut peak = before;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(rss_kib(mesh.pid()));
    }
    let grown_mib = peak.saturating_sub(before) / 1024;
    assert!(grown_mib < 32, "the router grew by {grown_mib} MiB");

    // Dropping the stream resets it through the router: the plugin stops, and says how far it
    // got — only as far as the flow-control windows let it.
    drop(stream);
    let line = mesh.wait_line("Expand cancelled after").await;
    let sent: u32 = line
        .split("Expand cancelled after ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count in {line:?}"));
    eprintln!(
        "slow reader: router grew {grown_mib} MiB; the plugin produced {sent} replies of 64 KiB"
    );
    assert!(
        sent < 400,
        "the plugin produced {sent} replies of 64 KiB for a reader that took one"
    );
}

#[tokio::test]
async fn calls_spread_across_three_instances() {
    let mesh = Mesh::start_with(TCP, THREE_ECHOES).await;
    mesh.wait_instances("plugin.echo", 3).await;
    let mut tcp = via_tcp(&mesh).await;
    let mut direct = client(mesh.connect("plugin.echo").await);
    for (path, client) in [("router", &mut tcp), ("direct", &mut direct)] {
        let mut answered: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..300 {
            let reply = client.echo(echo(&i.to_string())).await.unwrap();
            *answered.entry(reply.into_inner().instance).or_default() += 1;
        }
        assert_eq!(answered.len(), 3, "{path}: {answered:?}");
        // 20%..47% each: an even spread is 33%; P2C among idle instances picks at random,
        // and this bound is more than 4 standard deviations away.
        for (instance, calls) in &answered {
            assert!(
                (60..=141).contains(calls),
                "{path}: {instance} got {calls} of 300: {answered:?}"
            );
        }
    }
}

/// What a load run saw.
#[derive(Default)]
struct Tally {
    calls: AtomicUsize,
    by_instance: Mutex<HashMap<String, usize>>,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn answered_by(&self, instance: &str) -> usize {
        self.by_instance
            .lock()
            .unwrap()
            .get(instance)
            .copied()
            .unwrap_or(0)
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

/// Most calls one load worker makes, whatever the time.
const MAX_CALLS_PER_WORKER: usize = 20_000;

/// `workers` concurrent callers of `Echo` through `client`, for `run_for` or until `stop`.
fn load(
    client: EchoClient<Channel>,
    workers: usize,
    run_for: Duration,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, tokio::task::JoinHandle<()>) {
    let tally = Arc::new(Tally::default());
    let until = Instant::now() + run_for;
    let mut set = JoinSet::new();
    for worker in 0..workers {
        let (mut client, tally, stop) = (client.clone(), tally.clone(), stop.clone());
        set.spawn(async move {
            for i in 0..MAX_CALLS_PER_WORKER {
                if Instant::now() >= until || stop.load(Ordering::Relaxed) {
                    break;
                }
                let message = format!("{worker}-{i}");
                let call = client.echo(echo(&message));
                match tokio::time::timeout(Duration::from_secs(5), call).await {
                    Ok(Ok(reply)) => {
                        let reply = reply.into_inner();
                        assert_eq!(reply.message, message);
                        *tally
                            .by_instance
                            .lock()
                            .unwrap()
                            .entry(reply.instance)
                            .or_default() += 1;
                    }
                    Ok(Err(status)) => tally.failures.lock().unwrap().push(format!("{status:?}")),
                    Err(_) => tally
                        .failures
                        .lock()
                        .unwrap()
                        .push("no answer in 5 s".into()),
                }
                tally.calls.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let done = tokio::spawn(async move { while set.join_next().await.is_some() {} });
    (tally, done)
}

#[tokio::test]
async fn kill_9_of_an_instance_under_load_fails_no_call_through_the_router_or_directly() {
    let mesh = Mesh::start_with(TCP, THREE_ECHOES).await;
    let instances = mesh.wait_instances("plugin.echo", 3).await;
    let victim = instances.iter().find(|i| i.id == "echo-1").unwrap().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let run_for = Duration::from_secs(3);
    let (routed, routed_done) = load(via_tcp(&mesh).await, 32, run_for, stop.clone());
    let direct = client(mesh.connect("plugin.echo").await);
    let (direct, direct_done) = load(direct, 32, run_for, stop);

    eventually("both paths carried calls, some to echo-1", DEADLINE, || {
        let carried = |tally: &Tally| {
            tally.calls.load(Ordering::Relaxed) > 300 && tally.answered_by("echo-1") > 20
        };
        carried(&routed) && carried(&direct)
    })
    .await;
    let at_kill = (
        routed.calls.load(Ordering::Relaxed),
        direct.calls.load(Ordering::Relaxed),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    routed_done.await.unwrap();
    direct_done.await.unwrap();

    for (path, tally, before) in [
        ("router", &routed, at_kill.0),
        ("direct", &direct, at_kill.1),
    ] {
        let calls = tally.calls.load(Ordering::Relaxed);
        let failures = tally.failures();
        assert!(
            failures.is_empty(),
            "{path}: {} of {calls} calls failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        assert!(
            calls > before + 100,
            "{path}: the load went on after the kill"
        );
        eprintln!(
            "kill -9 under load, {path}: {calls} calls, {} after the kill, none failed",
            calls - before
        );
    }
    assert!(!crate::support::alive(victim.pid), "echo-1 was killed");
}

#[tokio::test]
async fn an_instance_registered_under_load_receives_calls_through_the_router_and_directly() {
    let mesh = Mesh::start_with(TCP, crate::lifecycle::TWO_ECHOES).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let direct_channel = mesh.connect("plugin.echo").await;
    let stop = Arc::new(AtomicBool::new(false));
    let run_for = Duration::from_secs(20);
    let (routed, routed_done) = load(via_tcp(&mesh).await, 8, run_for, stop.clone());
    let (direct, direct_done) = load(client(direct_channel.clone()), 8, run_for, stop.clone());
    eventually("the load runs", DEADLINE, || {
        routed.calls.load(Ordering::Relaxed) > 50 && direct.calls.load(Ordering::Relaxed) > 50
    })
    .await;

    // A new instance, started by hand and registered through the registry API with a lease.
    let dir = short_tempdir();
    let socket = dir.path().join("extra.sock");
    let mut extra = tokio::process::Command::new(echo_plugin())
        .env("PLUGIN_SOCKET", &socket)
        .env("PLUGIN_NAME", "echo")
        .env("PLUGIN_INSTANCE", "echo-extra")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut health = HealthClient::new(Channel::to_server(Address::Unix(socket.clone())));
    let deadline = Instant::now() + DEADLINE;
    loop {
        let check = health.check(HealthCheckRequest::default()).await;
        if check.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
            break;
        }
        assert!(Instant::now() < deadline, "echo-extra never became SERVING");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut registry = RegistryClient::new(mesh.router());
    let lease = registry
        .register(RegisterRequest {
            instance: Some(Instance {
                service: "plugin.echo".into(),
                id: "echo-extra".into(),
                endpoint: format!("unix:{}", socket.display()),
                labels: HashMap::from([(
                    mesh::labels::IDEMPOTENT.to_owned(),
                    "echo.v1.Echo/Echo".to_owned(),
                )]),
            }),
            ttl_seconds: 5,
        })
        .await
        .unwrap()
        .into_inner()
        .lease;
    let keep_alive = {
        let mut registry = registry.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                registry
                    .keep_alive(KeepAliveRequest { lease })
                    .await
                    .unwrap();
            }
        })
    };

    eventually(
        "echo-extra answers through the router and directly",
        DEADLINE,
        || routed.answered_by("echo-extra") > 10 && direct.answered_by("echo-extra") > 10,
    )
    .await;
    assert_eq!(
        direct_channel.instances(),
        3,
        "the handle followed the registry"
    );
    let listed = registry.list(ListRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.services[0].instances.len(), 3);

    stop.store(true, Ordering::Relaxed);
    routed_done.await.unwrap();
    direct_done.await.unwrap();
    keep_alive.abort();
    for (path, tally) in [("router", &routed), ("direct", &direct)] {
        assert_eq!(tally.failures(), Vec::<String>::new(), "{path}");
    }
    extra.kill().await.unwrap();
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_over_tcp() {
    let mesh = Mesh::start_with(TCP, ONE_ECHO).await;
    mesh.wait_instances("plugin.echo", 1).await;
    let address = mesh.tcp_address().await;
    // grpcurl [flags] address [verb or method]
    let run = |flags: &[&str], verb: &[&str]| {
        let mut args = vec!["-authority", "plugin.echo"];
        args.extend_from_slice(flags);
        args.push(&address);
        args.extend_from_slice(verb);
        grpcurl_ok(&args)
    };
    let list = run(&[], &["list"]);
    assert!(list.contains("echo.v1.Echo"), "{list}");
    assert!(list.contains("grpc.health.v1.Health"), "{list}");
    let described = run(&[], &["describe", "echo.v1.Echo"]);
    assert!(
        described.contains(
            "rpc Expand ( .echo.v1.ExpandRequest ) returns ( stream .echo.v1.EchoReply )"
        ),
        "{described}"
    );
    let reply = run(
        &["-d", r#"{"message":"hi over tcp"}"#],
        &["echo.v1.Echo/Echo"],
    );
    assert!(reply.contains(r#""message": "hi over tcp""#), "{reply}");
    assert!(reply.contains(r#""instance": "echo-0""#), "{reply}");

    // An IP address as authority (grpcurl's default) reaches the router's own API.
    let own = grpcurl_ok(&[&address, "list"]);
    assert!(own.contains("mesh.v1.Registry"), "{own}");
}

#[tokio::test]
async fn overload_is_resource_exhausted_at_once_and_the_router_keeps_serving() {
    // The owner's connection on the Unix socket, which may take all of max_in_flight (TCP
    // clients get half; docs/security.md has the shares).
    let mesh = Mesh::start_with(
        &format!("{TCP}max_in_flight = 4\nmax_in_flight_per_connection = 4\n"),
        ONE_ECHO,
    )
    .await;
    mesh.wait_instances("plugin.echo", 1).await;
    let owner = EchoClient::new(
        Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap(),
    );
    let mut held = JoinSet::new();
    for i in 0..4 {
        let mut owner = owner.clone();
        held.spawn(async move { owner.echo(slow(&format!("hold {i}"), 30_000)).await });
    }
    mesh.wait_lines("Echo waiting 30000 ms", 4).await;

    let started = Instant::now();
    let status = owner.clone().echo(echo("one too many")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_in_flight"), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "at once, not queued"
    );

    // The router's own API is not counted: it answers while forwarding is full.
    let address: Address = mesh.tcp_address().await.parse().unwrap();
    let mut registry = RegistryClient::new(Channel::to_server(address));
    let listed = registry.list(ListRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.services.len(), 1);

    // Give the places back (the callers go away; the plugin sees each cancellation): calls
    // are forwarded again.
    held.abort_all();
    mesh.wait_lines("Echo cancelled after", 4).await;
    let reply = owner.clone().echo(echo("room again")).await.unwrap();
    assert_eq!(reply.into_inner().message, "room again");
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once_and_the_others_served() {
    let mesh = Mesh::start_with(&format!("{TCP}max_connections = 2\n"), ONE_ECHO).await;
    mesh.wait_instances("plugin.echo", 1).await;
    // Connections made by the test's helpers may take a moment to close: each new client
    // tries until it is let in.
    let connected = || async {
        let mut client = via_tcp(&mesh).await;
        let deadline = Instant::now() + DEADLINE;
        while client.echo(echo("in")).await.is_err() {
            assert!(Instant::now() < deadline, "never let in");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client
    };
    let mut a = connected().await;
    let b = connected().await;

    let mut third = via_tcp(&mesh).await;
    let started = Instant::now();
    let status = third.echo(echo("no room")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "at once");
    mesh.wait_line("refusing TCP connections: 2 are open (max_connections)")
        .await;
    assert_eq!(
        a.echo(echo("still")).await.unwrap().into_inner().message,
        "still"
    );

    drop(b);
    let mut next = connected().await;
    assert_eq!(
        next.echo(echo("now")).await.unwrap().into_inner().message,
        "now"
    );
}

#[tokio::test]
async fn busy_polling_router_and_plugin_still_route_every_kind_of_call() {
    // One polling worker and one polling plugin: two busy cores on a 2-core machine, so the
    // test stays short.
    let mesh = Mesh::start_with(
        "busy_poll = true\nrouter_threads = 1\n",
        "[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\nenv = { MESH_BUSY_POLL = \"1\" }\n",
    )
    .await;
    let plugin = mesh.wait_instances("plugin.echo", 1).await[0].pid;
    let through_router =
        Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    all_four_kinds(&mut EchoClient::new(through_router)).await;
    all_four_kinds(&mut EchoClient::new(mesh.connect("plugin.echo").await)).await;

    // Idle, both keep a core busy: that is what polling means. Watching them for half a
    // second is the thing under test; each gets at least 10 % of it even on a shared machine.
    let before = [cpu_ticks(plugin), cpu_ticks(mesh.pid())];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = [cpu_ticks(plugin), cpu_ticks(mesh.pid())];
    for (who, (b, a)) in ["plugin", "router"].iter().zip(before.iter().zip(after)) {
        assert!(a - b >= 5, "the {who} polled only {} ticks of 50", a - b);
    }
}

#[tokio::test]
async fn a_router_lingers_only_after_calls_and_sleeps_when_idle() {
    // Default settings: after each call a worker keeps polling for the spin window (100 µs),
    // and a caller alone spins on its answer; neither changes what a call returns.
    let mesh = Mesh::start_with("router_threads = 1\n", ONE_ECHO).await;
    mesh.wait_instances("plugin.echo", 1).await;
    let through_router =
        Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    all_four_kinds(&mut EchoClient::new(through_router.clone())).await;
    let mut echo_client = EchoClient::new(through_router);
    for n in 0..200 {
        let message = format!("call {n}");
        let reply = echo_client.echo(echo(&message)).await.unwrap().into_inner();
        assert_eq!(reply.message, message);
    }

    // Idle, the router sleeps: half a second costs it a few ticks at most (health checks),
    // where a worker that kept polling would take about 50.
    let before = cpu_ticks(mesh.pid());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let used = cpu_ticks(mesh.pid()) - before;
    assert!(used <= 5, "the idle router used {used} ticks of 50");
}

#[tokio::test]
async fn a_router_that_never_spins_still_routes_every_kind_of_call() {
    let mesh = Mesh::start_with("spin = \"0s\"\n", ONE_ECHO).await;
    mesh.wait_instances("plugin.echo", 1).await;
    let through_router =
        Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    all_four_kinds(&mut EchoClient::new(through_router)).await;
}

/// User plus system CPU time of `pid`, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based, in proc(5)).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}
