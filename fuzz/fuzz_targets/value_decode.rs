//! `knit::fuzzing::value_decode`: see its documentation for the input layout and what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = knit::fuzzing::value_decode(data);
});
