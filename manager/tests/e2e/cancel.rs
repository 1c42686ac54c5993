//! Cancellation reaches the plugin: a bidi `Chat` whose caller drops it while its own request
//! stream is still open resets the stream, directly (`mesh::connect`), through the router,
//! and when the router's deadline cuts it off. The echo plugin logs `Chat cancelled after N
//! replies` when its reply stream is dropped before the caller ended its side.
//!
//! Every wait has a deadline ([`Mesh::wait_lines`]).

use std::time::Duration;

use mesh::{Address, Channel};
use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};

use crate::support::{DEADLINE, Mesh};

const ONE_ECHO: &str = r#"
[[plugin]]
name = "echo"
command = "{echo}"
"#;

const CANCELLED: &str = "Chat cancelled after 1 replies";

/// Opens a chat on `client`, has one message echoed, and returns the caller's side still open:
/// the sender of further requests and the stream of replies.
async fn chat_once(
    client: &mut EchoClient<Channel>,
    timeout: Option<Duration>,
) -> (
    mpsc::Sender<EchoRequest>,
    tonic::Streaming<mesh_proto::echo::v1::EchoReply>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(EchoRequest {
        message: "hello".into(),
    })
    .await
    .unwrap();
    let mut request = Request::new(ReceiverStream::new(rx));
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    let mut replies = tokio::time::timeout(DEADLINE, client.chat(request))
        .await
        .expect("the chat's headers within the deadline")
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, replies.message())
        .await
        .expect("the first reply within the deadline")
        .unwrap()
        .expect("a reply");
    assert_eq!(first.message, "hello");
    (tx, replies)
}

#[tokio::test]
async fn a_chat_dropped_by_its_caller_is_cancelled_at_the_plugin_directly_and_through_the_router() {
    let mesh = Mesh::start(ONE_ECHO).await;
    mesh.wait_instances("plugin.echo", 1).await;

    // Directly: mesh::connect dials the instance's socket.
    let mut direct = EchoClient::new(mesh.connect("plugin.echo").await);
    let (still_open, replies) = chat_once(&mut direct, None).await;
    drop(replies);
    mesh.wait_lines(CANCELLED, 1).await;
    drop(still_open);

    // Through the router: the caller resets its stream to the router, which resets the
    // plugin's.
    let routed = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let mut routed = EchoClient::new(routed);
    let (still_open, replies) = chat_once(&mut routed, None).await;
    drop(replies);
    mesh.wait_lines(CANCELLED, 2).await;
    drop(still_open);

    // A chat that ends normally is not a cancellation: two messages, then the caller's end.
    let (more, mut replies) = chat_once(&mut routed, None).await;
    more.send(EchoRequest {
        message: "again".into(),
    })
    .await
    .unwrap();
    let second = tokio::time::timeout(DEADLINE, replies.message())
        .await
        .unwrap();
    assert_eq!(second.unwrap().unwrap().message, "again");
    drop(more);
    let end = tokio::time::timeout(DEADLINE, replies.message())
        .await
        .expect("the end of the chat within the deadline");
    assert!(matches!(end, Ok(None)), "{end:?}");
    // The plugin drops a finished chat's replies before the caller sees the end, and its log
    // lines arrive in order: once a later cancellation is logged, a wrong "cancelled after 2
    // replies" would have been too.
    let (still_open, replies) = chat_once(&mut routed, None).await;
    drop(replies);
    mesh.wait_lines(CANCELLED, 3).await;
    drop(still_open);
    assert!(
        !mesh.output().contains("Chat cancelled after 2 replies"),
        "{}",
        mesh.output()
    );
}

#[tokio::test]
async fn the_routers_deadline_cancels_an_open_chat_at_the_plugin() {
    let mesh = Mesh::start(ONE_ECHO).await;
    mesh.wait_instances("plugin.echo", 1).await;
    let routed = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let mut routed = EchoClient::new(routed);

    // The caller keeps its side open and waits; the router's deadline ends the call.
    let (_still_open, mut replies) = chat_once(&mut routed, Some(Duration::from_millis(500))).await;
    let status = tokio::time::timeout(DEADLINE, replies.message())
        .await
        .expect("the deadline within the test's deadline")
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    mesh.wait_lines(CANCELLED, 1).await;
}
