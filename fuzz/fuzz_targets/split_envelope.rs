//! Envelope splitting on arbitrary frame lists: never panics; on success the envelope ends
//! with the first empty frame and envelope + body is the input.
#![no_main]

use agora_proto::codec::split_envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frames: Vec<Vec<u8>>| {
    let input = frames.clone();
    if let Ok((envelope, body)) = split_envelope(frames) {
        assert_eq!(envelope.last().map(Vec::len), Some(0));
        assert!(envelope[..envelope.len() - 1].iter().all(|f| !f.is_empty()));
        let mut joined = envelope;
        joined.extend(body);
        assert_eq!(joined, input);
    } else {
        assert!(input.iter().all(|f| !f.is_empty()));
    }
});
