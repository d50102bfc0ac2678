//! Wire types between the host and the in-sandbox agent.
//!
//! Two protocols cross the sandbox boundary:
//! * the **control channel** ([`control`]): a byte stream the driver hands the agent at start
//!   (a socketpair for the jail, a serial port for a VM). The host writes one [`control::AgentConfig`]
//!   line; the agent answers with [`control::AgentEvent`] lines (first `ready`, then audit events).
//! * **envd** ([`envd`]): E2B's in-sandbox protocol, served by the agent on port 49983 and
//!   reached through the server's proxy. The official SDKs speak it.
//!
//! Everything that arrives from inside a sandbox is hostile: decoders here bound sizes and never
//! panic.

pub mod control;
pub mod envd;
