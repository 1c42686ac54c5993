//! The reference mesh plugin: `echo.v1.Echo` with unary, server-streaming, client-streaming
//! and bidi calls, each reply naming the instance that answered. Plugin authors copy this file.
//!
//! Run by `mesh up`, or by hand:
//! `PLUGIN_SOCKET=/tmp/echo.sock PLUGIN_NAME=echo PLUGIN_INSTANCE=echo-dev echo-plugin`.

use std::{io::IsTerminal, pin::Pin, process::ExitCode, sync::Arc};

use mesh::plugin::Plugin;
use mesh_proto::echo::v1::{
    EchoReply, EchoRequest, ExpandRequest,
    echo_server::{Echo, EchoServer},
};
use tokio_stream::{Stream, StreamExt};
use tonic::{
    Request, Response, Status, Streaming,
    metadata::{KeyAndValueRef, MetadataMap},
};

/// Most replies one `Expand` call may ask for, so one call cannot hold the plugin forever.
const MAX_EXPAND: u32 = 100_000;

struct EchoService {
    instance: Arc<str>,
}

impl EchoService {
    fn reply(&self, message: String) -> EchoReply {
        EchoReply {
            message,
            instance: self.instance.to_string(),
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    /// Echoes the message; request metadata whose key starts with `x-` comes back as response
    /// metadata, and `x-echo-status: CODE` answers with that status code instead (the metadata
    /// then travels in the trailers), so callers can check that metadata and trailers survive
    /// the way through the mesh.
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let echoed = echo_metadata(request.metadata());
        if let Some(code) = request.metadata().get("x-echo-status") {
            let code = code
                .to_str()
                .ok()
                .and_then(|c| c.parse::<i32>().ok())
                .ok_or_else(|| {
                    Status::invalid_argument("x-echo-status must be a status code number")
                })?;
            let message = request.into_inner().message;
            return Err(Status::with_metadata(code.into(), message, echoed));
        }
        let mut response = Response::new(self.reply(request.into_inner().message));
        *response.metadata_mut() = echoed;
        Ok(response)
    }

    type ExpandStream = ReplyStream;

    async fn expand(
        &self,
        request: Request<ExpandRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let ExpandRequest { message, count } = request.into_inner();
        if count > MAX_EXPAND {
            return Err(Status::invalid_argument(format!(
                "count {count} is over the limit of {MAX_EXPAND}"
            )));
        }
        let reply = self.reply(message);
        let replies = tokio_stream::iter((0..count).map(move |_| Ok(reply.clone())));
        Ok(Response::new(Box::pin(replies)))
    }

    async fn collect(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut requests = request.into_inner();
        let mut messages = Vec::new();
        while let Some(request) = requests.next().await {
            messages.push(request?.message);
        }
        Ok(Response::new(self.reply(messages.join(" "))))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let instance = self.instance.clone();
        let replies = request.into_inner().map(move |request| {
            request.map(|r| EchoReply {
                message: r.message,
                instance: instance.to_string(),
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

/// The request's `x-` metadata, ASCII and binary, as it came.
fn echo_metadata(metadata: &MetadataMap) -> MetadataMap {
    let mut echoed = MetadataMap::new();
    for entry in metadata.iter() {
        match entry {
            KeyAndValueRef::Ascii(key, value) if key.as_str().starts_with("x-") => {
                echoed.append(key.clone(), value.clone());
            }
            KeyAndValueRef::Binary(key, value) if key.as_str().starts_with("x-") => {
                echoed.append_bin(key.clone(), value.clone());
            }
            _ => {}
        }
    }
    echoed
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let plugin = match Plugin::from_env() {
        Ok(plugin) => plugin,
        Err(error) => {
            eprintln!("echo-plugin: {error}");
            return ExitCode::from(64);
        }
    };
    let echo = EchoService {
        instance: plugin.instance().into(),
    };
    // One line on stdout, so an operator sees in `mesh logs` which process answered when.
    println!(
        "echo-plugin {} starting (pid {})",
        plugin.instance(),
        std::process::id()
    );
    let served = plugin
        .add_service(EchoServer::new(echo))
        .file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET)
        .serve()
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("echo-plugin: {error}");
            ExitCode::FAILURE
        }
    }
}
