//! Connect-protocol glue for axum: decoding requests, encoding unary and streaming responses.
//!
//! Unary calls are `application/json` bodies answered with JSON (200) or a Connect error JSON
//! with the mapped HTTP status. Streams (`application/connect+json`) use envelopes from
//! [`cella_proto::envd::connect`] and always answer 200, reporting failure in the end-stream
//! envelope, as Connect requires.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cella_proto::envd::connect::{
    self, Code, ConnectError, DEFAULT_MAX_MESSAGE, EnvelopeDecoder, STREAM_JSON_CONTENT_TYPE,
    UNARY_JSON_CONTENT_TYPE,
};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest unary request body accepted.
pub const MAX_UNARY_BODY: usize = 16 * 1024 * 1024;

/// Shorthand constructor.
pub fn err(code: Code, msg: impl Into<String>) -> ConnectError {
    ConnectError::new(code, msg)
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConnectError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| err(Code::InvalidArgument, format!("cannot decode request: {e}")))
}

/// Decode a unary JSON request.
pub async fn unary_request<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ConnectError> {
    let ct = content_type(headers);
    if ct != UNARY_JSON_CONTENT_TYPE && !ct.is_empty() {
        return Err(err(
            Code::Unimplemented,
            format!("unsupported content type {ct:?}: only the JSON codec is served"),
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_UNARY_BODY)
        .await
        .map_err(|e| err(Code::ResourceExhausted, format!("request body: {e}")))?;
    parse_json(&bytes)
}

/// Answer a unary call.
pub fn unary_response<T: Serialize>(result: Result<T, ConnectError>) -> Response {
    match result {
        Ok(msg) => match serde_json::to_vec(&msg) {
            Ok(body) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, UNARY_JSON_CONTENT_TYPE)],
                body,
            )
                .into_response(),
            Err(e) => error_response(&err(Code::Internal, e.to_string())),
        },
        Err(e) => error_response(&e),
    }
}

/// A unary Connect error response.
pub fn error_response(e: &ConnectError) -> Response {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(e).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, UNARY_JSON_CONTENT_TYPE)],
        body,
    )
        .into_response()
}

/// Decode the single request message of a server-streaming call.
pub async fn stream_request<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ConnectError> {
    let ct = content_type(headers);
    if ct == UNARY_JSON_CONTENT_TYPE {
        // Lenient: a client that sent a bare JSON body.
        let bytes = axum::body::to_bytes(body, MAX_UNARY_BODY)
            .await
            .map_err(|e| err(Code::ResourceExhausted, format!("request body: {e}")))?;
        return parse_json(&bytes);
    }
    if !ct.is_empty() && ct != STREAM_JSON_CONTENT_TYPE {
        return Err(err(
            Code::Unimplemented,
            format!("unsupported content type {ct:?}: only the JSON codec is served"),
        ));
    }
    let mut messages = Box::pin(envelope_stream(body));
    match messages.next().await {
        Some(Ok(bytes)) => parse_json(&bytes),
        Some(Err(e)) => Err(e),
        None => parse_json(b"{}"),
    }
}

/// Stream the data envelopes of a request body (client streaming), stopping at end-stream.
pub fn envelope_stream(body: Body) -> impl Stream<Item = Result<Bytes, ConnectError>> + Send {
    let data = body.into_data_stream();
    futures::stream::unfold(
        (data, EnvelopeDecoder::new(DEFAULT_MAX_MESSAGE), false),
        |(mut data, mut dec, done)| async move {
            if done {
                return None;
            }
            loop {
                match dec.next_envelope() {
                    Ok(Some(env)) if env.is_end_stream() => return None,
                    Ok(Some(env)) => return Some((Ok(env.payload), (data, dec, false))),
                    Ok(None) => {}
                    Err(e) => {
                        return Some((
                            Err(err(Code::InvalidArgument, e.to_string())),
                            (data, dec, true),
                        ));
                    }
                }
                match data.next().await {
                    Some(Ok(chunk)) => dec.push(&chunk),
                    Some(Err(e)) => {
                        return Some((
                            Err(err(Code::Canceled, format!("request body: {e}"))),
                            (data, dec, true),
                        ));
                    }
                    None => {
                        return match dec.finish() {
                            Ok(()) => None,
                            Err(e) => Some((
                                Err(err(Code::InvalidArgument, e.to_string())),
                                (data, dec, true),
                            )),
                        };
                    }
                }
            }
        },
    )
}

/// Parse the `Keepalive-Ping-Interval` header (seconds), bounded to something sane.
pub fn keepalive_interval(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(cella_proto::envd::KEEPALIVE_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (secs > 0).then(|| Duration::from_secs(secs.clamp(1, 3600)))
}

/// Parse `Connect-Timeout-Ms`.
pub fn connect_timeout(headers: &HeaderMap) -> Option<Duration> {
    let ms: u64 = headers
        .get("connect-timeout-ms")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// A server-stream response: each item is a message (or a terminal error); a keepalive message
/// is interleaved every `keepalive` when no message went out for that long; the end-stream
/// envelope closes the body.
pub fn stream_response<T, S>(messages: S, keepalive: Option<(Duration, T)>) -> Response
where
    T: Serialize + Clone + Send + 'static,
    S: Stream<Item = Result<T, ConnectError>> + Send + 'static,
{
    struct St<S, T> {
        messages: std::pin::Pin<Box<S>>,
        keepalive: Option<(Duration, T)>,
        done: bool,
    }
    let state = St {
        messages: Box::pin(messages),
        keepalive,
        done: false,
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let next = match st.keepalive.as_ref().map(|(p, _)| *p) {
            Some(period) => match tokio::time::timeout(period, st.messages.next()).await {
                Ok(item) => item,
                Err(_) => st.keepalive.as_ref().map(|(_, ka)| Ok(ka.clone())),
            },
            None => st.messages.next().await,
        };
        let frame = match next {
            Some(Ok(msg)) => match connect::encode_message(&msg) {
                Ok(b) => b,
                Err(e) => {
                    st.done = true;
                    connect::encode_end_stream(Some(&err(Code::Internal, e.to_string())))
                }
            },
            Some(Err(e)) => {
                st.done = true;
                connect::encode_end_stream(Some(&e))
            }
            None => {
                st.done = true;
                connect::encode_end_stream(None)
            }
        };
        Some((Ok::<Bytes, Infallible>(frame), st))
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(STREAM_JSON_CONTENT_TYPE),
    );
    resp
}

/// A stream response that fails immediately.
pub fn stream_error(e: ConnectError) -> Response {
    stream_response::<serde_json::Value, _>(futures::stream::iter([Err(e)]), None)
}

/// A client-stream (or unary-over-stream) response carrying one message.
pub fn stream_single<T: Serialize + Clone + Send + 'static>(
    result: Result<T, ConnectError>,
) -> Response {
    stream_response(futures::stream::iter([result]), None)
}
