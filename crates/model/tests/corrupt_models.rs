//! Semantically corrupt models: a real GGUF file, rewritten with one metadata value, tensor
//! shape, tensor type or entry changed or removed, must load to a typed error or to a model
//! that runs — never a panic; NaN or infinite weights and hyperparameters are refused at load,
//! and weights that overflow stop generation with an error instead of emitting one arbitrary
//! token forever. (The byte-level fuzzer in `ruvllm-gguf` covers files that do not parse;
//! these parse, and lie about the model.)

use ruvllm_gguf::writer::GgufWriter;
use ruvllm_gguf::{GgmlType, GgufFile, Value};
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{registry, Logits, Model, Runner};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Integers that break shape arithmetic: zero, one, odd, off by one, huge.
fn odd_int(rng: &mut Rng, v: u64) -> u64 {
    let picks = [
        0,
        1,
        2,
        3,
        7,
        v.saturating_sub(1),
        v + 1,
        v * 2,
        v / 2,
        1 << 20,
        u32::MAX as u64,
        u64::MAX,
    ];
    picks[rng.below(picks.len())]
}

fn same_int_type(like: &Value, v: u64) -> Value {
    match like {
        Value::U8(_) => Value::U8(v as u8),
        Value::I8(_) => Value::I8(v as i8),
        Value::U16(_) => Value::U16(v as u16),
        Value::I16(_) => Value::I16(v as i16),
        Value::U32(_) => Value::U32(v as u32),
        Value::I32(_) => Value::I32(v as i32),
        Value::I64(_) => Value::I64(v as i64),
        _ => Value::U64(v),
    }
}

fn mutate_value(rng: &mut Rng, v: &Value) -> Value {
    match v {
        Value::F32(_) | Value::F64(_) => {
            let picks = [0.0, -1.0, f64::NAN, f64::INFINITY, 1e30, 1e-30];
            let x = picks[rng.below(picks.len())];
            match v {
                Value::F32(_) => Value::F32(x as f32),
                _ => Value::F64(x),
            }
        }
        Value::String(_) => {
            let picks = ["llama", "gemma3", "bogus", "", "{{ raise_exception('x') }}"];
            Value::String(picks[rng.below(picks.len())].to_owned())
        }
        Value::Bool(b) => Value::Bool(!b),
        Value::Array(a) => {
            let mut a = a.clone();
            match rng.below(4) {
                0 => a.truncate(a.len() / 2),
                1 => a.clear(),
                2 if !a.is_empty() => {
                    let i = rng.below(a.len());
                    a[i] = mutate_value(rng, &a[i]);
                }
                _ => a.truncate(1),
            }
            Value::Array(a)
        }
        other => {
            let n = other.as_u64().unwrap_or(0);
            same_int_type(other, odd_int(rng, n))
        }
    }
}

fn check_one(bytes: Vec<u8>, pool: &Arc<ThreadPool>) -> Result<String, String> {
    let file = GgufFile::from_bytes(bytes).map_err(|e| format!("gguf: {e}"))?;
    let tok = ruvllm_tokenizer::Tokenizer::from_gguf(&file).map_err(|e| format!("tok: {e}"));
    let tmpl = tok
        .as_ref()
        .ok()
        .map(|t| ruvllm_tokenizer::ChatTemplate::from_gguf(&file, t));
    let model = Model::from_gguf(file).map_err(|e| format!("model: {e}"))?;
    let tok = tok?;
    if let Some(Ok(t)) = tmpl {
        let msgs = vec![ruvllm_tokenizer::ChatMessage::new("user", "Hi there")];
        let _ = t.render(&msgs, true);
    }
    let mut ids = tok.encode("Hello world, how are you?", true, true);
    let _ = tok.decode(&ids, true);
    ids.truncate(8);
    let mut r = Runner::new(&model, pool.clone(), 64);
    let logits = r
        .forward(&ids, Logits::Last)
        .map_err(|e| format!("forward: {e}"))?;
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap_or(0);
    let logits_max = logits.get(best as usize).copied().unwrap_or(f32::NAN);
    r.forward(&[best], Logits::Last)
        .map_err(|e| format!("forward: {e}"))?;
    let _ = tok.decode(&[best], false);
    Ok(format!("top {best} {:.3}", logits_max))
}

fn fuzz(name: &str, iterations: usize, seed: u64) {
    let Some(path) = registry::for_test(name) else {
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let pool = Arc::new(ThreadPool::new(2));
    let mut rng = Rng(seed);
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for it in 0..iterations {
        let mut w = GgufWriter::copy_of(&file);
        let meta = file.metadata();
        let tensors = file.tensors();
        let what = rng.below(6);
        let (k, v) = &meta[rng.below(meta.len())];
        let t = &tensors[rng.below(tensors.len())];
        let data = || file.tensor_data(t).to_vec();
        let desc = match what {
            0 => {
                let m = mutate_value(&mut rng, v);
                let desc = format!("meta {k} := {:?}", short(&m));
                w.set_meta(k, m);
                desc
            }
            1 => {
                w.remove_meta(k);
                format!("meta {k} removed")
            }
            2 => {
                w.remove_tensor(&t.name);
                format!("tensor {} removed", t.name)
            }
            3 => {
                // Swapped or changed dims over the same bytes.
                let mut d = t.dims.clone();
                if d.len() == 2 && rng.below(2) == 0 {
                    d.swap(0, 1);
                } else {
                    let k = rng.below(d.len());
                    d[k] = odd_int(&mut rng, d[k]).clamp(1, 1 << 24);
                }
                // Keep the bytes the new shape needs (zeros past the old data).
                let need = (t.ggml_type.row_bytes(d[0]).unwrap_or(0)
                    * d.iter().skip(1).product::<u64>()) as usize;
                let mut bytes = data();
                bytes.resize(need.min(64 << 20), 0);
                w.set_tensor(&t.name, &d, t.ggml_type, bytes);
                format!("tensor {} dims {:?} -> {:?}", t.name, t.dims, d)
            }
            4 => {
                let types = [
                    GgmlType::F32,
                    GgmlType::F16,
                    GgmlType::Q8_0,
                    GgmlType::Q4_K,
                    GgmlType::Q6_K,
                    GgmlType::Q4_0,
                ];
                let ty = types[rng.below(types.len())];
                let need = (ty.row_bytes(t.dims[0]).unwrap_or(0)
                    * t.dims.iter().skip(1).product::<u64>()) as usize;
                let mut bytes = data();
                bytes.resize(need.min(256 << 20), 0);
                w.set_tensor(&t.name, &t.dims, ty, bytes);
                format!("tensor {} type {:?} -> {:?}", t.name, t.ggml_type, ty)
            }
            _ => {
                // NaN/inf weights in an f32 tensor (norms), else noise bytes.
                let bytes = w.tensor_data_mut(&t.name).expect("copied");
                if t.ggml_type == GgmlType::F32 {
                    for c in bytes.chunks_exact_mut(4).step_by(7) {
                        c.copy_from_slice(&f32::NAN.to_le_bytes());
                    }
                    format!("tensor {} NaNs", t.name)
                } else {
                    for b in bytes.iter_mut().step_by(3) {
                        *b = rng.next() as u8;
                    }
                    format!("tensor {} noise", t.name)
                }
            }
        };
        let bytes = w.to_bytes();
        let r = catch_unwind(AssertUnwindSafe(|| check_one(bytes, &pool)));
        let key = match &r {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("PANIC it {it}: {desc}: {msg}");
                "panic".to_string()
            }
            Ok(Ok(s)) => {
                eprintln!("ran it {it}: {desc}: {s}");
                "ran".into()
            }
            Ok(Err(e)) => {
                eprintln!("err it {it}: {desc}: {e}");
                e.split(':').next().unwrap_or("").to_string()
            }
        };
        *outcomes.entry(key).or_default() += 1;
    }
    eprintln!("{name}: {outcomes:?}");
    assert!(!outcomes.contains_key("panic"), "{outcomes:?}");
}

/// The default model's file rewritten by `edit`, loaded.
fn edited(edit: impl FnOnce(&mut GgufWriter)) -> Option<Result<Model, ruvllm_model::Error>> {
    let path = registry::for_test("smollm2-135m")?;
    let file = GgufFile::open(&path).unwrap();
    let mut w = GgufWriter::copy_of(&file);
    edit(&mut w);
    Some(Model::from_gguf(
        GgufFile::from_bytes(w.to_bytes()).unwrap(),
    ))
}

fn refused(edit: impl FnOnce(&mut GgufWriter), expect: &str) {
    let Some(r) = edited(edit) else {
        return;
    };
    match r {
        Ok(_) => panic!("loaded; expected an error mentioning {expect:?}"),
        Err(e) => assert!(e.to_string().contains(expect), "{e}"),
    }
}

#[test]
fn non_finite_weights_and_hyperparameters_are_refused() {
    // A NaN in a norm vector (f32).
    refused(
        |w| {
            let d = w.tensor_data_mut("blk.3.attn_norm.weight").unwrap();
            d[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
        },
        "blk.3.attn_norm.weight: element 10 is NaN or infinite",
    );
    // An infinite f16 scale in a Q4_1 matrix's 6th block (20-byte blocks: d at 0, m at 2).
    refused(
        |w| {
            let d = w.tensor_data_mut("blk.0.ffn_up.weight").unwrap();
            d[5 * 20 + 2..5 * 20 + 4].copy_from_slice(&0x7c00u16.to_le_bytes());
        },
        "blk.0.ffn_up.weight: element 160 is NaN or infinite",
    );
    for (key, v) in [
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(f32::NAN),
        ),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(-1.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e30)),
        ("llama.rope.freq_base", Value::F32(0.0)),
        ("llama.rope.freq_base", Value::F32(f32::INFINITY)),
        ("llama.rope.freq_base", Value::String("ten thousand".into())),
        ("llama.rope.scaling.factor", Value::F32(-2.0)),
    ] {
        let k = key.strip_prefix("llama.").unwrap();
        refused(
            |w| {
                w.set_meta(key, v.clone());
            },
            &format!("{k} = "),
        );
    }
}

/// An output norm of 3e38 (finite, so it loads) overflows the logits to infinity: generation
/// ends with `NonFiniteLogits` instead of sampling from them.
#[test]
fn overflowing_weights_stop_generation_with_an_error() {
    let Some(model) = edited(|w| {
        let d = w.tensor_data_mut("output_norm.weight").unwrap();
        for c in d.chunks_exact_mut(4) {
            c.copy_from_slice(&3e38f32.to_le_bytes());
        }
    }) else {
        return;
    };
    let model = model.expect("finite weights load");
    let path = registry::for_test("smollm2-135m").unwrap();
    let tok = ruvllm_tokenizer::Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let mut r = Runner::new(&model, Arc::new(ThreadPool::new(2)), 64);
    let ids = tok.encode("Hello", true, true);
    let params = ruvllm_model::generate::GenerateParams {
        max_tokens: Some(4),
        ..Default::default()
    };
    let e = ruvllm_model::generate::generate(&mut r, &tok, &ids, &params, |_| {})
        .err()
        .expect("an error, not tokens");
    assert!(
        matches!(e.kind(), ruvllm_model::ErrorKind::NonFiniteLogits),
        "{e}"
    );
}

fn short(v: &Value) -> String {
    let s = format!("{v:?}");
    s.chars().take(60).collect()
}

/// `RUVLLM_FUZZ_ITERS=400`: no panic (session 17; 30 files refused by the parser, 249 by the
/// loader, 6 by the tokenizer, 115 ran).
#[test]
fn smollm2_semantic_mutations_never_panic() {
    let n = std::env::var("RUVLLM_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    fuzz("smollm2-135m", n, 0x5eed_1234);
}

/// Gemma-3's file (sliding window, q/k norms, SentencePiece): fewer mutations by default, as
/// each rewrites ~250 MB (`RUVLLM_FUZZ_ITERS=300`: no panic, session 17).
#[test]
fn gemma3_semantic_mutations_never_panic() {
    let n = std::env::var("RUVLLM_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    fuzz("gemma3-270m", n, 0x6e33_4321);
}
