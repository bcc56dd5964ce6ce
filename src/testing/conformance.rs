//! The channel-layer conformance suite (being written).
