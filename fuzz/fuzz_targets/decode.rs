//! Any byte string given to the decoder and the dense writers must be rejected cleanly or
//! decoded within bounds: never a panic, an out-of-bounds write, or a huge allocation.
#![no_main]

use _core::compress::{decode, decompress_into, decompress_sum, Write};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = decode(data) {
        let (indices, values) = d.to_sparse();
        assert_eq!(indices.len(), values.len());
        assert!(indices.windows(2).all(|w| w[0] < w[1]));
    }
    let mut out = vec![0f32; 4096];
    let _ = decompress_into(data, &mut out, Write::Add(1.0));
    let _ = decompress_sum(&[data, data], &mut out, 0.5);
});
