//! The reference mesh plugin: `echo.v1.Echo` with unary, server-streaming, client-streaming
//! and bidi calls, each reply naming the instance that answered. Plugin authors copy this file.
//!
//! Run by `mesh up`, or by hand:
//! `PLUGIN_SOCKET=/tmp/echo.sock PLUGIN_NAME=echo PLUGIN_INSTANCE=echo-dev echo-plugin`.
//!
//! For tests of deadlines, cancellation and flow control, a request may carry
//! `x-echo-delay-ms: N`: `Echo` waits N ms before answering, `Expand` waits N ms before each
//! reply. A call dropped by its caller before it finished is logged to stderr
//! (`Echo cancelled after N ms`, `Expand cancelled after N replies`, `Chat cancelled after N
//! replies`).

use std::{
    pin::Pin,
    process::ExitCode,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use mesh::plugin::Plugin;
use mesh_proto::echo::v1::{
    EchoReply, EchoRequest, ExpandRequest,
    echo_server::{Echo, EchoServer},
};
use tokio::time::Sleep;
use tokio_stream::{Stream, StreamExt};
use tonic::{
    Request, Response, Status, Streaming,
    metadata::{KeyAndValueRef, MetadataMap},
};

/// Most replies one `Expand` call may ask for, so one call cannot hold the plugin forever.
const MAX_EXPAND: u32 = 100_000;
/// Request metadata that slows a call down (milliseconds), for tests.
const DELAY: &str = "x-echo-delay-ms";
/// The longest delay accepted.
const MAX_DELAY: Duration = Duration::from_secs(60);

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
        if let Some(delay) = delay(request.metadata())? {
            tracing::info!("Echo waiting {} ms", delay.as_millis());
            let watch = Unfinished::new();
            tokio::time::sleep(delay).await;
            watch.finished();
        }
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
        let delay = delay(request.metadata())?;
        let ExpandRequest { message, count } = request.into_inner();
        if count > MAX_EXPAND {
            return Err(Status::invalid_argument(format!(
                "count {count} is over the limit of {MAX_EXPAND}"
            )));
        }
        Ok(Response::new(Box::pin(Replies {
            reply: self.reply(message),
            left: count,
            sent: 0,
            delay,
            sleep: None,
        })))
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
        Ok(Response::new(Box::pin(ChatReplies {
            requests: request.into_inner(),
            instance: self.instance.clone(),
            sent: 0,
            ended: false,
        })))
    }
}

/// `Chat`'s replies, one per request as it comes; dropped before the caller ended its side
/// (the caller reset the stream, or its deadline passed), it logs how far it got.
struct ChatReplies {
    requests: Streaming<EchoRequest>,
    instance: Arc<str>,
    sent: u32,
    /// The caller's requests ended (or failed): the chat is over either way.
    ended: bool,
}

impl Stream for ChatReplies {
    type Item = Result<EchoReply, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.requests).poll_next(cx);
        match polled {
            Poll::Ready(Some(Ok(request))) => {
                self.sent += 1;
                Poll::Ready(Some(Ok(EchoReply {
                    message: request.message,
                    instance: self.instance.to_string(),
                })))
            }
            Poll::Ready(Some(Err(status))) => {
                // A reset reaches the handler as an error on the requests: that is the
                // cancellation, logged on drop.
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for ChatReplies {
    fn drop(&mut self) {
        if !self.ended {
            tracing::info!("Chat cancelled after {} replies", self.sent);
        }
    }
}

/// The `x-echo-delay-ms` of a request, if any.
fn delay(metadata: &MetadataMap) -> Result<Option<Duration>, Status> {
    let Some(value) = metadata.get(DELAY) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_DELAY)
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{DELAY} must be a number of milliseconds up to {}",
                MAX_DELAY.as_millis()
            ))
        })
}

/// Logs `Echo cancelled after N ms` if dropped before [`Unfinished::finished`]: the caller
/// went away (cancelled, or its deadline passed) while the call was waiting.
struct Unfinished(Option<Instant>);

impl Unfinished {
    fn new() -> Self {
        Self(Some(Instant::now()))
    }

    fn finished(mut self) {
        self.0 = None;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(started) = self.0 {
            tracing::info!("Echo cancelled after {} ms", started.elapsed().as_millis());
        }
    }
}

/// `Expand`'s replies, produced as the caller reads them (HTTP/2 flow control holds this
/// stream back when the caller reads slowly); dropped early, it logs how far it got.
struct Replies {
    reply: EchoReply,
    left: u32,
    sent: u32,
    delay: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Stream for Replies {
    type Item = Result<EchoReply, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if let Some(delay) = self.delay {
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        self.left -= 1;
        self.sent += 1;
        Poll::Ready(Some(Ok(self.reply.clone())))
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        if self.left > 0 {
            tracing::info!("Expand cancelled after {} replies", self.sent);
        }
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

// One thread: a light handler is done long before another thread could be woken to help,
// and on a many-core machine a work-stealing runtime spends more waking idle workers than
// echoing. Scale an echo plugin with instances (`mesh scale echo N`), one core each.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let plugin = match Plugin::from_env() {
        Ok(plugin) => plugin,
        Err(error) => {
            eprintln!("echo-plugin: {error}");
            return ExitCode::from(64);
        }
    };
    // Logs on stderr (text without timestamps when the manager captures them, JSON when it
    // logs JSON), and spans exported when the manager hands over an OTLP endpoint.
    let _telemetry = plugin.init_telemetry();
    let echo = EchoService {
        instance: plugin.instance().into(),
    };
    // One line on stdout, so an operator sees in `mesh logs` which process answered when. The
    // pid as the host sees it (`/proc` is the host's): under `mesh up` each instance runs in a
    // PID namespace of its own, where getpid() says 2.
    let pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        .unwrap_or_else(std::process::id);
    println!("echo-plugin {} starting (pid {pid})", plugin.instance());
    // tonic decodes at most 4 MiB unless told: carry what the mesh is configured for.
    let limit = plugin.max_message_size();
    let echo = EchoServer::new(echo)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let served = plugin
        .add_service(echo)
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
