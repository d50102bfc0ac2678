//! cella's core: everything about a sandbox that does not depend on how it is isolated.
//!
//! * [`driver`]: the seam to isolation back-ends (jail, microVM). A driver turns a
//!   [`driver::SandboxSpec`] into a running [`driver::SandboxHandle`] whose agent answers, and
//!   removes every trace of it on request or after a crash of the server.
//! * `manager`: the registry of live sandboxes, owner checks, timeouts, and the typed commands
//!   the HTTP layer hands in.
//! * [`egress`]: a sandbox's outbound network policy and the seam to the host-side network.
//! * `store`: SQLite (keys, sandbox records, append-only audit log).
//! * `template`: template specs, builds and the cache.
//! * [`snapshot`]: filesystem snapshots of sandboxes (what `create_snapshot` and `fork` keep).

pub mod driver;
pub mod egress;
#[cfg(any(test, feature = "test-support"))]
pub mod fake;
pub mod manager;
pub mod metrics;
pub mod snapshot;
pub mod store;
pub mod template;

/// `prefix` + 20 random characters of `[a-z0-9]` (E2B's ID shape: sandboxes `i…`, snapshots
/// `s…`).
pub(crate) fn random_id(prefix: char) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let mut id = String::with_capacity(21);
    id.push(prefix);
    for _ in 0..20 {
        id.push(ALPHABET[rng.gen_range(0..ALPHABET.len())] as char);
    }
    id
}
