//! The host picks the transport: a plugin with `transport = "tcp"` serves on the loopback port
//! the manager hands it (`PLUGIN_ADDRESS`), and is reached by name like any other.

use mesh::{Address, Channel};
use mesh_proto::echo::v1::echo_client::EchoClient;

use crate::{
    routing::{all_four_kinds, echo},
    support::{Mesh, grpcurl_ok},
};

const TCP_ECHOES: &str = r#"
[[plugin]]
name = "echo"
command = "{echo}"
instances = 2
transport = "tcp"
"#;

#[tokio::test]
async fn a_tcp_plugin_is_ready_and_answers_by_name_directly_and_through_the_router() {
    let mesh = Mesh::start(TCP_ECHOES).await;
    let instances = mesh.wait_instances("plugin.echo", 2).await;
    for instance in &instances {
        // Registered at the loopback port it was given, not a socket.
        let address: Address = instance.endpoint.parse().unwrap();
        match address {
            Address::Tcp(hostport) => assert!(hostport.starts_with("127.0.0.1:"), "{hostport}"),
            other => panic!("{} registered at {other}", instance.id),
        }
    }
    assert_ne!(instances[0].endpoint, instances[1].endpoint);

    // mesh::connect dials the instances' TCP addresses itself.
    let channel = mesh.connect("plugin.echo").await;
    assert_eq!(channel.instances(), 2);
    all_four_kinds(&mut EchoClient::new(channel)).await;

    // The router forwards by name to them.
    let through_router =
        Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let reply = EchoClient::new(through_router)
        .echo(echo("over tcp"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "over tcp");

    // And grpcurl by name, reflection included.
    let router = mesh.socket.display().to_string();
    let reply = grpcurl_ok(&[
        "-unix",
        "-authority",
        "plugin.echo",
        "-d",
        r#"{"message":"grpcurl"}"#,
        &router,
        "echo.v1.Echo/Echo",
    ]);
    assert!(reply.contains(r#""message": "grpcurl""#), "{reply}");
}
