//! Coverage-guided fuzzing of the GGUF parser (and, when a file parses, of building a tokenizer
//! from its metadata): any input must give Ok or a typed error.
//! Run: `cargo fuzz run gguf_parse` (needs cargo-fuzz and a nightly toolchain).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = ruvllm_gguf::GgufFile::from_bytes(data.to_vec()) {
        for t in f.tensors() {
            let _ = f.tensor_data(t);
        }
        let _ = ruvllm_tokenizer::Tokenizer::from_gguf(&f);
    }
});
