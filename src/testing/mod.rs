//! Testing helpers: run a consumer without a network, and check a channel
//! layer backend against the shared conformance suite.

pub mod conformance;
