use super::*;
use crate::writer::GgufWriter;

fn sample() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", Value::U32(2))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        )
        .meta(
            "nested",
            Value::Array(vec![Value::Array(vec![Value::I32(-1)])]),
        )
        .tensor("w", &[32, 2], GgmlType::F32, vec![0u8; 32 * 2 * 4])
        .tensor("q", &[32], GgmlType::Q8_0, vec![1u8; 34]);
    w.to_bytes()
}

fn kind(bytes: Vec<u8>) -> ErrorKind {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.kind,
    }
}

#[test]
fn parses_a_valid_file() {
    let f = GgufFile::from_bytes(sample()).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(
        f.get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let q = f.tensor_info("q").unwrap();
    assert_eq!(q.ggml_type, GgmlType::Q8_0);
    assert_eq!(f.tensor_data(q), &[1u8; 34][..]);
    assert_eq!(f.tensor_info("w").unwrap().n_rows(), 2);
    assert!(matches!(
        f.get_u64("missing").unwrap_err().kind,
        ErrorKind::MissingKey(_)
    ));
    assert!(matches!(
        f.get_u64("general.architecture").unwrap_err().kind,
        ErrorKind::WrongType { .. }
    ));
}

#[test]
fn every_truncation_is_a_typed_error() {
    let full = sample();
    for len in 0..full.len() - 34 {
        // Cutting into the header, metadata or tensor directory is "truncated"/"count too large";
        // cutting into the data is a tensor running past the end.
        let e = kind(full[..len].to_vec());
        assert!(
            matches!(
                e,
                ErrorKind::Truncated { .. }
                    | ErrorKind::CountTooLarge { .. }
                    | ErrorKind::BadTensor { .. }
            ),
            "len {len}: {e:?}"
        );
    }
}

#[test]
fn bad_magic_and_version() {
    let mut b = sample();
    b[0] = b'X';
    assert!(matches!(kind(b), ErrorKind::BadMagic(_)));
    let mut b = sample();
    b[4] = 1;
    assert!(matches!(kind(b), ErrorKind::UnsupportedVersion(1)));
}

#[test]
fn huge_counts_do_not_allocate() {
    let mut b = sample();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    assert!(matches!(kind(b), ErrorKind::CountTooLarge { .. }));
    let mut b = sample();
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes()); // kv count
    assert!(matches!(kind(b), ErrorKind::CountTooLarge { .. }));
    // A string length far past the end.
    let mut b = sample();
    b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert!(matches!(kind(b), ErrorKind::CountTooLarge { .. }));
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn invalid_utf8_unknown_types_and_bad_offsets() {
    let mut b = sample();
    let i = find(&b, b"general.architecture");
    b[i] = 0xff;
    assert!(matches!(kind(b), ErrorKind::InvalidUtf8 { .. }));

    // The value type of the first key follows its name.
    let mut b = sample();
    let i = find(&b, b"general.architecture") + "general.architecture".len();
    b[i..i + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(kind(b), ErrorKind::UnknownValueType(99)));

    // Tensor "q": name, n_dims, dim, type, offset.
    let base = find(&b"\x01\x00\x00\x00\x00\x00\x00\x00q"[..], b"q");
    let _ = base;
    let mut b = sample();
    let i = find(&b, b"\x01\x00\x00\x00\x00\x00\x00\x00q\x01\x00\x00\x00") + 9;
    // type id sits after n_dims (4) and one dim (8)
    b[i + 12..i + 16].copy_from_slice(&16u32.to_le_bytes());
    assert!(matches!(kind(b), ErrorKind::UnknownTensorType(16)));
    let mut b = sample();
    b[i + 16..i + 24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(kind(b), ErrorKind::BadTensor { .. }));
    let mut b = sample();
    b[i + 16..i + 24].copy_from_slice(&(257u64).to_le_bytes());
    assert!(
        matches!(kind(b), ErrorKind::BadTensor { .. }),
        "misaligned offset"
    );
    let mut b = sample();
    b[i..i + 4].copy_from_slice(&7u32.to_le_bytes());
    assert!(
        matches!(kind(b), ErrorKind::BadTensor { .. }),
        "too many dims"
    );
    let mut b = sample();
    b[i + 4..i + 12].copy_from_slice(&33u64.to_le_bytes());
    assert!(
        matches!(kind(b), ErrorKind::BadTensor { .. }),
        "row not a block multiple"
    );
}

#[test]
fn duplicate_keys_and_bad_alignment() {
    let mut w = GgufWriter::new();
    w.meta("a", Value::U8(1)).meta("a", Value::U8(2));
    assert!(matches!(kind(w.to_bytes()), ErrorKind::Duplicate(_)));
    let mut w = GgufWriter::new();
    w.meta("general.alignment", Value::U32(3));
    assert!(matches!(kind(w.to_bytes()), ErrorKind::BadAlignment(3)));
}

#[test]
fn deep_nesting_is_refused() {
    let mut v = Value::U8(0);
    for _ in 0..20 {
        v = Value::Array(vec![v]);
    }
    let mut w = GgufWriter::new();
    w.meta("deep", v);
    assert!(matches!(kind(w.to_bytes()), ErrorKind::NestingTooDeep));
}

/// A deterministic mutation fuzzer over a valid file: random byte flips, truncations, length
/// field rewrites and splices. Every outcome must be Ok or a typed error: no panic, no abort.
/// (The coverage-guided twin is `fuzz/fuzz_targets/gguf_parse.rs`.)
#[test]
fn random_mutations_never_panic() {
    let base = sample();
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut errors = 0;
    for _ in 0..20_000 {
        let mut b = base.clone();
        for _ in 0..1 + rnd() % 4 {
            if b.is_empty() {
                break;
            }
            let i = (rnd() as usize) % b.len();
            match rnd() % 4 {
                0 => b[i] ^= 1 << (rnd() % 8),
                1 => b[i] = rnd() as u8,
                2 => {
                    // Overwrite 8 bytes with an extreme length.
                    let v = [u64::MAX, 1 << 40, 0, (rnd() % 4096)][(rnd() % 4) as usize];
                    let end = (i + 8).min(b.len());
                    b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
                }
                _ => b.truncate(i),
            }
        }
        if let Err(e) = GgufFile::from_bytes(b) {
            errors += 1;
            let _ = e.to_string();
        }
    }
    assert!(
        errors > 1000,
        "mutations should mostly be rejected ({errors})"
    );
}
