//! The call benchmarks: 64-byte unary `echo.v1.Echo/Echo` calls over each way of reaching one
//! plugin instance, timed one at a time (latency) and with a fixed number in flight (throughput).

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
use serde::Serialize;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

/// Bytes in each request's message (and so in each reply's).
pub(crate) const MESSAGE_BYTES: usize = 64;
/// A single call may take this long while waiting for a first success.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between failed calls while waiting for a first success (Tokio's timer resolution):
/// times taken this way are good to about a millisecond.
const RETRY_PAUSE: Duration = Duration::from_millis(1);
/// Extra time a bounded run gets before the harness gives up on it as hung.
const WATCHDOG_SLACK: Duration = Duration::from_secs(30);

/// A way of reaching the echo plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Variant {
    /// A stock tonic `Channel` on the instance's Unix socket.
    A,
    /// `mesh::connect`: resolved through the router, calls straight to the instance's socket.
    B,
    /// Through the router, on its Unix socket.
    C,
    /// Through the router, on TCP.
    D,
    /// Through nginx (`grpc_pass`), a stock tonic `Channel` on TCP.
    E,
    /// `mesh::connect` as (b), opted in to spinning ([`OPT_IN_SPIN`]).
    F,
    /// `mesh::connect` to an echo service served in this process (`mesh::inprocess`): no
    /// socket, no router, an in-memory stream.
    G,
    /// Through the router, on its Unix socket, as (c), to a second echo plugin
    /// ([`POLICY_SERVICE`]) with a policy in force: rate limits for all callers and per caller
    /// (set high enough never to refuse), checked on every call. The bench is the owner, so
    /// `call:` checks (plugin callers only) are not part of it.
    H,
    /// Through node a's router (Unix socket), which forwards over TCP (plaintext) to node b's
    /// router, where the instance runs: the router → router hop, beside (c).
    I,
    /// Through the router on its Unix socket, as (c), on a `mesh up` with call metrics on
    /// (`[telemetry] metrics = true`).
    J,
    /// `mesh::connect` direct, as (b), on that `mesh up` with metrics on.
    K,
    /// A remote client through the router on TCP with mTLS (`mesh::Connector::tls`), to a
    /// second `mesh up` configured with `[tls]` (and its own echo instance): (d) with TLS.
    L,
    /// As (i), with both nodes configured with `[tls]`: node a's router forwards to node b's
    /// over mTLS, with its own node certificate. (m) − (i) is what TLS adds to the hop.
    M,
}

/// The second echo plugin variant (h) calls, the same binary under a policy.
pub(crate) const POLICY_SERVICE: &str = "plugin.echo-policy";

/// The spin window variant (f) opts in to (`mesh::Connector::spin`).
pub(crate) const OPT_IN_SPIN: Duration = mesh::tuning::DEFAULT_SPIN;

impl Variant {
    /// Every variant, in table order.
    pub(crate) const ALL: [Self; 13] = [
        Self::A,
        Self::B,
        Self::C,
        Self::D,
        Self::E,
        Self::F,
        Self::G,
        Self::H,
        Self::I,
        Self::J,
        Self::K,
        Self::L,
        Self::M,
    ];

    /// Whether the variant runs against the `mesh up` with call metrics on.
    pub(crate) fn metered(self) -> bool {
        matches!(self, Self::J | Self::K)
    }

    /// `a` to `m`.
    pub(crate) fn letter(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
            Self::C => "c",
            Self::D => "d",
            Self::E => "e",
            Self::F => "f",
            Self::G => "g",
            Self::H => "h",
            Self::I => "i",
            Self::J => "j",
            Self::K => "k",
            Self::L => "l",
            Self::M => "m",
        }
    }

    /// What the variant measures, for tables.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::A => "stock tonic Channel, plugin socket",
            Self::B => "mesh::connect, direct (default, no spin)",
            Self::C => "router, Unix socket",
            Self::D => "router, TCP",
            Self::E => "nginx grpc_pass, TCP",
            Self::F => "mesh::connect, direct, spin opt-in (100 µs)",
            Self::G => "mesh::connect, in-process service",
            Self::H => "router, Unix socket, rate limits in force",
            Self::I => "router a → router b (TCP, plaintext), Unix socket",
            Self::J => "router, Unix socket, metrics on",
            Self::K => "mesh::connect, direct, metrics on",
            Self::L => "router, TCP, mTLS (remote client)",
            Self::M => "router a → router b (TCP, mTLS), Unix socket",
        }
    }
}

/// An echo client over any of the variants' channels.
#[derive(Clone)]
pub(crate) enum Client {
    /// tonic's own `Channel` (variants a and e).
    Tonic(EchoClient<tonic::transport::Channel>),
    /// A `mesh::Channel` (variants b, c and d).
    Mesh(EchoClient<mesh::Channel>),
}

impl Client {
    /// What any Rust user writes without this project: tonic's `Channel` on a Unix socket.
    pub(crate) async fn tonic_unix(socket: &Path) -> anyhow::Result<Self> {
        let socket: PathBuf = socket.to_owned();
        let channel = Endpoint::try_from("http://localhost")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
            }))
            .await
            .context("tonic Channel on the plugin socket")?;
        Ok(Self::Tonic(EchoClient::new(channel)))
    }

    /// tonic's `Channel` on TCP, with its defaults.
    pub(crate) async fn tonic_tcp(addr: SocketAddr) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .with_context(|| format!("tonic Channel to {addr}"))?;
        Ok(Self::Tonic(EchoClient::new(channel)))
    }

    /// An echo client on a mesh channel.
    pub(crate) fn mesh(channel: mesh::Channel) -> Self {
        Self::Mesh(EchoClient::new(channel))
    }

    /// One call; a reply of the wrong size counts as a failure.
    pub(crate) async fn call(&mut self, request: &EchoRequest) -> Result<(), tonic::Status> {
        let reply = match self {
            Self::Tonic(client) => client.echo(request.clone()).await?,
            Self::Mesh(client) => client.echo(request.clone()).await?,
        };
        let len = reply.get_ref().message.len();
        if len == MESSAGE_BYTES {
            Ok(())
        } else {
            Err(tonic::Status::data_loss(format!(
                "reply of {len} bytes to a {MESSAGE_BYTES}-byte message"
            )))
        }
    }
}

/// Calls until one succeeds (an instance coming back, a router still learning of an instance
/// the registry already shows); returns when it did, or the last failure after `within`.
pub(crate) async fn first_success(client: &Client, within: Duration) -> anyhow::Result<Instant> {
    let mut client = client.clone();
    let request = request();
    let deadline = Instant::now() + within;
    loop {
        let error = match tokio::time::timeout(CALL_TIMEOUT, client.call(&request)).await {
            Ok(Ok(())) => return Ok(Instant::now()),
            Ok(Err(status)) => status.to_string(),
            Err(_) => format!("no answer within {CALL_TIMEOUT:?}"),
        };
        if Instant::now() > deadline {
            anyhow::bail!("no call succeeded within {within:?}; last: {error}");
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// The request every benchmark sends.
pub(crate) fn request() -> EchoRequest {
    EchoRequest {
        message: "m".repeat(MESSAGE_BYTES),
    }
}

/// Calls made one after another.
#[derive(Debug, Default)]
pub(crate) struct Sequential {
    /// Each successful call's latency, in microseconds.
    pub(crate) samples_us: Vec<f64>,
    /// Failed calls.
    pub(crate) errors: u64,
    /// The first failure, if any.
    pub(crate) first_error: Option<String>,
}

/// Makes up to `calls` calls one after another, for at most `limit`, on a runtime worker (as a
/// server's request handler would).
pub(crate) async fn sequential(
    client: &Client,
    calls: usize,
    limit: Duration,
) -> anyhow::Result<Sequential> {
    let mut client = client.clone();
    let mut task = tokio::spawn(async move {
        let request = request();
        let mut run = Sequential {
            samples_us: Vec::with_capacity(calls),
            ..Sequential::default()
        };
        let started = Instant::now();
        for _ in 0..calls {
            if started.elapsed() > limit {
                break;
            }
            let call = Instant::now();
            match client.call(&request).await {
                Ok(()) => run
                    .samples_us
                    .push(call.elapsed().as_secs_f64() * 1_000_000.0),
                Err(status) => {
                    run.errors += 1;
                    run.first_error.get_or_insert_with(|| status.to_string());
                }
            }
        }
        run
    });
    match tokio::time::timeout(limit + WATCHDOG_SLACK, &mut task).await {
        Ok(run) => run.context("sequential calls panicked"),
        Err(_) => {
            task.abort();
            anyhow::bail!("sequential calls hung past their time limit")
        }
    }
}

/// Calls made with a fixed number in flight.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Load {
    /// Successful calls.
    pub(crate) ok: u64,
    /// Failed calls.
    pub(crate) errors: u64,
    /// From the first call to the end of the last.
    pub(crate) seconds: f64,
    /// The first failure, if any.
    pub(crate) first_error: Option<String>,
}

impl Load {
    /// Successful calls per second.
    pub(crate) fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }
}

/// Keeps `in_flight` calls going (one task each, each calling again as soon as its call ends)
/// for `duration`, or until `max_calls` calls have been started.
pub(crate) async fn load(
    client: &Client,
    in_flight: usize,
    duration: Duration,
    max_calls: u64,
) -> anyhow::Result<Load> {
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    // Dropping the set (on the watchdog's timeout) aborts every task.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let mut client = client.clone();
        let issued = issued.clone();
        tasks.spawn(async move {
            let request = request();
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < max_calls {
                match client.call(&request).await {
                    Ok(()) => ok += 1,
                    Err(status) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| status.to_string());
                    }
                }
            }
            (ok, errors, first_error)
        });
    }
    let mut load = Load {
        ok: 0,
        errors: 0,
        seconds: 0.0,
        first_error: None,
    };
    let joined = tokio::time::timeout(duration + WATCHDOG_SLACK, async {
        while let Some(task) = tasks.join_next().await {
            let (ok, errors, first_error) = task.context("a load task panicked")?;
            load.ok += ok;
            load.errors += errors;
            if load.first_error.is_none() {
                load.first_error = first_error;
            }
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    match joined {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("calls with {in_flight} in flight hung past their time limit"),
    }
    load.seconds = started.elapsed().as_secs_f64();
    Ok(load)
}
