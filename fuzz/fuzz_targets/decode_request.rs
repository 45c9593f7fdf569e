//! The request decoder on arbitrary frames: never panics, and whatever it accepts encodes
//! and decodes again to the same bytes.
#![no_main]

use agora_proto::action::{KeyRequest, NodeRequest, RegistryRequest, ServerRequest};
use agora_proto::codec::{decode_request, encode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how many frames the rest is cut into (1 to 4).
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let parts = usize::from(n % 4) + 1;
    let mut frames: Vec<Vec<u8>> = if parts == 1 {
        vec![rest.to_vec()]
    } else {
        rest.chunks(rest.len().div_ceil(parts).max(1))
            .map(<[u8]>::to_vec)
            .collect()
    };
    // Half the time, put the right signature in front so the JSON path is reached.
    if n & 0x80 != 0 {
        frames.insert(0, b"AGORA/1".to_vec());
        frames.truncate(2);
    }
    round_trip::<RegistryRequest>(&frames);
    round_trip::<NodeRequest>(&frames);
    round_trip::<KeyRequest>(&frames);
});

/// Whatever role `R` accepts encodes and decodes again to the same bytes.
fn round_trip<R: ServerRequest>(frames: &[Vec<u8>]) {
    if let Ok(request) = decode_request::<R>(frames) {
        let wire = encode_request(&request);
        let again = decode_request::<R>(&wire).expect("an encoded request decodes");
        assert_eq!(encode_request(&again), wire);
    }
}
