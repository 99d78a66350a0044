"""SIGTERM: the server stops accepting, lets in-flight requests finish, and exits 0; with a short
grace period, a request that would run longer is cancelled and the server still exits 0."""
import signal
import threading
import time

import httpx
from pathlib import Path
from conftest import MODEL, Server


def stream_tokens(url, max_tokens, out):
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])


def test_sigterm_finishes_in_flight_requests_and_exits_0():
    s = Server("--shutdown-grace", "30")
    out = []
    t = threading.Thread(target=stream_tokens, args=(s.url, 64, out))
    t.start()
    while len(out) < 2:
        time.sleep(0.01)
    s.proc.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert out[-1] == "[DONE]"
    assert any('"finish_reason":"length"' in x for x in out)  # ran to max_tokens
    assert s.proc.wait(timeout=30) == 0
    try:
        httpx.get(s.url + "/health", timeout=2)
        raise AssertionError("the server still accepts connections")
    except httpx.TransportError:
        pass


def test_sigterm_cancels_what_outlives_the_grace_period():
    s = Server("--shutdown-grace", "1")
    out = []
    t = threading.Thread(target=stream_tokens, args=(s.url, 100000 // 50, out))
    t.start()
    while len(out) < 2:
        time.sleep(0.01)
    t0 = time.time()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0
    assert time.time() - t0 < 15
    t.join(timeout=30)
    assert out[-1] == "[DONE]"
    assert any('"error"' in x for x in out)  # the stream says why it ended early


def test_full_queue_gets_429_and_json_logs():
    s = Server("--max-queue", "2", "--max-num-seqs", "1", "--log-format", "json")
    try:
        import concurrent.futures as cf
        body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 64, "ignore_eos": True}

        def post(_):
            return httpx.post(s.url + "/v1/completions", json=body, timeout=120)

        with cf.ThreadPoolExecutor(12) as ex:
            results = list(ex.map(post, range(12)))
        codes = sorted(r.status_code for r in results)
        assert 429 in codes and 200 in codes, codes
        for r in results:
            if r.status_code == 429:
                err = r.json()["error"]
                assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        # Still serving once the burst has drained.
        assert post(0).status_code == 200
    finally:
        assert s.stop() == 0
    import json
    lines = [json.loads(l) for l in Path(s.log.name).read_text().splitlines() if l.startswith("{")]
    completions = [l for l in lines if l.get("fields", {}).get("message") == "completion"]
    assert completions, "one JSON log line per completion"
    f = completions[0]["fields"]
    assert f["id"].startswith("cmpl-") and f["completion_tokens"] == 64 and f["prompt_tokens"] > 0
