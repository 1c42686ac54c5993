//! Calls the demo's echo plugin by name through the mesh:
//!
//! ```text
//! cargo build --workspace --bins --examples            # one build for both
//! target/debug/mesh up --config deploy/local.toml      # in one terminal
//! cargo run --example client -- hello                  # in another
//! ```
//!
//! It finds the router through `MESH_SOCKET` (or the default socket), or `MESH_ROUTER` for a
//! router on another machine.

use mesh_proto::echo::v1::{EchoRequest, ExpandRequest, echo_client::EchoClient};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let message = std::env::args().nth(1).unwrap_or_else(|| "hello".into());
    let channel = mesh::connect("plugin.echo").await?;
    println!("plugin.echo has {} instance(s)", channel.instances());
    let mut echo = EchoClient::new(channel);

    for _ in 0..4 {
        let reply = echo
            .echo(EchoRequest {
                message: message.clone(),
            })
            .await?
            .into_inner();
        println!("Echo    -> {:?} from {}", reply.message, reply.instance);
    }

    let mut replies = echo
        .expand(ExpandRequest {
            message: message.clone(),
            count: 3,
        })
        .await?
        .into_inner();
    while let Some(reply) = replies.message().await? {
        println!("Expand  -> {:?} from {}", reply.message, reply.instance);
    }

    let words = message
        .split_whitespace()
        .map(|w| EchoRequest { message: w.into() });
    let reply = echo
        .collect(tokio_stream::iter(words.collect::<Vec<_>>()))
        .await?
        .into_inner();
    println!("Collect -> {:?} from {}", reply.message, reply.instance);

    let requests = (1..=2).map(|i| EchoRequest {
        message: format!("{message} #{i}"),
    });
    let mut replies = echo
        .chat(tokio_stream::iter(requests.collect::<Vec<_>>()))
        .await?
        .into_inner();
    while let Some(reply) = replies.message().await? {
        println!("Chat    -> {:?} from {}", reply.message, reply.instance);
    }
    Ok(())
}
