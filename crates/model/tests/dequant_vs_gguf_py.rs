//! Dequantization agrees with gguf-py (`gguf.quants.dequantize`, a reference we did not write)
//! on synthetic random blocks of every type and on real tensors of both models.
//!
//! Needs a Python with the `gguf` package: `RUVLLM_REF_PYTHON`, else `<repo>/.venv/bin/python`
//! (`.ci/run` creates it). Skipped when absent unless `RUVLLM_REQUIRE_MODELS` is set.

use ruvllm_gguf::{GgmlType, GgufFile};
use ruvllm_kernels::quants::{dequantize_row, quantize_q4_0, quantize_q8_0};
use ruvllm_model::registry;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ref_python() -> Option<PathBuf> {
    let p = std::env::var_os("RUVLLM_REF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import gguf"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(p);
    }
    if std::env::var_os("RUVLLM_REQUIRE_MODELS").is_some() {
        panic!(
            "no Python with the gguf package at {} (set RUVLLM_REF_PYTHON)",
            p.display()
        );
    }
    eprintln!(
        "skipping: no Python with the gguf package at {}",
        p.display()
    );
    None
}

fn ty_by_name(name: &str) -> GgmlType {
    (0..64)
        .filter_map(|id| GgmlType::from_id(id).ok())
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .unwrap()
}

fn read_f32(p: PathBuf) -> Vec<f32> {
    std::fs::read(p)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn assert_same(what: &str, ours: &[f32], reference: &[f32]) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        // Bit-identical: both follow ggml's operation order exactly (NaN payloads may differ).
        assert!(
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            "{what}[{i}]: ours {a} vs gguf-py {b}"
        );
    }
    eprintln!("{what}: {} values, all bit-identical", ours.len());
}

#[test]
fn dequantization_matches_gguf_py() {
    let Some(py) = ref_python() else { return };
    let models: Vec<PathBuf> = ["smollm2-135m", "gemma3-270m"]
        .iter()
        .filter_map(|m| registry::for_test(m))
        .collect();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gguf-py-dequant");
    let status = Command::new(&py)
        .arg(repo().join("tests/ref/gguf_dequant.py"))
        .arg(&out)
        .args(&models)
        .status()
        .unwrap();
    assert!(status.success(), "reference script failed");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();

    let syn = manifest["synthetic"].as_array().unwrap();
    assert!(syn.len() >= 12, "every type is covered");
    for s in syn {
        let ty = ty_by_name(s["type"].as_str().unwrap());
        let q = std::fs::read(out.join(s["q"].as_str().unwrap())).unwrap();
        let n = s["n"].as_u64().unwrap() as usize;
        let mut ours = vec![0f32; n];
        assert!(dequantize_row(ty, &q, &mut ours));
        assert_same(
            &format!("synthetic {ty}"),
            &ours,
            &read_f32(out.join(s["f32"].as_str().unwrap())),
        );
    }

    let tensors = manifest["tensors"].as_array().unwrap();
    if !models.is_empty() {
        assert!(!tensors.is_empty());
    }
    for t in tensors {
        let f = GgufFile::open(std::path::Path::new(t["model"].as_str().unwrap())).unwrap();
        let info = f.tensor_info(t["tensor"].as_str().unwrap()).unwrap();
        let rows = t["rows"].as_u64().unwrap() as usize;
        let cols = info.dims[0] as usize;
        let row_bytes = info.ggml_type.row_bytes(cols as u64).unwrap() as usize;
        let mut ours = vec![0f32; rows * cols];
        assert!(dequantize_row(
            info.ggml_type,
            &f.tensor_data(info)[..rows * row_bytes],
            &mut ours
        ));
        assert_same(
            &format!("{} {}", t["tensor"], info.ggml_type),
            &ours,
            &read_f32(out.join(t["f32"].as_str().unwrap())),
        );
    }

    // Quantization (the KV cache's Q8_0 and Q4_0): byte-identical to gguf-py's `quantize`.
    let quant = manifest["quantize"].as_array().unwrap();
    assert_eq!(quant.len(), 2);
    for q in quant {
        let ty = q["type"].as_str().unwrap();
        let x = read_f32(out.join(q["f32"].as_str().unwrap()));
        let reference = std::fs::read(out.join(q["q"].as_str().unwrap())).unwrap();
        let mut ours = vec![0u8; reference.len()];
        match ty {
            "Q8_0" => quantize_q8_0(&x, &mut ours),
            "Q4_0" => quantize_q4_0(&x, &mut ours),
            other => panic!("unexpected type {other}"),
        }
        let diff = ours.iter().zip(&reference).filter(|(a, b)| a != b).count();
        assert_eq!(
            diff,
            0,
            "quantize {ty}: {diff} of {} bytes differ from gguf-py",
            ours.len()
        );
        eprintln!(
            "quantize {ty}: {} values, byte-identical to gguf-py",
            x.len()
        );
    }
}
