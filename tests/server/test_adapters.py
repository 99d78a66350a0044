"""LoRA adapters over HTTP: load a PEFT-style adapter at run time, use it by `model` or
`adapter`, hot-swap it (new version, new weights) and delete it. The safetensors file is written
here byte by byte from the format's specification (8-byte header length, JSON header, data)."""
import json
import random
import struct
from pathlib import Path

from conftest import MODEL

SHAPES = {"v_proj": (192, 576), "down_proj": (576, 1536)}  # SmolLM2-135M (out, in)


def write_peft(dir: Path, seed: int, scale: float = 0.1):
    rng = random.Random(seed)
    tensors = {}
    for layer in range(30):
        for proj, (out, inp) in SHAPES.items():
            parent = "self_attn" if proj.endswith("v_proj") else "mlp"
            base = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
            tensors[f"{base}.lora_A.weight"] = ([2, inp], [rng.uniform(-scale, scale) for _ in range(2 * inp)])
            tensors[f"{base}.lora_B.weight"] = ([out, 2], [rng.uniform(-scale, scale) for _ in range(out * 2)])
    header, blobs, off = {}, [], 0
    for name, (shape, values) in tensors.items():
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    h = json.dumps(header).encode()
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    (dir / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "target_modules": list(SHAPES), "peft_type": "LORA"}))


def complete(http, want_logprobs=False, **kw):
    body = {"model": MODEL, "prompt": "The history of computing begins with", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    body.update(kw)
    if want_logprobs:
        body["logprobs"] = 1
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return (c["text"], c["logprobs"]["token_logprobs"]) if want_logprobs else c["text"]


def test_adapter_load_use_swap_delete(http, tmp_path):
    base = complete(http)
    write_peft(tmp_path / "a1", seed=1)
    r = http.post("/v1/adapters", json={"name": "styled", "path": str(tmp_path / "a1")})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 0 and r.json()["projections"] == 60
    assert "styled" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    adapted = complete(http, model="styled")
    assert adapted != base
    assert complete(http, adapter="styled") == adapted
    adapted_lp = complete(http, want_logprobs=True, model="styled")[1]
    # Hot swap: same name, other weights → new version, other output; scale 0 → the base model.
    write_peft(tmp_path / "a2", seed=2)
    r = http.post("/v1/adapters", json={"name": "styled", "path": str(tmp_path / "a2")})
    assert r.json()["version"] == 1
    # The new weights are in use: the greedy text of two small random adapters may coincide,
    # their token log-probabilities do not.
    assert complete(http, want_logprobs=True, model="styled")[1] != adapted_lp
    r = http.post("/v1/adapters", json={"name": "styled", "path": str(tmp_path / "a2"), "scale": 0.0})
    assert r.json()["version"] == 2
    assert complete(http, model="styled") == base
    # Errors.
    r = http.post("/v1/adapters", json={"name": "broken", "path": str(tmp_path / "missing")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "adapter": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert http.delete("/v1/adapters/styled").status_code == 200
    r = http.post("/v1/completions", json={"model": "styled", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert complete(http) == base
