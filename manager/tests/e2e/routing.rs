//! Calls by name: `mesh::connect` directly to instances, the router by `:authority`, grpcurl.

use std::{collections::BTreeMap, time::Duration};

use mesh::{Address, Channel};
use mesh_proto::echo::v1::{EchoRequest, ExpandRequest, echo_client::EchoClient};
use tonic::{Code, Request, metadata::MetadataValue};

use crate::{
    lifecycle::TWO_ECHOES,
    support::{Mesh, grpcurl, grpcurl_ok},
};

pub fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
    }
}

/// All four kinds of call, each checked for content and order.
pub async fn all_four_kinds(client: &mut EchoClient<Channel>) {
    let reply = client.echo(echo("one")).await.unwrap().into_inner();
    assert_eq!(reply.message, "one");
    assert!(reply.instance.starts_with("echo-"), "{}", reply.instance);

    let request = ExpandRequest {
        message: "many".into(),
        count: 5,
    };
    let mut stream = client.expand(request).await.unwrap().into_inner();
    let mut replies = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        replies.push(reply.message);
    }
    assert_eq!(replies, vec!["many"; 5]);

    let words = ["a", "b", "c"].map(echo);
    let reply = client
        .collect(tokio_stream::iter(words))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "a b c");

    let lines = ["x", "y", "z"].map(echo);
    let mut stream = client
        .chat(tokio_stream::iter(lines))
        .await
        .unwrap()
        .into_inner();
    let mut replies = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        replies.push(reply.message);
    }
    assert_eq!(replies, ["x", "y", "z"]);
}

/// Metadata, ASCII and binary, goes to the plugin and its echo comes back; an error status and
/// its metadata travel in the trailers.
pub async fn metadata_and_trailers_round_trip(client: &mut EchoClient<Channel>) {
    // Metadata, ASCII and binary, goes to the plugin and its echo comes back.
    let mut request = Request::new(echo("meta"));
    request
        .metadata_mut()
        .insert("x-trace", "abc-123".parse().unwrap());
    request
        .metadata_mut()
        .insert_bin("x-blob-bin", MetadataValue::from_bytes(&[0, 1, 2, 255]));
    let response = client.echo(request).await.unwrap();
    assert_eq!(response.metadata().get("x-trace").unwrap(), "abc-123");
    let blob = response
        .metadata()
        .get_bin("x-blob-bin")
        .unwrap()
        .to_bytes()
        .unwrap();
    assert_eq!(&blob[..], &[0, 1, 2, 255]);

    // An error status and its metadata travel in the trailers.
    let mut request = Request::new(echo("refused on purpose"));
    request
        .metadata_mut()
        .insert("x-echo-status", "9".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-detail", "why".parse().unwrap());
    let status = client.echo(request).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "refused on purpose");
    assert_eq!(status.metadata().get("x-detail").unwrap(), "why");
}

#[tokio::test]
async fn connect_spreads_calls_across_instances_and_streams_work() {
    let mesh = Mesh::start(TWO_ECHOES).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let channel = mesh.connect("plugin.echo").await;
    assert_eq!(channel.instances(), 2);
    let mut client = EchoClient::new(channel);

    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..100 {
        let reply = client
            .echo(echo(&format!("call {i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.message, format!("call {i}"));
        *answered.entry(reply.instance).or_default() += 1;
    }
    let instances: Vec<&String> = answered.keys().collect();
    assert_eq!(
        instances,
        ["echo-0", "echo-1"],
        "100 calls reach both: {answered:?}"
    );
    all_four_kinds(&mut client).await;
}

#[tokio::test]
async fn the_router_forwards_every_kind_of_call_with_metadata_and_trailers() {
    let mesh = Mesh::start(TWO_ECHOES).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let through_router =
        Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let mut client = EchoClient::new(through_router.clone());
    all_four_kinds(&mut client).await;

    metadata_and_trailers_round_trip(&mut client).await;

    // The mesh-service header routes as well as the authority does.
    let mut by_header = EchoClient::new(Channel::to_server(Address::Unix(mesh.socket.clone())));
    let mut request = Request::new(echo("by header"));
    request
        .metadata_mut()
        .insert("mesh-service", "plugin.echo".parse().unwrap());
    assert_eq!(
        by_header.echo(request).await.unwrap().into_inner().message,
        "by header"
    );
}

#[tokio::test]
async fn an_unknown_service_is_unavailable_and_named() {
    let mesh = Mesh::start(TWO_ECHOES).await;
    mesh.wait_instances("plugin.echo", 2).await;
    let channel = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.nope").unwrap();
    let mut client = EchoClient::new(channel);
    let call = client.echo(echo("anyone?"));
    let status = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("an answer, not a hang")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("unknown service \"plugin.nope\""),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("registered: plugin.echo"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("mesh.v1.Registry/List"),
        "says how to list: {}",
        status.message()
    );

    // A direct channel to a name without instances fails fast too.
    let channel = mesh.connect("plugin.nope").await;
    assert_eq!(channel.instances(), 0);
    let mut client = EchoClient::new(channel);
    let call = client.echo(echo("anyone?"));
    let status = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("an answer, not a hang")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .contains("no ready instance of plugin.nope"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn connect_without_a_router_says_how_to_fix_it() {
    let dir = crate::support::short_tempdir();
    let missing = dir.path().join("none.sock");
    let error = mesh::Connector::local(&missing)
        .connect("plugin.echo")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains(&missing.display().to_string()), "{error}");
    assert!(error.contains("is `mesh up` running?"), "{error}");
}

#[tokio::test]
async fn grpcurl_works_through_the_router_and_on_a_plugin_socket() {
    let mesh = Mesh::start(TWO_ECHOES).await;
    let instances = mesh.wait_instances("plugin.echo", 2).await;
    let router = mesh.socket.display().to_string();
    let plugin = instances[0].socket().display().to_string();

    for (authority, socket) in [
        ("plugin.echo", router.as_str()),
        ("localhost", plugin.as_str()),
    ] {
        // grpcurl [flags] address [verb or method]
        let run = |flags: &[&str], verb: &[&str]| {
            let mut args = vec!["-unix", "-authority", authority];
            args.extend_from_slice(flags);
            args.push(socket);
            args.extend_from_slice(verb);
            grpcurl_ok(&args)
        };

        let list = run(&[], &["list"]);
        assert!(list.contains("echo.v1.Echo"), "{authority}: {list}");
        assert!(
            list.contains("grpc.health.v1.Health"),
            "{authority}: {list}"
        );

        let described = run(&[], &["describe", "echo.v1.Echo"]);
        assert!(
            described.contains(
                "rpc Chat ( stream .echo.v1.EchoRequest ) returns ( stream .echo.v1.EchoReply )"
            ),
            "{described}"
        );

        let reply = run(&["-d", r#"{"message":"hi"}"#], &["echo.v1.Echo/Echo"]);
        assert!(reply.contains(r#""message": "hi""#), "{reply}");

        let replies = run(
            &["-d", r#"{"message":"hi","count":3}"#],
            &["echo.v1.Echo/Expand"],
        );
        assert_eq!(
            replies.matches(r#""message": "hi""#).count(),
            3,
            "{replies}"
        );

        let health = run(&[], &["grpc.health.v1.Health/Check"]);
        assert!(health.contains("SERVING"), "{health}");
    }

    // The router's own API, addressed as localhost.
    let own = grpcurl_ok(&["-unix", "-authority", "localhost", &router, "list"]);
    assert!(own.contains("mesh.v1.Registry"), "{own}");
    assert!(
        own.contains("mesh.v1.Host"),
        "host services are listed: {own}"
    );
    let listed = grpcurl_ok(&[
        "-unix",
        "-authority",
        "localhost",
        &router,
        "mesh.v1.Registry/List",
    ]);
    assert!(
        listed.contains("plugin.echo") && listed.contains("echo-1"),
        "{listed}"
    );

    // Documented quirk: without -authority grpcurl sends the socket path, which HTTP/2 rejects.
    let out = grpcurl(&["-unix", &plugin, "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PROTOCOL_ERROR"));
}
