//! The parts of the Connect protocol envd uses: enveloped stream messages and error codes.
//!
//! A Connect stream body (`application/connect+json`) is a sequence of envelopes:
//!
//! ```text
//! +-------+----------------+------------------+
//! | flags | length (u32 BE)| payload (length) |
//! +-------+----------------+------------------+
//! ```
//!
//! Flag `0x01` marks a compressed payload (never used by the SDKs, rejected here), flag `0x02`
//! marks the server's final *end-stream* envelope whose JSON payload is `{}` on success or
//! `{"error":{"code":"not_found","message":"..."}}`. Unary calls carry the bare JSON message and
//! report errors as a non-200 status with the same `{"code","message"}` object.
//!
//! The decoder is incremental (feed it body chunks as they arrive) and refuses envelopes larger
//! than a caller-chosen limit before buffering them, so a hostile peer cannot make it allocate.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Envelope flag: the payload is compressed.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: this is the end-stream envelope.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Size of the envelope header (flags + length).
pub const HEADER_LEN: usize = 5;
/// Default cap on one envelope's payload. Output chunks are at most 32 KiB before base64, so
/// legitimate messages stay far below it.
pub const DEFAULT_MAX_MESSAGE: usize = 8 * 1024 * 1024;

/// Content type of Connect streams with the JSON codec.
pub const STREAM_JSON_CONTENT_TYPE: &str = "application/connect+json";
/// Content type of unary Connect calls with the JSON codec.
pub const UNARY_JSON_CONTENT_TYPE: &str = "application/json";

/// Why an envelope stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The announced payload is larger than the decoder accepts.
    #[error("envelope of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The stream ended inside an envelope.
    #[error("stream ended in the middle of an envelope ({buffered} bytes left over)")]
    Truncated {
        /// Bytes buffered when the stream ended.
        buffered: usize,
    },
    /// The peer sent a compressed envelope, which was not negotiated.
    #[error("compressed envelope received but no compression was negotiated")]
    Compressed,
}

/// One decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Flags byte.
    pub flags: u8,
    /// Payload (a JSON message, or the end-stream JSON).
    pub payload: Bytes,
}

impl Envelope {
    /// Whether this is the end-stream envelope.
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

/// Encode one envelope. Payloads longer than `u32::MAX` cannot be framed and are truncated to
/// an empty message; callers never produce them (messages are bounded far below that).
pub fn encode_envelope(flags: u8, payload: &[u8]) -> Bytes {
    let len = u32::try_from(payload.len()).unwrap_or(0);
    let body = if len as usize == payload.len() {
        payload
    } else {
        &[]
    };
    let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&[flags]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out.freeze()
}

/// Encode a message as a data envelope.
pub fn encode_message<T: Serialize>(message: &T) -> Result<Bytes, serde_json::Error> {
    Ok(encode_envelope(0, &serde_json::to_vec(message)?))
}

/// The end-stream envelope: `{}` on success, `{"error":{...}}` on failure.
pub fn encode_end_stream(error: Option<&ConnectError>) -> Bytes {
    let payload = match error {
        None => b"{}".to_vec(),
        Some(e) => serde_json::to_vec(&EndStream {
            error: Some(e.clone()),
        })
        .unwrap_or_else(|_| b"{}".to_vec()),
    };
    encode_envelope(FLAG_END_STREAM, &payload)
}

/// Incremental envelope decoder.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
    max: usize,
}

impl EnvelopeDecoder {
    /// A decoder accepting payloads up to `max` bytes.
    pub fn new(max: usize) -> Self {
        EnvelopeDecoder {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Append received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Take the next complete envelope, if one is buffered.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, EnvelopeError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max {
            return Err(EnvelopeError::TooLarge { len, max: self.max });
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(EnvelopeError::Compressed);
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Check that the stream ended on an envelope boundary.
    pub fn finish(&self) -> Result<(), EnvelopeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(EnvelopeError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

/// Decode a complete body into envelopes (convenience for tests and small bodies).
pub fn decode_all(body: &[u8], max: usize) -> Result<Vec<Envelope>, EnvelopeError> {
    let mut d = EnvelopeDecoder::new(max);
    d.push(body);
    let mut out = Vec::new();
    while let Some(e) = d.next_envelope()? {
        out.push(e);
    }
    d.finish()?;
    Ok(out)
}

/// Connect error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The operation was cancelled.
    Canceled,
    /// Unknown error.
    Unknown,
    /// The client sent something invalid.
    InvalidArgument,
    /// A deadline expired.
    DeadlineExceeded,
    /// The target does not exist.
    NotFound,
    /// The target already exists.
    AlreadyExists,
    /// The caller may not do this.
    PermissionDenied,
    /// Out of some resource (quota, disk).
    ResourceExhausted,
    /// The system is not in the state the operation needs.
    FailedPrecondition,
    /// Aborted (concurrency conflict).
    Aborted,
    /// Out of range.
    OutOfRange,
    /// Not implemented.
    Unimplemented,
    /// Internal error.
    Internal,
    /// Temporarily unavailable.
    Unavailable,
    /// Data loss.
    DataLoss,
    /// Missing or wrong credentials.
    Unauthenticated,
}

impl Code {
    /// Wire name (`not_found`).
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// HTTP status a unary error with this code is sent with (Connect spec mapping).
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown => 500,
            Code::InvalidArgument => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::FailedPrecondition => 400,
            Code::Aborted => 409,
            Code::OutOfRange => 400,
            Code::Unimplemented => 501,
            Code::Internal => 500,
            Code::Unavailable => 503,
            Code::DataLoss => 500,
            Code::Unauthenticated => 401,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Connect error as it appears on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConnectError {
    /// Error code.
    pub code: Code,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
}

impl ConnectError {
    /// Build an error.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
        }
    }
}

/// Payload of the end-stream envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndStream {
    /// Present when the stream failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ConnectError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_roundtrip_across_chunk_boundaries() {
        let a = encode_envelope(0, br#"{"a":1}"#);
        let b = encode_end_stream(Some(&ConnectError::new(Code::NotFound, "gone")));
        let mut all = a.to_vec();
        all.extend_from_slice(&b);
        // Feed one byte at a time: every prefix must be handled.
        let mut d = EnvelopeDecoder::new(1024);
        let mut got = Vec::new();
        for byte in &all {
            d.push(&[*byte]);
            while let Some(e) = d.next_envelope().expect("decode") {
                got.push(e);
            }
        }
        d.finish().expect("clean end");
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].payload[..], br#"{"a":1}"#);
        assert!(!got[0].is_end_stream());
        assert!(got[1].is_end_stream());
        let end: EndStream = serde_json::from_slice(&got[1].payload).expect("json");
        assert_eq!(
            end.error,
            Some(ConnectError::new(Code::NotFound, "gone")),
            "end-stream error survives"
        );
    }

    #[test]
    fn end_stream_ok_is_empty_object() {
        let e = encode_end_stream(None);
        assert_eq!(&e[..], &[FLAG_END_STREAM, 0, 0, 0, 2, b'{', b'}']);
    }

    #[test]
    fn oversized_envelope_is_rejected_before_buffering() {
        let mut d = EnvelopeDecoder::new(10);
        d.push(&[0, 0, 0, 0, 11]);
        assert_eq!(
            d.next_envelope(),
            Err(EnvelopeError::TooLarge { len: 11, max: 10 })
        );
        let mut d = EnvelopeDecoder::new(usize::MAX >> 1);
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next_envelope(), Ok(None), "waits for the payload");
    }

    #[test]
    fn truncated_and_compressed_streams_are_errors() {
        assert_eq!(
            decode_all(&[0, 0, 0, 0, 3, b'{'], 100),
            Err(EnvelopeError::Truncated { buffered: 6 })
        );
        assert_eq!(
            decode_all(&[FLAG_COMPRESSED, 0, 0, 0, 0], 100),
            Err(EnvelopeError::Compressed)
        );
        assert_eq!(decode_all(&[], 100), Ok(vec![]));
    }

    #[test]
    fn code_names_and_statuses() {
        let e: ConnectError =
            serde_json::from_str(r#"{"code":"already_exists","message":"x"}"#).expect("parse");
        assert_eq!(e.code, Code::AlreadyExists);
        assert_eq!(e.code.http_status(), 409);
        assert_eq!(Code::Unauthenticated.http_status(), 401);
        assert_eq!(Code::ResourceExhausted.http_status(), 429);
        assert_eq!(Code::DeadlineExceeded.http_status(), 504);
        assert_eq!(Code::Unavailable.http_status(), 503);
        assert_eq!(
            serde_json::to_string(&Code::InvalidArgument).expect("ser"),
            "\"invalid_argument\""
        );
        assert_eq!(Code::PermissionDenied.as_str(), "permission_denied");
    }
}
