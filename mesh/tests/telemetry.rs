//! Trace context on `mesh::connect` calls: sent only once a tracer is installed, and then the
//! caller's current span's.

use std::pin::Pin;

use mesh_proto::echo::v1::{
    EchoReply, EchoRequest, ExpandRequest,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Answers with the `traceparent` the call carried, or `none`.
#[derive(Clone)]
struct Headers;

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Headers {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let parent = request
            .metadata()
            .get("traceparent")
            .map_or("none".to_owned(), |v| v.to_str().unwrap_or("?").to_owned());
        Ok(Response::new(EchoReply {
            message: parent,
            instance: String::new(),
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

async fn parent_sent(
    client: &mut EchoClient<mesh::Channel>,
    span: Option<&tracing::Span>,
) -> String {
    let call = client.echo(EchoRequest {
        message: String::new(),
    });
    let reply = match span {
        Some(span) => call.instrument(span.clone()).await,
        None => call.await,
    };
    reply.unwrap().into_inner().message
}

#[tokio::test]
async fn a_call_carries_the_callers_trace_only_once_a_tracer_is_installed() {
    let _served = mesh::inprocess::serve("test.trace-headers", EchoServer::new(Headers)).unwrap();
    let mut client = EchoClient::new(mesh::connect("test.trace-headers").await.unwrap());
    // A tracer that exports nowhere: the context is what is checked.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _subscriber = tracing::subscriber::set_default(subscriber);
    let span = tracing::info_span!("caller");

    // Off (the default): nothing added, even inside a span.
    assert!(!mesh::telemetry::active());
    assert_eq!(parent_sent(&mut client, Some(&span)).await, "none");

    mesh::telemetry::set_active(true);
    let context = span.context();
    let ids = context.span().span_context().clone();
    assert_eq!(
        parent_sent(&mut client, Some(&span)).await,
        format!("00-{:032x}-{:016x}-01", ids.trace_id(), ids.span_id())
    );
    // Outside any span there is no trace to carry.
    assert_eq!(parent_sent(&mut client, None).await, "none");
    mesh::telemetry::set_active(false);
    assert_eq!(parent_sent(&mut client, Some(&span)).await, "none");
}
