//! The plugin SDK served over a real Unix socket: its message limit and its health handle.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, Instant},
};

use mesh::{Address, Channel, plugin::Plugin};
use mesh_proto::echo::v1::{
    EchoReply, EchoRequest, ExpandRequest,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Answers `Echo` with the message twice, so a reply can be over a limit its request is under.
struct Twice;

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Twice {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let message = request.into_inner().message;
        Ok(Response::new(EchoReply {
            message: message.repeat(2),
            instance: "t-0".into(),
        }))
    }

    type ExpandStream = Replies;

    async fn expand(&self, _: Request<ExpandRequest>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn collect(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type ChatStream = Replies;

    async fn chat(&self, _: Request<Streaming<EchoRequest>>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// A plugin serving on a socket in a short temporary directory; stopped when dropped.
struct Served {
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Served {
    /// Serves `plugin` (made by `make` for a socket path), and waits until it answers health.
    async fn start(make: impl FnOnce(&Path) -> Plugin) -> (Served, mesh::plugin::Health) {
        let dir = tempfile::Builder::new()
            .prefix("m")
            .tempdir_in("/tmp")
            .unwrap();
        let socket = dir.path().join("p.sock");
        let plugin = make(&socket).add_service(EchoServer::new(Twice));
        let health = plugin.health();
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(plugin.serve_with_shutdown(async {
            let _ = stopped.await;
        }));
        let served = Served {
            socket,
            stop: Some(stop),
            _dir: dir,
        };
        // The socket is bound inside `serve`: wait until health answers (the first answer is
        // the event; a refused connection only means not yet).
        let deadline = Instant::now() + Duration::from_secs(10);
        while served.check("").await.is_none() {
            assert!(
                Instant::now() < deadline,
                "the plugin never answered health"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (served, health)
    }

    fn channel(&self) -> Channel {
        Channel::to_server(Address::Unix(self.socket.clone()))
    }

    /// `grpc.health.v1.Health/Check` of `service`; `None` if the plugin did not answer.
    async fn check(&self, service: &str) -> Option<ServingStatus> {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let answer = HealthClient::new(self.channel()).check(request).await;
        answer.ok().map(|r| r.into_inner().status())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

const ECHO: &str = "echo.v1.Echo";

#[tokio::test]
async fn a_message_over_the_plugins_limit_is_refused_and_one_under_it_passes() {
    let (plugin, _) =
        Served::start(|socket| Plugin::new(socket, "t", "t-0").with_max_message_size(1000)).await;
    let mut client = EchoClient::new(plugin.channel());
    let echo = |len: usize| EchoRequest {
        message: "x".repeat(len),
    };

    // 400 bytes in, 800 out: both under the limit.
    let reply = client.echo(echo(400)).await.expect("under the limit");
    assert_eq!(reply.get_ref().message.len(), 800);

    // 1200 bytes in: refused before the handler sees it.
    let refused = client.echo(echo(1200)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("request message of 1203 bytes")
            && refused.message().contains("limit of 1000 bytes"),
        "{}",
        refused.message()
    );

    // 600 bytes in, 1200 out: the answer is refused.
    let refused = client.echo(echo(600)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("response message of"),
        "{}",
        refused.message()
    );

    // The connection and the plugin are fine afterwards.
    client.echo(echo(10)).await.expect("a small call after");
}

#[tokio::test]
async fn the_default_limit_is_16_mib_with_tonics_own_4_mib_per_service() {
    let (plugin, _) = Served::start(|socket| Plugin::new(socket, "t", "t-0")).await;
    assert_eq!(mesh::plugin::DEFAULT_MAX_MESSAGE_SIZE, 16 << 20);
    let mut client = EchoClient::new(plugin.channel());
    let reply = client
        .echo(EchoRequest {
            message: "x".repeat(1 << 20),
        })
        .await
        .expect("1 MiB in, 2 MiB out");
    assert_eq!(reply.get_ref().message.len(), 2 << 20);

    // Under the plugin's limit but over tonic's 4 MiB, which this service was not given:
    // tonic's own decoder refuses it (with OUT_OF_RANGE, where the SDK says RESOURCE_EXHAUSTED).
    let refused = client
        .echo(EchoRequest {
            message: "x".repeat(5 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("4194304"), "{refused:?}");
}

#[tokio::test]
async fn the_health_handle_flips_what_health_check_answers() {
    let (plugin, health) = Served::start(|socket| Plugin::new(socket, "t", "t-0")).await;
    assert_eq!(plugin.check("").await, Some(ServingStatus::Serving));
    assert_eq!(plugin.check(ECHO).await, Some(ServingStatus::Serving));

    health.set_not_serving().await;
    assert_eq!(plugin.check("").await, Some(ServingStatus::NotServing));
    assert_eq!(plugin.check(ECHO).await, Some(ServingStatus::NotServing));

    health.set_serving().await;
    assert_eq!(plugin.check("").await, Some(ServingStatus::Serving));
    assert_eq!(plugin.check(ECHO).await, Some(ServingStatus::Serving));

    // One service alone: the plugin as a whole (what the manager checks) keeps serving.
    health.clone().set_service_not_serving(ECHO).await;
    assert_eq!(plugin.check(ECHO).await, Some(ServingStatus::NotServing));
    assert_eq!(plugin.check("").await, Some(ServingStatus::Serving));
    health.set_service_serving(ECHO).await;
    assert_eq!(plugin.check(ECHO).await, Some(ServingStatus::Serving));
}

#[tokio::test]
async fn health_set_before_serving_holds_once_it_serves() {
    let (plugin, _) = Served::start(|socket| {
        let plugin = Plugin::new(socket, "t", "t-0");
        let health = plugin.health();
        // Not awaited on a served plugin yet: kept, then applied when it serves.
        futures_util::FutureExt::now_or_never(health.set_service_not_serving(ECHO))
            .expect("a pending change only records itself");
        plugin
    })
    .await;
    assert_eq!(plugin.check(ECHO).await, Some(ServingStatus::NotServing));
    assert_eq!(plugin.check("").await, Some(ServingStatus::Serving));
}
