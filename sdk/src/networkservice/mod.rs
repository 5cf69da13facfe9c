//! The NetworkService chain and its elements. Each element module is named
//! after its Go package in `networkservicemesh/sdk` so behaviour can be
//! compared, and documents its guarantees and chain placement. The order of
//! the elements every server shares is stated once, in [`chains`].

pub mod authorize;
pub mod begin;
pub mod chain;
pub mod chains;
pub mod clientinfo;
pub mod connect;
pub mod discover;
pub mod kernel;
pub mod mechanisms;
pub mod metadata;
pub mod monitor;
pub mod server;
pub mod timeout;
pub mod trimpath;
pub mod updatepath;
pub mod updatetoken;

pub use chain::{Chain, ConnResult, Context, Element, Next, Peer};
