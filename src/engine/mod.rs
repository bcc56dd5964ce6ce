//! The per-connection engine (issue 9); `wire` is its frame and permessage-deflate codec.
pub(crate) mod wire;
