"""Reference dequantization with gguf-py (PyPI `gguf`), for crates/model/tests/dequant_vs_gguf_py.rs.

usage: gguf_dequant.py OUT_DIR [MODEL.gguf ...]

Writes, for every ggml type gguf-py can dequantize, synthetic random blocks (`syn_<type>.q`) and
their dequantization (`syn_<type>.f32`); and for each model, the first rows of one tensor of each
type it holds (`<model>_<tensor>.f32`). `manifest.json` lists everything.
"""
import json, os, sys
import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
manifest = {"synthetic": [], "tensors": []}
rng = np.random.default_rng(1234)

# Offsets of f16 scale fields per block, so random blocks have finite, moderate scales.
SCALES = {
    T.Q4_0: [0], T.Q5_0: [0], T.Q8_0: [0], T.Q4_1: [0, 2], T.Q5_1: [0, 2],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
for t in [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:  # gguf-py has no Q8_K dequantizer (Q8_K is an activation type)
    bs, ts = GGML_QUANT_SIZES[t]
    nblocks = 64
    raw = rng.integers(0, 256, size=(nblocks, ts), dtype=np.uint8)
    for o in SCALES.get(t, []):
        raw[:, o:o + 2] = np.frombuffer(rng.uniform(-0.05, 0.05, nblocks).astype(np.float16).tobytes(), dtype=np.uint8).reshape(nblocks, 2)
    if t == T.Q8_K:
        raw[:, 0:4] = np.frombuffer(rng.uniform(-0.05, 0.05, nblocks).astype(np.float32).tobytes(), dtype=np.uint8).reshape(nblocks, 4)
    if t == T.F16:
        raw = np.frombuffer(rng.uniform(-4, 4, nblocks * ts // 2).astype(np.float16).tobytes(), dtype=np.uint8).reshape(nblocks, ts)
    deq = dequantize(raw.reshape(-1), t).astype(np.float32)
    name = f"syn_{t.name}"
    raw.tofile(os.path.join(out, name + ".q"))
    deq.tofile(os.path.join(out, name + ".f32"))
    manifest["synthetic"].append({"type": t.name, "q": name + ".q", "f32": name + ".f32", "n": int(deq.size)})

# Quantization references (the KV cache quantizes with Q8_0 and Q4_0).
from gguf.quants import quantize
manifest["quantize"] = []
for t in [T.Q8_0, T.Q4_0]:
    x = rng.standard_normal((16, 128)).astype(np.float32) * rng.uniform(0.01, 10, (16, 1)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, 5] = 1e-30  # a tiny one
    q = quantize(x, t)
    name = f"quant_{t.name}"
    x.tofile(os.path.join(out, name + ".f32"))
    np.asarray(q, dtype=np.uint8).tofile(os.path.join(out, name + ".q"))
    manifest["quantize"].append({"type": t.name, "f32": name + ".f32", "q": name + ".q", "n": int(x.size)})

for path in sys.argv[2:]:
    r = GGUFReader(path)
    seen = set()
    for tensor in r.tensors:
        t = tensor.tensor_type
        if t in seen or t == T.F32:
            continue
        seen.add(t)
        rows = min(8, int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1)
        row_elems = int(tensor.shape[0])
        bs, ts = GGML_QUANT_SIZES[t]
        row_bytes = row_elems // bs * ts
        data = np.asarray(tensor.data).reshape(-1).view(np.uint8)[: rows * row_bytes]
        deq = dequantize(data, t).astype(np.float32).reshape(-1)
        name = f"{os.path.basename(path)}_{tensor.name}"
        deq.tofile(os.path.join(out, name + ".f32"))
        manifest["tensors"].append({"model": path, "tensor": tensor.name, "type": t.name, "rows": rows, "f32": name + ".f32"})
json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"), indent=1)
print(f"wrote {len(manifest['synthetic'])} synthetic and {len(manifest['tensors'])} tensor references to {out}")
