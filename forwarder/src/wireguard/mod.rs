//! placeholder (userspace WireGuard, in progress)
