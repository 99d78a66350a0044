"""The official `openai` client against `ruvllm serve`: chat and completions, streamed and not,
n > 1, stop sequences, logprobs, seeds, embeddings, models, tokenize, metrics, OpenAPI."""
import base64
import struct

import pytest
from conftest import MODEL, metrics

CHAT = [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name three primary colors."}]


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == MODEL
    assert "SmolLM2-135M-Instruct.Q4_1" in ids
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert c.message.role == "assistant" and len(c.message.content) > 0
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 40
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streamed_equals_non_streamed_at_temperature_zero(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=48, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=48, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, finish, usage, roles = "", None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles += 1
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert roles == 1
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_streamed_equals_non_streamed(client):
    p = "The three laws of motion are"
    full = client.completions.create(model=MODEL, prompt=p, max_tokens=30, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=p, max_tokens=30, temperature=0, stream=True) if c.choices)
    assert full.object == "text_completion"
    assert text == full.choices[0].text and len(text) > 0
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 30


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=1.0, n=2, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 32
    assert r.choices[0].message.content != r.choices[1].message.content
    # Streamed n=2 gives both indices.
    seen = set()
    for chunk in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, n=2, stream=True, seed=3):
        seen.update(c.index for c in chunk.choices)
    assert seen == {0, 1}


def test_stop_sequences(client):
    p = "1, 2, 3, 4,"
    full = client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0).choices[0].text
    assert " 7" in full
    cut = client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0, stop=[" 7", "zzz"])
    assert cut.choices[0].text == full[: full.index(" 7")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0, stop=" 7", stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)  # greedy picks the top token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    assert "".join(t.token for t in content) == r.choices[0].message.content
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset[0] == 0


def test_seed_reproducibility(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=24, temperature=1.2, top_p=0.95)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=999, **kw).choices[0].message.content
    assert a == b
    assert a != c


def test_embeddings(client):
    r = client.embeddings.create(model=MODEL, input=["The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly revenue grew by 4%."])
    assert [d.index for d in r.data] == [0, 1, 2]
    vs = [d.embedding for d in r.data]
    dim = len(vs[0])
    assert dim == 576
    for v in vs:
        assert sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    assert dot(vs[0], vs[1]) > dot(vs[0], vs[2])
    assert r.usage.prompt_tokens > 0
    # Float format equals the client's default base64 decoding, bit for bit.
    f = client.embeddings.create(model=MODEL, input="The cat sat on the mat.", encoding_format="float").data[0].embedding
    assert f == pytest.approx(vs[0], abs=0)


def test_embeddings_base64_raw(http):
    r = http.post("/v1/embeddings", json={"model": MODEL, "input": "hi", "encoding_format": "base64"}).json()
    raw = base64.b64decode(r["data"][0]["embedding"])
    v = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(v) == 576


def test_tokenize_detokenize(http):
    t = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert t["count"] == len(t["tokens"]) > 0
    assert http.post("/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "Hello world"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3


def test_health_ready_metrics_openapi(server, http):
    import httpx
    assert httpx.get(server.url + "/health").status_code == 200  # open without a key
    assert http.get("/ready").json()["status"] == "ready"
    m = metrics(http)
    for name in ["ruvllm:requests_running", "ruvllm:requests_waiting", "ruvllm:kv_blocks_used", "ruvllm:kv_blocks_cached",
                 "ruvllm:kv_blocks_total", "ruvllm:prefix_cache_queries_total", "ruvllm:prefix_cache_hits_total",
                 "ruvllm:prompt_tokens_total", "ruvllm:generation_tokens_total",
                 "ruvllm:time_to_first_token_seconds_count", "ruvllm:inter_token_latency_seconds_count", "ruvllm:e2e_request_latency_seconds_count"]:
        assert name in m, name
    assert m["ruvllm:kv_blocks_total"] > 0
    from openapi_spec_validator import validate
    doc = http.get("/openapi.json").json()
    validate(doc)
    for p in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize", "/detokenize", "/health", "/ready", "/metrics"]:
        assert p in doc["paths"], p


def test_prefix_cache_reuse_is_reported(client, http):
    system = "You are a meticulous assistant. " * 40
    msgs = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]
    client.chat.completions.create(model=MODEL, messages=msgs("First?"), max_tokens=2, temperature=0)
    before = metrics(http)["ruvllm:prefix_cache_hits_total"]
    r = client.chat.completions.create(model=MODEL, messages=msgs("Second?"), max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= 160
    assert metrics(http)["ruvllm:prefix_cache_hits_total"] - before >= 10
