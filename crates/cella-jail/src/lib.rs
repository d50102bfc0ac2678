//! Jail driver (in progress).
