//! E2B's in-sandbox protocol ("envd"), as the official SDKs speak it.
//!
//! envd exposes two Connect services (`process.Process`, `filesystem.Filesystem`) plus a few
//! plain HTTP routes (`/files`, `/health`, `/envs`, `/metrics`). The SDKs use Connect with the
//! **JSON codec** over HTTP/1.1 or h2, so this module models the protobuf messages as serde types
//! following the protobuf-JSON mapping (lowerCamelCase keys on output, both spellings accepted on
//! input, 64-bit integers as strings, bytes as base64, enums by name) instead of pulling in a
//! protobuf runtime. The agent serves these types; the Rust client and the server's proxy can
//! reuse them (and [`connect`]'s envelope codec) to talk to an agent.
//!
//! Everything here decodes data that came from inside a sandbox or from the network: decoders
//! bound sizes and return errors rather than panic.

pub mod connect;
pub mod filesystem;
pub mod json;
pub mod process;
pub mod signature;

/// TCP port envd listens on inside a sandbox, and the envd version the agent reports (defined
/// once, in the REST types, because the create response carries the version too).
pub use cella_api::{ENVD_PORT, ENVD_VERSION};

/// Header carrying the sandbox's access token on every envd request.
pub const ACCESS_TOKEN_HEADER: &str = "X-Access-Token";

/// Header asking a server stream to emit keepalive events every N seconds.
pub const KEEPALIVE_HEADER: &str = "Keepalive-Ping-Interval";
