//! The `DeltaAggregatedResources` call itself: gRPC's framing over a tonic [`Channel`], with a
//! receive buffer that is given back after a large message.
//!
//! tonic's generated client reads each message into one buffer that it keeps, at the size of
//! the largest message, for as long as the stream lives. istiod's first response carries every
//! workload and service of the mesh in one message, so a mesh-node would hold a buffer of that
//! size for good (35 MB at 100,000 workloads, measured by `cargo xtask bench xds`: a quarter of
//! the state's memory). Here each message is read into a buffer of exactly its size, decoded
//! without copying the resource bodies out of it (`proto::Any`), and the buffer is freed with
//! the decoded response once it has been applied.
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{
    Code, Status, body::Body, client::GrpcService, metadata::MetadataMap, transport::Channel,
};

use super::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

const PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// gRPC's message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// A buffer that grew past this for one message is not kept for the next.
const KEEP: usize = 64 << 10;

/// The responses of an open stream.
pub struct Responses {
    body: Body,
    buf: BytesMut,
    max_message: usize,
}

/// Opens the stream: `requests` go out as they are sent, `metadata` (the bearer token and
/// cluster id) as headers; a response larger than `max_message` bytes ends it.
pub async fn open(
    channel: &mut Channel,
    metadata: MetadataMap,
    requests: mpsc::Receiver<DeltaDiscoveryRequest>,
    max_message: usize,
) -> Result<Responses, Status> {
    let frames =
        ReceiverStream::new(requests).map(|request| Ok::<_, Status>(Frame::data(encode(&request))));
    let mut request = http::Request::post(PATH)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Body::new(StreamBody::new(frames)))
        .map_err(|e| Status::internal(format!("request: {e}")))?;
    request.headers_mut().extend(metadata.into_headers());
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::unavailable(crate::error_chain(&e)))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::unavailable(crate::error_chain(&e)))?;
    let (parts, body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(Status::unknown(format!("HTTP status {}", parts.status)));
    }
    // A call refused at once answers with its status in the headers ("trailers only").
    if let Some(status) = Status::from_header_map(&parts.headers)
        && status.code() != Code::Ok
    {
        return Err(status);
    }
    Ok(Responses {
        body,
        buf: BytesMut::new(),
        max_message,
    })
}

impl Responses {
    /// The next response; `None` when the server ended the stream cleanly.
    pub async fn message(&mut self) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        loop {
            if let Some(message) = self.decode()? {
                return Ok(Some(message));
            }
            let Some(frame) = self.body.frame().await else {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(Status::internal("stream ended inside a message")),
                };
            };
            let frame = match frame?.into_data() {
                Ok(data) => {
                    self.buf.extend_from_slice(&data);
                    continue;
                }
                Err(frame) => frame,
            };
            if let Ok(trailers) = frame.into_trailers() {
                return match Status::from_header_map(&trailers) {
                    Some(status) if status.code() != Code::Ok => Err(status),
                    // A clean end must not pass off a cut message as nothing more to come.
                    Some(_) if !self.buf.is_empty() => {
                        Err(Status::internal("stream ended inside a message"))
                    }
                    Some(_) => Ok(None),
                    None => Err(Status::internal("trailers without grpc-status")),
                };
            }
        }
    }

    /// A whole message from the buffer, if one is there.
    fn decode(&mut self) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let Some(&[flag, a, b, c, d]) = self.buf.get(..PREFIX) else {
            return Ok(None);
        };
        if flag != 0 {
            return Err(Status::internal(
                "compressed message, though none was asked for",
            ));
        }
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len > self.max_message {
            return Err(Status::out_of_range(format!(
                "response of {len} bytes, over the limit of {}",
                self.max_message
            )));
        }
        if self.buf.len() < PREFIX + len {
            // Room for the whole message at once, not grown in doublings.
            self.buf.reserve(PREFIX + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(PREFIX);
        let message: Bytes = self.buf.split_to(len).freeze();
        if len > KEEP {
            // The big allocation goes with `message` (and what is decoded from it); what is
            // left of the next message moves to a small one.
            self.buf = BytesMut::from(&self.buf[..]);
        }
        DeltaDiscoveryResponse::decode(message)
            .map(Some)
            .map_err(|e| Status::internal(format!("decode response: {e}")))
    }
}

/// A message with gRPC's prefix, as it goes on the wire.
fn encode(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = Vec::with_capacity(PREFIX + len);
    out.push(0);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode_raw(&mut out);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::discovery::Resource;

    /// Responses read from `frames`, as the server's body would deliver them.
    fn responses(frames: Vec<Frame<Bytes>>, max_message: usize) -> Responses {
        let stream = tokio_stream::iter(frames.into_iter().map(Ok::<_, Status>));
        Responses {
            body: Body::new(StreamBody::new(stream)),
            buf: BytesMut::new(),
            max_message,
        }
    }

    fn framed(response: &DeltaDiscoveryResponse) -> Vec<u8> {
        encode(response).to_vec()
    }

    fn response(nonce: &str, resources: usize) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            nonce: nonce.into(),
            resources: (0..resources)
                .map(|i| Resource {
                    name: format!("resource-{i}"),
                    resource: Some(crate::proto::Any {
                        type_url: "t".into(),
                        value: vec![7; 100].into(),
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn trailers(code: &str, message: &str) -> Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        map.insert("grpc-status", code.parse().unwrap());
        map.insert("grpc-message", message.parse().unwrap());
        Frame::trailers(map)
    }

    #[tokio::test]
    async fn messages_split_and_joined_across_frames_arrive_whole_and_in_order() {
        let (first, second) = (response("n1", 3), response("n2", 1));
        let mut wire = framed(&first);
        wire.extend(framed(&second));
        // Every frame boundary falls somewhere odd: inside a prefix, inside a body, and one
        // frame ends the first message and starts the second.
        let frames = wire
            .chunks(7)
            .map(|c| Frame::data(Bytes::copy_from_slice(c)))
            .chain([trailers("0", "")])
            .collect();
        let mut responses = responses(frames, 1 << 20);
        assert_eq!(responses.message().await.unwrap(), Some(first));
        assert_eq!(responses.message().await.unwrap(), Some(second));
        assert_eq!(responses.message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn the_buffer_of_a_large_message_is_not_kept() {
        let large = response("large", 4_000);
        let small = response("small", 1);
        assert!(large.encoded_len() > 4 * KEEP);
        let mut wire = framed(&large);
        wire.extend(framed(&small));
        let frames = wire
            .chunks(16 << 10)
            .map(|c| Frame::data(Bytes::copy_from_slice(c)))
            .collect();
        let mut responses = responses(frames, 1 << 20);
        assert_eq!(responses.message().await.unwrap(), Some(large));
        assert!(
            responses.buf.capacity() <= KEEP,
            "{} bytes kept after a large message",
            responses.buf.capacity()
        );
        assert_eq!(responses.message().await.unwrap(), Some(small));
        assert_eq!(responses.message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn the_servers_error_status_ends_the_stream_with_its_message() {
        let frames = vec![
            Frame::data(framed(&response("n1", 1)).into()),
            trailers("16", "token expired"),
        ];
        let mut responses = responses(frames, 1 << 20);
        assert!(responses.message().await.unwrap().is_some());
        let status = responses.message().await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "token expired");
    }

    #[tokio::test]
    async fn bad_framing_is_an_error_that_says_what() {
        let mut oversized = framed(&response("n1", 10));
        let mut responses_ = responses(vec![Frame::data(oversized.clone().into())], 100);
        let status = responses_.message().await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange);
        assert!(
            status.message().contains("over the limit of 100"),
            "{status:?}"
        );

        oversized[0] = 1;
        let status = responses(vec![Frame::data(oversized.clone().into())], 1 << 20)
            .message()
            .await
            .unwrap_err();
        assert!(status.message().contains("compressed"), "{status:?}");

        oversized[0] = 0;
        oversized.truncate(oversized.len() - 1);
        let cut = || Frame::data(Bytes::from(oversized.clone()));
        // The body just ends, or the server ends the call with an OK status after the cut.
        for frames in [vec![cut()], vec![cut(), trailers("0", "")]] {
            let status = responses(frames, 1 << 20).message().await.unwrap_err();
            assert!(
                status.message().contains("ended inside a message"),
                "{status:?}"
            );
        }

        let mut garbage = vec![0, 0, 0, 0, 3];
        garbage.extend([0xff, 0xff, 0xff]);
        let status = responses(vec![Frame::data(garbage.into())], 1 << 20)
            .message()
            .await
            .unwrap_err();
        assert!(status.message().contains("decode response"), "{status:?}");
    }
}
