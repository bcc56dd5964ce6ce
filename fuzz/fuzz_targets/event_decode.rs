//! `Event::decode` on arbitrary bytes (what a channel-layer backend reads off
//! the wire). Must never panic; an event it accepts must survive a round trip:
//! `encode` succeeds, decoding that gives the same type and payload, and
//! encoding again gives the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_channels::channel_layer::Event;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = Event::decode(data) else {
        return;
    };
    let body = event.body::<serde_json::Value>();
    let _ = (event.handler_name(), format!("{event:?}"));

    let wire = event.encode().expect("a decoded event must encode");
    let again = Event::decode(&wire).expect("an encoded event must decode");
    assert_eq!(again.kind(), event.kind());
    assert_eq!(again.is_bare(), event.is_bare());
    assert_eq!(again.as_message(), event.as_message());
    assert_eq!(again.body::<serde_json::Value>().ok(), body.ok());
    assert_eq!(again.encode().expect("re-encode"), wire);
});
