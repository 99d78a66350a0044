"""Starts a real `ruvllm serve` process for the suite (SmolLM2, API key `test-key`)."""
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("RUVLLM_BIN", str(ROOT / "target" / "release" / "ruvllm"))
KEY = "test-key"
MODEL = "smollm2-135m"


class Server:
    def __init__(self, *extra, model=MODEL):
        # Output goes to files, never to pipes nobody drains (a full pipe would block the
        # server's logging and with it the server).
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ruvllm-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [BIN, "serve", "-m", model, "--port", "0", "-t", "2", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.time() + 60
        self.url = None
        while time.time() < deadline and self.proc.poll() is None:
            m = re.search(r"listening on (http://\S+)", Path(self.log.name).read_text())
            if m:
                self.url = m.group(1)
                break
            time.sleep(0.05)
        if self.url is None:
            self.proc.kill()
            raise RuntimeError("server did not start: " + Path(self.log.name).read_text())

    def stop(self, timeout=30):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="session")
def server():
    s = Server("--api-key", KEY, "--max-body-bytes", "65536", "-c", "2048")
    yield s
    assert s.stop() == 0, "graceful shutdown must exit 0"


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def metrics(http):
    """Parses /metrics with prometheus_client into {name: value} (samples without labels)."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out
