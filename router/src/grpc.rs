//! What the router accepts as a gRPC call, answered as the gRPC-over-HTTP/2 spec says before
//! anything is routed: a method other than POST gets HTTP 405, a content type that is not
//! `application/grpc*` HTTP 415, a header list over the router's limit `RESOURCE_EXHAUSTED`
//! (as gRPC servers answer, rather than hyper's bare 431). gRPC requests carry no trailers:
//! whatever a client sends after its last message is dropped, never forwarded (h2 itself
//! strips pseudo-headers from trailers and resets streams whose trailers carry
//! connection-specific fields).
//!
//! The checks read the method, one header and the header list's lengths: no allocation.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Status;

use crate::body::RouterBody;

/// What HTTP/2 adds to each field of a header list when it counts its size (RFC 9113 6.5.2).
const FIELD_OVERHEAD: usize = 32;

/// The answer to a request that is not a gRPC call the router takes, or `Ok`.
pub(crate) fn check<B>(
    request: &Request<B>,
    max_header_list_size: usize,
) -> Result<(), Box<Response<RouterBody>>> {
    if request.method() != Method::POST {
        let mut response = refusal(
            Status::unimplemented(format!(
                "{} {}: gRPC calls are POST requests",
                request.method(),
                request.uri().path()
            )),
            StatusCode::METHOD_NOT_ALLOWED,
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Err(Box::new(response));
    }
    let content_type = request.headers().get(header::CONTENT_TYPE);
    if !content_type.is_some_and(|value| is_grpc(value.as_bytes())) {
        let shown = content_type.map_or_else(
            || "none".to_owned(),
            |v| format!("{:?}", String::from_utf8_lossy(v.as_bytes())),
        );
        return Err(Box::new(refusal(
            Status::internal(format!(
                "content-type {shown} is not gRPC: the router takes application/grpc calls only"
            )),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        )));
    }
    let size = header_list_size(request);
    if size > max_header_list_size {
        return Err(Box::new(
            Status::resource_exhausted(format!(
                "request metadata is {size} bytes, over the router's limit of \
                 {max_header_list_size} (max_header_list_size; -bin values count base64-encoded)"
            ))
            .into_http(),
        ));
    }
    Ok(())
}

/// `application/grpc`, `application/grpc+proto`, `application/grpc;charset=...`.
fn is_grpc(content_type: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    content_type.len() >= GRPC.len()
        && content_type[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(content_type.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// The size of the request's header list as HTTP/2 counts it, pseudo-headers included.
fn header_list_size<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let pseudo = [
        ":method".len() + request.method().as_str().len(),
        ":scheme".len() + uri.scheme_str().map_or(0, str::len),
        ":authority".len() + uri.authority().map_or(0, |a| a.as_str().len()),
        ":path".len() + uri.path_and_query().map_or(0, |p| p.as_str().len()),
    ]
    .iter()
    .map(|n| n + FIELD_OVERHEAD)
    .sum::<usize>();
    request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + FIELD_OVERHEAD)
        .sum::<usize>()
        + pseudo
}

/// A refusal with an HTTP status other than 200; the gRPC status rides along in the headers
/// for clients that read it.
fn refusal(status: Status, http: StatusCode) -> Response<RouterBody> {
    let mut response = status.into_http::<RouterBody>();
    *response.status_mut() = http;
    response
}

/// A request body as the router forwards it: its messages, and never its trailers.
pub(crate) struct RequestBody<B> {
    inner: B,
    /// Trailers came (and were dropped): the body is over.
    ended: bool,
}

impl<B> RequestBody<B> {
    pub(crate) fn new(inner: B) -> Self {
        Self {
            inner,
            ended: false,
        }
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if !frame.is_data() => {
                tracing::debug!("dropped the request's trailers: gRPC requests have none");
                this.ended = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn request(method: Method, content_type: Option<&str>) -> Request<()> {
        let mut builder = Request::builder()
            .method(method)
            .uri("http://plugin.echo/echo.v1.Echo/Echo");
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        builder.body(()).unwrap()
    }

    fn refused(request: &Request<()>) -> (StatusCode, String) {
        let response = check(request, 16 << 10).unwrap_err();
        let grpc = response.headers()["grpc-status"]
            .to_str()
            .unwrap()
            .to_owned();
        (response.status(), grpc)
    }

    #[test]
    fn only_grpc_posts_pass() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;charset=utf-8",
            "Application/GRPC",
        ] {
            assert!(
                check(&request(Method::POST, Some(ct)), 16 << 10).is_ok(),
                "{ct}"
            );
        }
        for method in [Method::GET, Method::PUT, Method::DELETE, Method::OPTIONS] {
            let (http, grpc) = refused(&request(method.clone(), Some("application/grpc")));
            assert_eq!(
                (http, grpc.as_str()),
                (StatusCode::METHOD_NOT_ALLOWED, "12"),
                "{method}"
            );
        }
        for ct in [
            None,
            Some("text/plain"),
            Some("application/grpcx"),
            Some("application/json"),
        ] {
            let (http, _) = refused(&request(Method::POST, ct));
            assert_eq!(http, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        }
    }

    #[test]
    fn a_header_list_over_the_limit_is_resource_exhausted() {
        let mut big = request(Method::POST, Some("application/grpc"));
        let size = header_list_size(&big);
        assert!(check(&big, size).is_ok(), "exactly the limit passes");
        big.headers_mut()
            .insert("x-big", HeaderValue::from_str(&"a".repeat(100)).unwrap());
        assert_eq!(header_list_size(&big), size + 5 + 100 + 32);
        let response = check(&big, size + 100).unwrap_err();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "8");
        let message = response.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains("max_header_list_size"), "{message}");
    }

    #[tokio::test]
    async fn request_trailers_are_never_forwarded() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-trailer", HeaderValue::from_static("1"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"message"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = RequestBody::new(StreamBody::new(futures_util::stream::iter(frames)));
        let collected = body.collect().await.unwrap();
        assert!(collected.trailers().is_none());
        assert_eq!(collected.to_bytes(), "message");
    }
}
