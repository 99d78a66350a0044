"""SIGTERM: the server stops accepting, lets in-flight requests finish, and exits 0; with a short
grace period, a request that would run longer is cancelled and the server still exits 0."""
import signal
import threading
import time

import httpx
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
