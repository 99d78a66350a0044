"""The second model through the server: Gemma-3 (SentencePiece; its GGUF has no chat template,
so the gemma turn-format fallback renders the messages). Greedy completions of the golden
prompts equal llama.cpp's up to the first near-tie (as crates/model/tests/golden_logits.rs
requires of the library)."""
import json
from pathlib import Path

import httpx
from conftest import ROOT, Server


def test_gemma3_matches_llama_cpp_through_the_api():
    golden = json.loads((ROOT / "tests/data/gemma3-270m-q4_k_m.json").read_text())
    s = Server("-c", "1024", model="gemma3-270m")
    try:
        assert [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]][0] == "gemma3-270m"
        checked = 0
        for case in golden["generate"]:
            top5 = case["top5_at_each_step"]
            tie = next((i for i, t in enumerate(top5) if t[0][1] - t[1][1] < 0.5), len(case["greedy_ids"]))
            n = min(tie, 16)
            if n < 4:
                continue
            r = httpx.post(s.url + "/v1/completions", timeout=120, json={
                "model": "gemma3-270m", "prompt": case["prompt_ids"], "max_tokens": n, "temperature": 0, "ignore_eos": True}).json()
            want = httpx.post(s.url + "/detokenize", json={"tokens": case["greedy_ids"][:n]}).json()["prompt"]
            assert r["choices"][0]["text"] == want, (case["prompt"], r["choices"][0]["text"], want)
            checked += 1
        assert checked >= 2
        # Chat goes through the gemma turn format: two turn markers (user, then model).
        turn = httpx.post(s.url + "/tokenize", json={"prompt": "<start_of_turn>", "add_special_tokens": False}).json()["tokens"]
        assert len(turn) == 1
        chat = httpx.post(s.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
        assert chat.count(turn[0]) == 2
        r = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={"model": "gemma3-270m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).json()
        assert r["usage"]["prompt_tokens"] == len(chat)
    finally:
        assert s.stop() == 0
