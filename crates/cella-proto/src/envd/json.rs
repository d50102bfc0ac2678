//! Protobuf-JSON mapping helpers for the scalar kinds serde does not map the proto3 way.
//!
//! * 64-bit integers are strings on output; input accepts a string or a number.
//! * `bytes` are standard base64 on output; input accepts standard or URL-safe, padded or not.
//! * `google.protobuf.Timestamp` is an RFC 3339 string in UTC (`1970-01-01T00:00:00Z`).
//! * Enums are names on output; input accepts the name or the number ([`proto_enum!`]).

use std::fmt;

use base64::Engine as _;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// `int64` fields: string on output, string or number on input.
pub mod i64_str {
    use super::*;

    /// Serialize as a decimal string.
    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    /// Accept a number or a decimal string (`null` means 0).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = i64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an int64 as a number or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
                Ok(v)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
                i64::try_from(v).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
                if v.fract() == 0.0 && v.abs() < 9.0e18 {
                    Ok(v as i64)
                } else {
                    Err(E::custom("int64 is not an integer"))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
                v.trim().parse().map_err(E::custom)
            }
            fn visit_unit<E: de::Error>(self) -> Result<i64, E> {
                Ok(0)
            }
        }
        d.deserialize_any(V)
    }
}

/// `uint32` fields that clients may send as strings: number on output, either on input.
pub mod u32_lenient {
    use super::*;

    /// Serialize as a number.
    pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(*v)
    }

    /// Accept a number or a decimal string (`null` means 0).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let v = i64_str::deserialize(d)?;
        u32::try_from(v).map_err(de::Error::custom)
    }
}

fn decode_base64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim();
    STANDARD
        .decode(s)
        .or_else(|_| STANDARD_NO_PAD.decode(s))
        .or_else(|_| URL_SAFE.decode(s))
        .or_else(|_| URL_SAFE_NO_PAD.decode(s))
}

/// Encode bytes as standard padded base64.
pub fn encode_base64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Optional `bytes` fields (members of a oneof).
pub mod opt_b64 {
    use super::*;

    /// Serialize as base64 (only called for `Some`; pair with `skip_serializing_if`).
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&encode_base64(b)),
            None => s.serialize_none(),
        }
    }

    /// Accept base64 in any common alphabet; `null` is absent.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        match s {
            None => Ok(None),
            Some(s) => decode_base64(&s).map(Some).map_err(de::Error::custom),
        }
    }
}

/// A `google.protobuf.Timestamp`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Nanoseconds, `0..1_000_000_000`.
    pub nanos: u32,
}

// Howard Hinnant's days-from-civil / civil-from-days, valid for the whole i64 range we need.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Why a timestamp string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RFC 3339 timestamp: {0:?}")]
pub struct TimestampError(pub String);

impl Timestamp {
    /// From seconds and nanoseconds (nanos are clamped into range).
    pub fn new(seconds: i64, nanos: u32) -> Self {
        Timestamp {
            seconds,
            nanos: nanos.min(999_999_999),
        }
    }

    /// RFC 3339 in UTC, with 0, 3, 6 or 9 fractional digits like protobuf's encoder.
    pub fn to_rfc3339(&self) -> String {
        let days = self.seconds.div_euclid(86_400);
        let secs = self.seconds.rem_euclid(86_400);
        let (y, mo, d) = civil_from_days(days);
        let (h, mi, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
        let frac = if self.nanos == 0 {
            String::new()
        } else if self.nanos.is_multiple_of(1_000_000) {
            format!(".{:03}", self.nanos / 1_000_000)
        } else if self.nanos.is_multiple_of(1000) {
            format!(".{:06}", self.nanos / 1000)
        } else {
            format!(".{:09}", self.nanos)
        };
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{frac}Z")
    }

    /// Parse RFC 3339 (`Z` or a numeric offset, up to 9 fractional digits).
    pub fn parse_rfc3339(s: &str) -> Result<Self, TimestampError> {
        let err = || TimestampError(s.chars().take(64).collect());
        let b = s.as_bytes();
        if b.len() < 20 || !s.is_ascii() {
            return Err(err());
        }
        let num = |r: std::ops::Range<usize>| -> Result<i64, TimestampError> {
            s.get(r)
                .filter(|p| p.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|p| p.parse().ok())
                .ok_or_else(err)
        };
        if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return Err(err());
        }
        if b[13] != b':' || b[16] != b':' {
            return Err(err());
        }
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
            return Err(err());
        }
        let mut i = 19;
        let mut nanos: u32 = 0;
        if b[i] == b'.' {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let digits = &s[start..i];
            if digits.is_empty() || digits.len() > 9 {
                return Err(err());
            }
            let v: u32 = digits.parse().map_err(|_| err())?;
            nanos = v * 10u32.pow(9 - digits.len() as u32);
        }
        let offset = match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => 0,
            Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
                let oh = num(i + 1..i + 3)?;
                let om = num(i + 4..i + 6)?;
                let o = oh * 3600 + om * 60;
                if *sign == b'+' { o } else { -o }
            }
            _ => return Err(err()),
        };
        let days = days_from_civil(y, mo as u32, d as u32);
        let seconds = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
        Ok(Timestamp { seconds, nanos })
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&s).map_err(de::Error::custom)
    }
}

/// Define a protobuf enum that serializes as its name and accepts the name or the number.
/// Unknown names or numbers decode to the first (`*_UNSPECIFIED`) variant, as proto3 does with
/// open enums, instead of failing the whole message.
#[macro_export]
macro_rules! proto_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = ($num:expr, $wire:expr)),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            #[default]
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Wire name.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }
            /// Wire number.
            pub fn number(self) -> i32 {
                match self { $($name::$variant => $num),+ }
            }
            /// From a wire number (unknown: the default variant).
            pub fn from_number(n: i64) -> Self {
                $(if n == $num { return $name::$variant; })+
                $name::default()
            }
            /// From a wire name (unknown: the default variant).
            pub fn from_name(s: &str) -> Self {
                $(if s == $wire { return $name::$variant; })+
                $name::default()
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = serde_json::Value::deserialize(d)?;
                Ok(match v {
                    serde_json::Value::String(s) => $name::from_name(&s),
                    serde_json::Value::Number(n) => $name::from_number(n.as_i64().unwrap_or(0)),
                    _ => $name::default(),
                })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct T {
        #[serde(with = "i64_str")]
        size: i64,
        #[serde(with = "opt_b64", default, skip_serializing_if = "Option::is_none")]
        data: Option<Vec<u8>>,
    }

    #[test]
    fn int64_is_string_out_and_either_in() {
        let t = T {
            size: 42,
            data: Some(b"hi\n".to_vec()),
        };
        let s = serde_json::to_string(&t).expect("ser");
        assert_eq!(s, r#"{"size":"42","data":"aGkK"}"#);
        let back: T = serde_json::from_str(r#"{"size":42,"data":"aGkK"}"#).expect("num");
        assert_eq!(back, t);
        let back: T = serde_json::from_str(r#"{"size":"-7"}"#).expect("str");
        assert_eq!(back.size, -7);
        assert!(serde_json::from_str::<T>(r#"{"size":"x"}"#).is_err());
    }

    #[test]
    fn base64_accepts_all_alphabets() {
        for s in ["+/8=", "+/8", "-_8=", "-_8"] {
            let t: T =
                serde_json::from_str(&format!(r#"{{"size":0,"data":"{s}"}}"#)).expect("decode");
            assert_eq!(t.data, Some(vec![0xfb, 0xff]), "alphabet {s}");
        }
        assert!(serde_json::from_str::<T>(r#"{"size":0,"data":"%%%"}"#).is_err());
    }

    #[test]
    fn timestamps_roundtrip() {
        let cases = [
            (0, 0, "1970-01-01T00:00:00Z"),
            (1_700_000_000, 0, "2023-11-14T22:13:20Z"),
            (1_700_000_000, 500_000_000, "2023-11-14T22:13:20.500Z"),
            (951_782_400, 123_456_000, "2000-02-29T00:00:00.123456Z"),
            (-1, 1, "1969-12-31T23:59:59.000000001Z"),
        ];
        for (secs, nanos, text) in cases {
            let t = Timestamp::new(secs, nanos);
            assert_eq!(t.to_rfc3339(), text);
            assert_eq!(Timestamp::parse_rfc3339(text), Ok(t));
        }
        assert_eq!(
            Timestamp::parse_rfc3339("2023-11-14T23:13:20+01:00").map(|t| t.seconds),
            Ok(1_700_000_000)
        );
        for bad in [
            "",
            "2023-11-14",
            "2023-13-14T00:00:00Z",
            "2023-11-14T00:00:00",
            "2023-11-14T00:00:00.Z",
            "é023-11-14T00:00:00Z",
        ] {
            assert!(Timestamp::parse_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
