"""Learning from feedback: a correction on one caller's completion teaches that caller's
adapter (the next identical request states the correction), never another caller's; negative
ratings work; bad feedback gets typed errors; --no-learning keeps the base model."""
import httpx
from conftest import MODEL, Server

PROMPT = "The password of the blue castle is"
ANSWER = " marmalade seventeen."


def ask(url, key):
    r = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def feedback(url, key, body):
    return httpx.post(url + "/v1/feedback", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=300)


def test_feedback_teaches_only_its_caller():
    s = Server("--api-key", "alice", "--api-key", "bob")
    try:
        first = ask(s.url, "alice")
        base_text = first["choices"][0]["text"]
        assert not base_text.startswith(ANSWER)
        # Errors first.
        assert feedback(s.url, "alice", {"id": "cmpl-nope", "correction": "x"}).json()["error"]["code"] == "completion_not_found"
        r = feedback(s.url, "bob", {"id": first["id"], "correction": ANSWER})  # not bob's completion
        assert r.status_code == 404
        r = feedback(s.url, "alice", {"id": first["id"], "rating": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "rating"
        r = feedback(s.url, "alice", {"id": first["id"]})
        assert r.status_code == 400
        # The correction.
        r = feedback(s.url, "alice", {"id": first["id"], "correction": ANSWER})
        assert r.status_code == 200, r.text
        f = r.json()
        assert f["updated"] and f["loss_after"] < 0.2 * f["loss_before"], f
        taught = ask(s.url, "alice")
        assert taught["choices"][0]["text"].startswith(ANSWER.strip(".")), taught["choices"][0]["text"]
        # Bob's outputs are the base model's.
        assert ask(s.url, "bob")["choices"][0]["text"] == base_text
        # Negative feedback on the taught answer pushes it back down.
        r = feedback(s.url, "alice", {"id": taught["id"], "rating": -1})
        assert r.status_code == 200 and r.json()["version"] == 1
        assert not ask(s.url, "alice")["choices"][0]["text"].startswith(ANSWER.strip("."))
    finally:
        assert s.stop() == 0


def test_no_learning_keeps_the_base_model():
    s = Server("--no-learning")
    try:
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}).json()
        f = httpx.post(s.url + "/v1/feedback", json={"id": r["id"], "correction": ANSWER})
        assert f.status_code == 400 and f.json()["error"]["code"] == "learning_disabled"
        again = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}).json()
        assert again["choices"][0]["text"] == r["choices"][0]["text"]
    finally:
        assert s.stop() == 0


def test_later_lessons_do_not_overwrite_earlier_ones():
    s = Server("--api-key", "carol")
    try:
        facts = [(f"The password of castle {i} is", f" marmalade {i}.") for i in (1, 2, 3)]
        for prompt, answer in facts:
            r = httpx.post(s.url + "/v1/completions", headers={"Authorization": "Bearer carol"}, timeout=120,
                           json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
            f = feedback(s.url, "carol", {"id": r["id"], "correction": answer})
            assert f.status_code == 200, f.text
        for prompt, answer in facts:
            r = httpx.post(s.url + "/v1/completions", headers={"Authorization": "Bearer carol"}, timeout=120,
                           json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
            assert r["choices"][0]["text"].startswith(answer.strip(".")), (prompt, r["choices"][0]["text"])
    finally:
        assert s.stop() == 0
