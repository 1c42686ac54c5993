//! What one export may cost the manager, decided from its bytes before anything is decoded:
//! the request body is refused as soon as its gRPC length prefix announces more than the
//! relay's size limit ([`Bounded`]), and the whole message is walked once on the wire
//! ([`cost`]) to count its spans and what decoding it would allocate, so that a message of
//! tiny elements (a 2-byte empty span decodes to a few hundred bytes) is refused before it is
//! decoded rather than after. The figures behind the limits are in `docs/telemetry.md`.

use std::{
    mem::size_of,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status as SpanStatus, span},
};
use tonic::Status;

/// Messages nested deeper than this are refused: the walk (and prost's decode) recurse once
/// per level, and no real export nests attribute values this deep.
const MAX_DEPTH: usize = 32;

/// The bounds one export is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    /// Largest message on the wire, in bytes (the gRPC length prefix).
    pub(super) bytes: usize,
    /// Most spans in one export.
    pub(super) spans: usize,
    /// Most bytes decoding one export may allocate (as [`cost`] estimates it).
    pub(super) decoded: usize,
}

/// A request body refused with `RESOURCE_EXHAUSTED` as soon as its gRPC length prefix
/// announces a message larger than the limit, or more bytes arrive than one such message: the
/// decoder never buffers past it.
#[derive(Debug)]
pub(super) struct Bounded<B> {
    inner: B,
    limit: usize,
    prefix: [u8; 5],
    have: usize,
    seen: usize,
}

impl<B> Bounded<B> {
    /// `inner`, refused past a message of `limit` bytes.
    pub(super) fn new(inner: B, limit: usize) -> Self {
        Self {
            inner,
            limit,
            prefix: [0; 5],
            have: 0,
            seen: 0,
        }
    }

    /// Takes note of `data`; the refusal once it is past the limit.
    fn take(&mut self, data: &[u8]) -> Result<(), Status> {
        self.seen = self.seen.saturating_add(data.len());
        let wanted = (self.prefix.len() - self.have).min(data.len());
        self.prefix[self.have..self.have + wanted].copy_from_slice(&data[..wanted]);
        self.have += wanted;
        let announced = match self.have {
            5 => u32::from_be_bytes([
                self.prefix[1],
                self.prefix[2],
                self.prefix[3],
                self.prefix[4],
            ]) as usize,
            _ => 0,
        };
        if announced > self.limit || self.seen > self.limit.saturating_add(5) {
            return Err(too_large(announced.max(self.seen - 5), self.limit));
        }
        Ok(())
    }
}

fn too_large(found: usize, limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "the mesh's trace relay takes exports of at most {limit} bytes, this one has {found}: \
         export smaller batches (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)"
    ))
}

impl<B> Body for Bounded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref()
            && let Err(refused) = this.take(data)
        {
            return Poll::Ready(Some(Err(refused)));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The message types of an export, as far as the walk must tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    ResourceSpans,
    Resource,
    EntityRef,
    ScopeSpans,
    Scope,
    Span,
    Event,
    Link,
    Status,
    KeyValue,
    AnyValue,
    ArrayValue,
    KeyValueList,
}

/// What a length-delimited field holds.
enum Field {
    /// A message of this kind (one more element of a repeated field, or an optional one).
    Message(Kind),
    /// One more string of a repeated string field.
    RepeatedString,
    /// Bytes kept as they are (a string, bytes): their cost is their length.
    Bytes,
}

impl Kind {
    /// What decoding one more of these allocates beyond its bytes on the wire: the struct,
    /// twice (a `Vec` grows by doubling).
    fn cost(self) -> usize {
        2 * match self {
            Kind::Request => size_of::<ExportTraceServiceRequest>(),
            Kind::ResourceSpans => size_of::<ResourceSpans>(),
            Kind::Resource => size_of::<Resource>(),
            Kind::EntityRef => size_of::<EntityRef>(),
            Kind::ScopeSpans => size_of::<ScopeSpans>(),
            Kind::Scope => size_of::<InstrumentationScope>(),
            Kind::Span => size_of::<Span>(),
            Kind::Event => size_of::<span::Event>(),
            Kind::Link => size_of::<span::Link>(),
            Kind::Status => size_of::<SpanStatus>(),
            Kind::KeyValue => size_of::<KeyValue>(),
            Kind::AnyValue => size_of::<AnyValue>(),
            Kind::ArrayValue => size_of::<ArrayValue>(),
            Kind::KeyValueList => size_of::<KeyValueList>(),
        }
    }

    /// The field numbered `number` of this message (opentelemetry-proto's `trace.proto`,
    /// `common.proto`, `resource.proto`).
    fn field(self, number: u64) -> Field {
        use Field::{Bytes, Message, RepeatedString};
        match (self, number) {
            (Kind::Request, 1) => Message(Kind::ResourceSpans),
            (Kind::ResourceSpans, 1) => Message(Kind::Resource),
            (Kind::ResourceSpans, 2) => Message(Kind::ScopeSpans),
            (Kind::Resource, 1) => Message(Kind::KeyValue),
            (Kind::Resource, 3) => Message(Kind::EntityRef),
            (Kind::EntityRef, 3 | 4) => RepeatedString,
            (Kind::ScopeSpans, 1) => Message(Kind::Scope),
            (Kind::ScopeSpans, 2) => Message(Kind::Span),
            (Kind::Scope, 3) => Message(Kind::KeyValue),
            (Kind::Span, 9) => Message(Kind::KeyValue),
            (Kind::Span, 11) => Message(Kind::Event),
            (Kind::Span, 13) => Message(Kind::Link),
            (Kind::Span, 15) => Message(Kind::Status),
            (Kind::Event, 3) => Message(Kind::KeyValue),
            (Kind::Link, 4) => Message(Kind::KeyValue),
            (Kind::KeyValue, 2) => Message(Kind::AnyValue),
            (Kind::AnyValue, 5) => Message(Kind::ArrayValue),
            (Kind::AnyValue, 6) => Message(Kind::KeyValueList),
            (Kind::ArrayValue, 1) => Message(Kind::AnyValue),
            (Kind::KeyValueList, 1) => Message(Kind::KeyValue),
            _ => Bytes,
        }
    }
}

/// What decoding `message` (an encoded `ExportTraceServiceRequest`) would allocate, in bytes,
/// or the refusal: `RESOURCE_EXHAUSTED` past `limits`' spans or decoded size (or nesting),
/// `INVALID_ARGUMENT` for bytes that are not a message.
pub(super) fn cost(message: &[u8], limits: &Limits) -> Result<usize, Status> {
    let mut tally = Tally {
        spans: 0,
        decoded: message.len() + Kind::Request.cost(),
        limits,
    };
    tally.walk(message, Kind::Request, 0)?;
    Ok(tally.decoded)
}

struct Tally<'a> {
    spans: usize,
    decoded: usize,
    limits: &'a Limits,
}

impl Tally<'_> {
    fn walk(&mut self, mut message: &[u8], kind: Kind, depth: usize) -> Result<(), Status> {
        if depth > MAX_DEPTH {
            return Err(Status::resource_exhausted(format!(
                "the mesh's trace relay refuses exports nested more than {MAX_DEPTH} messages \
                 deep"
            )));
        }
        while !message.is_empty() {
            let key = varint(&mut message)?;
            let (number, wire) = (key >> 3, key & 7);
            match wire {
                0 => {
                    varint(&mut message)?;
                }
                1 => message = skip(message, 8)?,
                5 => message = skip(message, 4)?,
                2 => {
                    let len = usize::try_from(varint(&mut message)?).map_err(|_| malformed())?;
                    if len > message.len() {
                        return Err(malformed());
                    }
                    let (inner, rest) = message.split_at(len);
                    message = rest;
                    match kind.field(number) {
                        Field::Message(child) => {
                            self.add(child)?;
                            self.walk(inner, child, depth + 1)?;
                        }
                        Field::RepeatedString => self.grow(2 * size_of::<String>())?,
                        Field::Bytes => {}
                    }
                }
                _ => return Err(malformed()),
            }
        }
        Ok(())
    }

    fn add(&mut self, kind: Kind) -> Result<(), Status> {
        if kind == Kind::Span {
            self.spans += 1;
            if self.spans > self.limits.spans {
                return Err(Status::resource_exhausted(format!(
                    "the mesh's trace relay takes at most {} spans in one export: export \
                     smaller batches (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)",
                    self.limits.spans
                )));
            }
        }
        self.grow(kind.cost())
    }

    fn grow(&mut self, bytes: usize) -> Result<(), Status> {
        self.decoded = self.decoded.saturating_add(bytes);
        if self.decoded > self.limits.decoded {
            return Err(Status::resource_exhausted(format!(
                "the mesh's trace relay takes exports that decode to at most {} bytes; this one \
                 has more elements than that allows (attributes, events, links, values): \
                 export smaller batches (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)",
                self.limits.decoded
            )));
        }
        Ok(())
    }
}

fn malformed() -> Status {
    Status::invalid_argument("the export is not an encoded ExportTraceServiceRequest")
}

fn skip(message: &[u8], n: usize) -> Result<&[u8], Status> {
    message.get(n..).ok_or_else(malformed)
}

fn varint(message: &mut &[u8]) -> Result<u64, Status> {
    let mut value = 0u64;
    for shift in 0..10 {
        let (&byte, rest) = message.split_first().ok_or_else(malformed)?;
        *message = rest;
        value |= u64::from(byte & 0x7f) << (7 * shift);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use prost::Message;

    const LIMITS: Limits = Limits {
        bytes: 4 << 20,
        spans: 10_000,
        decoded: 16 << 20,
    };

    fn export(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    #[test]
    fn an_ordinary_export_costs_a_small_multiple_of_its_bytes() {
        let attribute = |key: &str| KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(
                    "a value of some length".into(),
                )),
            }),
            ..KeyValue::default()
        };
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "GET /things/{id}".into(),
            attributes: (0..10)
                .map(|i| attribute(&format!("http.attr{i}")))
                .collect(),
            events: vec![span::Event {
                name: "event".into(),
                attributes: vec![attribute("e")],
                ..span::Event::default()
            }],
            ..Span::default()
        };
        let encoded = export(vec![span; 512]).encode_to_vec();
        let cost = cost(&encoded, &LIMITS).unwrap();
        assert!(cost < 8 * encoded.len(), "{cost} for {}", encoded.len());
    }

    #[test]
    fn empty_spans_are_counted_before_they_are_decoded() {
        let encoded = export(vec![Span::default(); 10_001]).encode_to_vec();
        let refused = cost(&encoded, &LIMITS).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("10000 spans"), "{refused}");
        let encoded = export(vec![Span::default(); 10_000]).encode_to_vec();
        assert!(cost(&encoded, &LIMITS).is_ok());
    }

    #[test]
    fn tiny_attributes_are_refused_past_the_decoded_bound() {
        // One span of empty attributes: 2 bytes each on the wire, a KeyValue each decoded.
        let span = Span {
            attributes: vec![KeyValue::default(); 1 << 18],
            ..Span::default()
        };
        let encoded = export(vec![span]).encode_to_vec();
        assert!(encoded.len() < LIMITS.bytes);
        let refused = cost(&encoded, &LIMITS).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("decode to at most"), "{refused}");
    }

    #[test]
    fn deep_values_and_garbage_are_refused() {
        let mut value = AnyValue::default();
        for _ in 0..40 {
            value = AnyValue {
                value: Some(any_value::Value::ArrayValue(ArrayValue {
                    values: vec![value],
                })),
            };
        }
        let span = Span {
            attributes: vec![KeyValue {
                key: "deep".into(),
                value: Some(value),
                ..KeyValue::default()
            }],
            ..Span::default()
        };
        let refused = cost(&export(vec![span]).encode_to_vec(), &LIMITS).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        for garbage in [&[0x0a, 0x05, 0x00][..], &[0xff; 11], &[0x0b]] {
            let refused = cost(garbage, &LIMITS).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{garbage:?}");
        }
    }

    #[test]
    fn the_body_is_refused_at_its_length_prefix() {
        let mut body = Bounded::new((), 100);
        // The prefix split over two frames: refused when the length is known.
        assert!(body.take(&[0, 0]).is_ok());
        let refused = body.take(&[0, 0, 101, 1, 2]).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("at most 100 bytes"), "{refused}");
        // A prefix that lies is caught by the count.
        let mut body = Bounded::new((), 100);
        assert!(body.take(&[0, 0, 0, 0, 1]).is_ok());
        assert!(body.take(&[0; 100]).is_ok());
        assert!(body.take(&[0]).is_err());
    }
}
