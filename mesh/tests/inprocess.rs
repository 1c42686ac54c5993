//! In-process services and custom transports: reached by `mesh::connect` by name, with no
//! socket and no router.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use mesh::transport::{Connection, Dial, Dialing};
use mesh_proto::echo::v1::{
    EchoReply, EchoRequest, ExpandRequest,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Echoes; `Expand` streams `count` replies; names itself in `instance`.
#[derive(Clone)]
struct Named(&'static str);

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Named {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply {
            message: request.into_inner().message,
            instance: self.0.into(),
        }))
    }

    type ExpandStream = Replies;

    async fn expand(&self, request: Request<ExpandRequest>) -> Result<Response<Replies>, Status> {
        let ExpandRequest { message, count } = request.into_inner();
        let reply = EchoReply {
            message,
            instance: self.0.into(),
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(
            (0..count).map(move |_| Ok(reply.clone())),
        ))))
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

fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
    }
}

/// No router anywhere: a connector that would find one finds nothing here.
fn no_router() -> mesh::Connector {
    mesh::Connector::local("/nonexistent/mesh-test/mesh.sock")
}

#[tokio::test]
async fn an_in_process_service_answers_by_name_without_a_socket_until_it_is_dropped() {
    let served = mesh::inprocess::serve("plugin.inproc", EchoServer::new(Named("inproc"))).unwrap();
    let taken = mesh::inprocess::serve("plugin.inproc", EchoServer::new(Named("again")));
    assert!(
        taken
            .unwrap_err()
            .to_string()
            .contains("already registered"),
        "one service per name"
    );

    let mut client = EchoClient::new(no_router().connect("plugin.inproc").await.unwrap());
    let reply = client.echo(echo("hi")).await.unwrap().into_inner();
    assert_eq!(
        (reply.message.as_str(), reply.instance.as_str()),
        ("hi", "inproc")
    );
    // Streams, larger than the in-memory buffer, come through whole.
    let big = "x".repeat(64 * 1024);
    let request = ExpandRequest {
        message: big.clone(),
        count: 20,
    };
    let replies: Vec<EchoReply> = client
        .expand(request)
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(replies.len(), 20);
    assert!(replies.iter().all(|r| r.message == big));

    drop(served);
    let error = no_router().connect("plugin.inproc").await.unwrap_err();
    assert!(
        error.to_string().contains("cannot reach the mesh router"),
        "once dropped, the name is the router's again: {error}"
    );
}

/// A user's own transport: an in-memory stream to a tonic server it runs itself, counting
/// the connections it opens.
struct Counting {
    dials: Arc<AtomicUsize>,
}

impl Dial for Counting {
    fn dial(&self) -> Dialing {
        self.dials.fetch_add(1, Ordering::SeqCst);
        let (caller, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(Named("custom")))
                .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(server))),
        );
        Box::pin(async move { Ok(Box::new(caller) as Box<dyn Connection>) })
    }
}

#[tokio::test]
async fn a_custom_transport_carries_calls_by_name_on_one_connection() {
    let dials = Arc::new(AtomicUsize::new(0));
    let _registered = mesh::transport::register(
        "custom.echo",
        Counting {
            dials: dials.clone(),
        },
    )
    .unwrap();
    let mut client = EchoClient::new(no_router().connect("custom.echo").await.unwrap());
    for i in 0..10 {
        let reply = client.echo(echo(&format!("call {i}"))).await.unwrap();
        assert_eq!(reply.get_ref().message, format!("call {i}"));
        assert_eq!(reply.get_ref().instance, "custom");
    }
    assert_eq!(
        dials.load(Ordering::SeqCst),
        1,
        "one multiplexed connection"
    );
}
