//! microVM driver (placeholder until the driver lands).
