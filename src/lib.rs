//! Django Channels for tower: WebSocket consumers, groups and channel layers
//! as tower middleware.
//!
//! Put a [`ChannelsLayer`] in front of any hyper-based service (an axum
//! `Router`, a warp filter, a plain hyper service). Requests on its routes
//! that ask for a WebSocket get a **consumer** each; everything else goes to
//! the inner service untouched.
// Library code must not unwrap (peers control most inputs); tests may.
#![warn(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod channel_layer;
mod config;
pub mod consumer;
mod error;
pub mod handshake;
pub mod layer;
pub mod message;
mod metrics;
pub mod origin;
pub mod route;
mod scope;
pub mod testing;
pub mod worker;

pub use self::{
    config::{RateLimit, WebSocketConfig},
    error::Error,
    layer::{Channels, ChannelsLayer},
    metrics::Stats,
    scope::{PeerAddr, Scope},
};
