"""Abuse: each bad request gets the right status and an OpenAI-shaped error naming the problem,
and the server keeps serving (checked after every case)."""
import httpx
import pytest
from conftest import KEY, MODEL

OK = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0}


def check_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def still_serving(http):
    r = http.post("/v1/chat/completions", json=OK)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def with_(**kw):
    body = dict(OK)
    body.update(kw)
    return body


CASES = [
    ("malformed json", b'{"model": "smollm2-135m", "messages": [', 400, None, None),
    ("not an object", b"[1, 2, 3]", 400, None, None),
    ("invalid utf-8", b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None, None),
    ("wrong type temperature", with_(temperature="hot"), 400, "temperature", None),
    ("wrong type messages", with_(messages="hello"), 400, "messages", None),
    ("wrong type max_tokens", with_(max_tokens="ten"), 400, "max_tokens", None),
    ("negative max_tokens", with_(max_tokens=-5), 400, "max_tokens", None),
    ("zero max_tokens", with_(max_tokens=0), 400, "max_tokens", None),
    ("huge max_tokens", with_(max_tokens=10**12), 400, "messages", "context_length_exceeded"),
    ("temperature below zero", with_(temperature=-0.5), 400, "temperature", None),
    ("top_p above one", with_(top_p=1.5), 400, "top_p", None),
    ("presence_penalty out of range", with_(presence_penalty=5), 400, "presence_penalty", None),
    ("n zero", with_(n=0), 400, "n", None),
    ("top_logprobs without logprobs", with_(top_logprobs=2), 400, "top_logprobs", None),
    ("top_logprobs too many", with_(logprobs=True, top_logprobs=50), 400, "top_logprobs", None),
    ("stop wrong type", with_(stop=5), 400, "stop", None),
    ("empty messages", with_(messages=[]), 400, "messages", None),
    ("bad role", with_(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0]", None),
    ("unknown model", with_(model="gpt-7"), 404, "model", "model_not_found"),
    ("missing model", {"messages": OK["messages"]}, 400, "model", None),
    ("unsupported tools", with_(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", None),
]


@pytest.mark.parametrize("name,body,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_bad_chat_request(http, name, body, status, param, code):
    if isinstance(body, bytes):
        r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post("/v1/chat/completions", json=body)
    check_error(r, status, param, code)
    still_serving(http)


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/chat/completions", json=with_(some_future_field={"x": 1}, user="alice"))
    assert r.status_code == 200


def test_over_long_prompt(http):
    long = "word " * 5000  # > 2048-token context
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": long, "max_tokens": 4})
    check_error(r, 400, "prompt", "context_length_exceeded")
    assert "2048" in r.json()["error"]["message"]
    still_serving(http)


def test_prompt_plus_max_tokens_beyond_context(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 1000, "max_tokens": 1500})
    check_error(r, 400, "prompt", "context_length_exceeded")
    still_serving(http)


def test_bad_completion_prompts(http):
    for prompt, param in [(None, "prompt"), ([], "prompt"), ([-1, 5], "prompt"), ({"a": 1}, "prompt"), ([10**10], "prompt")]:
        check_error(http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}), 400, param)
    check_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    check_error(http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "encoding_format": "hex"}), 400, "encoding_format")
    still_serving(http)


def test_missing_and_wrong_api_key(server, http):
    r = httpx.post(server.url + "/v1/chat/completions", json=OK)
    check_error(r, 401, code="invalid_api_key")
    r = httpx.post(server.url + "/v1/chat/completions", json=OK, headers={"Authorization": "Bearer nope"})
    check_error(r, 401, code="invalid_api_key")
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic " + KEY})
    check_error(r, 401)
    assert httpx.get(server.url + "/health").status_code == 200
    still_serving(http)


def test_oversized_body(http):
    r = http.post("/v1/chat/completions", json=with_(messages=[{"role": "user", "content": "x" * 100_000}]))
    check_error(r, 413, code="request_too_large")
    still_serving(http)


def test_unknown_route(http):
    check_error(http.get("/v1/nothing-here"), 404)
    still_serving(http)
