//! The frame reader (RFC 6455 framing, RFC 7692 permessage-deflate) over
//! arbitrary client byte streams in arbitrary chunks. Byte 0 picks the
//! settings (deflate, context takeover, tight limits, window bits), bytes
//! 1-4 the chunk sizes; `tower_channels::fuzzing::check` asserts the
//! invariants: no panic, no invalid UTF-8 accepted, no unmasked frame
//! accepted, reader memory bounded by the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tower_channels::fuzzing::check(data);
});
