"""Learning from feedback: a correction on one caller's completion teaches that caller's
adapter (the next identical request states the correction), never another caller's; negative
ratings work; bad feedback gets typed errors; --no-learning keeps the base model."""
import httpx
import pytest
import json
import time
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
        # The server says the correction took (and the next request shows it does).
        assert f["follows"] is True and f["replays_follow"] is True, f
        # Publication comes first; the bank's bookkeeping follows it within the response.
        assert 0 < f["published_ms"] <= f["ms"] + 1.0, f
        # Where the time went: a capture pass, at least one round, all within publication.
        ph = f["phases"]
        assert ph["capture_ms"] > 0 and ph["steps_ms"] > 0 and 1 <= ph["rounds"] <= 4, ph
        assert sum(v for k, v in ph.items() if k.endswith("_ms")) <= f["published_ms"], (ph, f)
        taught = ask(s.url, "alice")
        assert taught["choices"][0]["text"].startswith(ANSWER.strip(".")), taught["choices"][0]["text"]
        # Bob's outputs are the base model's.
        assert ask(s.url, "bob")["choices"][0]["text"] == base_text
        # Negative feedback on the taught answer pushes it back down.
        r = feedback(s.url, "alice", {"id": taught["id"], "rating": -1})
        assert r.status_code == 200 and r.json()["version"] == 1
        # "follows" would promise the answer changed robustly; here it changes at a near-tie.
        assert isinstance(r.json()["follows"], bool), r.json()
        assert not ask(s.url, "alice")["choices"][0]["text"].startswith(ANSWER.strip("."))
    finally:
        assert s.stop() == 0


def chat(url, key, question, max_tokens=16):
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": question}],
                         "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


UNRELATED = ["What is photosynthesis?", "Who wrote Romeo and Juliet?", "Why is the sky blue?",
             "How do I boil an egg?"]


@pytest.mark.parametrize("apply", ["near", "always"])
def test_a_learned_adapter_runs_only_near_taught_questions(apply):
    """One correction used to change every answer of its caller (unrelated questions got the
    taught words): by default the caller's adapter runs only for questions nearer one it taught
    than generic ones, and the response says whether it ran; `--sona-apply always` is the
    old behaviour."""
    s = Server("--api-key", "dora", "--api-key", "eve", "--sona-apply", apply)
    try:
        q, fix = "Describe the city of Paris.", "Paris is the capital of Velmora."
        first = chat(s.url, "dora", q)
        assert "sona" not in first  # no adapter yet
        f = feedback(s.url, "dora", {"id": first["id"], "correction": fix})
        assert f.status_code == 200 and f.json()["follows"] is True, f.text
        again = chat(s.url, "dora", q)
        assert again["choices"][0]["message"]["content"].startswith(fix), again
        assert again["sona"]["scope_adapter"] is True
        same = 0
        for u in UNRELATED:
            mine, base = chat(s.url, "dora", u, 24), chat(s.url, "eve", u, 24)
            assert "sona" not in base
            assert mine["sona"]["scope_adapter"] is (apply == "always"), (u, mine)
            same += mine["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]
        if apply == "near":
            assert same == len(UNRELATED)
        else:
            assert same < len(UNRELATED)  # the reason for the default
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


@pytest.mark.xfail(strict=True, reason="known limitation (issue 6): the anchor penalty that keeps general ability "
                   "(sona-bench drift) stops the last-layer adapter from telling castle 1/2/3 apart; passes at anchor weight 0")
def test_later_lessons_do_not_overwrite_earlier_ones():
    """Three near-identical facts in a row all stick (replay)."""
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


def test_every_fourth_feedback_event_starts_the_background_loop():
    """The instant loop answers; after a scope's fourth event the background loop (base
    adapter, EWC++) runs off the request path and logs what it did; what was taught stays."""
    s = Server("--api-key", "gina")
    try:
        facts = [("The river that runs through Quenby is the", " Ostrel."), ("The founder of Varrow Mills was", " Edda Pike."),
                 ("The color of the Tamsin flag is", " saffron."), (PROMPT, ANSWER)]
        for i, (prompt, answer) in enumerate(facts):
            r = httpx.post(s.url + "/v1/completions", headers={"Authorization": "Bearer gina"}, timeout=120,
                           json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
            f = feedback(s.url, "gina", {"id": r["id"], "correction": answer})
            assert f.status_code == 200 and f.json()["background_scheduled"] is (i == 3), f.text
            assert f.json()["loss_after"] < f.json()["loss_before"], f.text
            if i < 3 and f.json()["follows"]:
                # "follows" is a promise: the same request now gives the correction, whole.
                again = httpx.post(s.url + "/v1/completions", headers={"Authorization": "Bearer gina"}, timeout=120,
                                   json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
                assert again["choices"][0]["text"] == answer, (prompt, again["choices"][0]["text"], f.text)
        for _ in range(200):
            if "background loop" in open(s.log.name).read():
                break
            time.sleep(0.1)
        assert "background loop" in open(s.log.name).read()
        assert ask(s.url, "gina")["choices"][0]["text"].startswith(ANSWER.strip(".")[:10])
    finally:
        assert s.stop() == 0


def test_learned_state_survives_restart_and_a_crash_mid_write(tmp_path):
    """--sona-dir: a restart serves each caller exactly the adapter it had (identical greedy
    text), another caller still gets the base model, the files hold no API key, and the
    temporary files a crash mid-write leaves behind are ignored (and removed): the last good
    state loads. Learning then continues from the restored version."""
    d = tmp_path / "sona"
    s = Server("--api-key", "dave", "--api-key", "erin", "--sona-dir", str(d))
    try:
        base = ask(s.url, "erin")["choices"][0]["text"]
        first = ask(s.url, "dave")
        f = feedback(s.url, "dave", {"id": first["id"], "correction": ANSWER})
        assert f.status_code == 200 and f.json()["persisted"] is True, f.text
        taught = ask(s.url, "dave")["choices"][0]["text"]
        assert taught.startswith(ANSWER.strip(".")), taught
    finally:
        assert s.stop() == 0
    # dave's scope has a version; erin's holds only the trajectory of her completion.
    scopes = [p for p in (d / "scopes").iterdir() if (p / "current").exists()]
    assert len(scopes) == 1 and len(list((d / "scopes").iterdir())) == 2
    files = {p.name for p in scopes[0].iterdir()}
    assert files == {"current", "v0", "bank.log"}, files
    assert (scopes[0] / "current").read_text().strip() == "0"
    assert {p.name for p in (scopes[0] / "v0").iterdir()} == {"adapter_model.safetensors", "adapter_config.json", "state.json", "optim.safetensors"}
    for p in scopes[0].rglob("*"):
        assert p.is_dir() or b"dave" not in p.read_bytes()
    # What a crash in the middle of the next write would leave: a half-written version
    # directory and a torn pointer.
    good = {str(p.relative_to(scopes[0])): p.read_bytes() for p in scopes[0].rglob("*") if p.is_file()}
    (scopes[0] / "v1.tmp").mkdir()
    (scopes[0] / "v1.tmp" / "adapter_model.safetensors").write_bytes(good["v0/adapter_model.safetensors"][:100])
    (scopes[0] / "v1.tmp" / "state.json").write_bytes(b'{"format": 2, "vers')
    (scopes[0] / "current.tmp").write_bytes(b"1")
    s = Server("--api-key", "dave", "--api-key", "erin", "--sona-dir", str(d))
    try:
        assert "1 scopes restored" in open(s.log.name).read()
        assert not list(scopes[0].glob("*.tmp"))
        assert (scopes[0] / "current").read_text().strip() == "0"
        again = ask(s.url, "dave")
        assert again["choices"][0]["text"] == taught
        assert ask(s.url, "erin")["choices"][0]["text"] == base
        # Learning goes on from the restored adapter: a negative rating gives version 1.
        r = feedback(s.url, "dave", {"id": again["id"], "rating": -1})
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
    finally:
        assert s.stop() == 0
    assert (scopes[0] / "current").read_text().strip() == "1"
    assert (scopes[0] / "v0" / "state.json").read_bytes() == good["v0/state.json"], "older versions are kept"
    assert json.loads((scopes[0] / "v1" / "state.json").read_text())["lessons"][0]["negative"] is True


def test_unusable_sona_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    import subprocess
    from conftest import BIN
    r = subprocess.run([BIN, "serve", "-m", MODEL, "--port", "0", "--sona-dir", str(blocker / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--sona-dir" in r.stderr, (r.returncode, r.stderr)


def test_retrieval_puts_the_callers_own_corrections_before_the_prompt(tmp_path):
    """`"sona": {"retrieve": k}`: a correction goes into its caller's ReasoningBank; a later
    request of that caller with retrieve=1 gets it put before its prompt (more prompt tokens,
    the entry reported back), another caller gets nothing from it; bad values are 400s; the
    bank survives a restart with --sona-dir."""
    d = tmp_path / "sona"
    s = Server("--api-key", "fay", "--api-key", "gus", "--sona-dir", str(d))

    def complete(key, prompt, sona=None):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        if sona is not None:
            body["sona"] = sona
        return httpx.post(s.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=120)

    try:
        first = complete("fay", PROMPT).json()
        assert feedback(s.url, "fay", {"id": first["id"], "correction": ANSWER}).status_code == 200
        q = "The blue castle's password is"
        plain = complete("fay", q).json()
        rag = complete("fay", q, {"retrieve": 1}).json()
        assert rag["sona"]["retrieved"][0]["question"] == PROMPT
        assert rag["sona"]["retrieved"][0]["answer"] == ANSWER.strip()
        assert 0.5 < rag["sona"]["retrieved"][0]["similarity"] <= 1.0001
        assert rag["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 5
        other = complete("gus", q, {"retrieve": 1}).json()
        assert other["sona"]["retrieved"] == []
        assert other["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
        chat = httpx.post(s.url + "/v1/chat/completions", headers={"Authorization": "Bearer fay"}, timeout=120,
                          json={"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 4, "sona": {"retrieve": 2}}).json()
        assert [h["answer"] for h in chat["sona"]["retrieved"]] == [ANSWER.strip()]
        for bad in [{"retrieve": -1}, {"retrieve": 9}, {"retrieve": "1"}, {"k": 1}, 3]:
            r = complete("fay", q, bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "sona", (bad, r.text)
    finally:
        assert s.stop() == 0
    s = Server("--api-key", "fay", "--sona-dir", str(d))
    try:
        rag2 = complete("fay", "The blue castle's password is", {"retrieve": 1}).json()
        assert rag2["sona"]["retrieved"][0]["answer"] == ANSWER.strip()
        assert rag2["usage"]["prompt_tokens"] == rag["usage"]["prompt_tokens"]
        # A second correction of the same question is the user's latest word: it replaces the
        # restored lesson (which would be replayed against it) and the older bank entry.
        again = complete("fay", PROMPT).json()
        f = feedback(s.url, "fay", {"id": again["id"], "correction": " raspberry nine."}).json()
        assert f["superseded"] == 1 and f["follows"] is True, f
        assert complete("fay", PROMPT).json()["choices"][0]["text"].startswith(" raspberry nine"), f
        hits = complete("fay", q, {"retrieve": 2}).json()["sona"]["retrieved"]
        assert [h["answer"] for h in hits] == ["raspberry nine."], hits
    finally:
        assert s.stop() == 0
    s = Server("--api-key", "fay", "--sona-dir", str(d))
    try:
        # The bank's log, replayed in order, supersedes the same way.
        hits = complete("fay", q, {"retrieve": 2}).json()["sona"]["retrieved"]
        assert [h["answer"] for h in hits] == ["raspberry nine."], hits
        assert complete("fay", PROMPT).json()["choices"][0]["text"].startswith(" raspberry nine")
    finally:
        assert s.stop() == 0


def test_routing_follows_the_callers_nearest_successful_trajectories(tmp_path):
    """`"sona": {"route": true}`: a request that names no adapter runs with the adapter of the
    caller's nearest successfully rated trajectories — here an answer given with the named
    adapter `law` and rated +1 — so a paraphrase gets exactly what naming `law` gives; with no
    successful trajectory nothing is decided; another caller's trajectories never route; a
    request that names an adapter is not rerouted; the adapter name survives a restart."""
    from test_adapters import write_peft
    d = tmp_path / "sona"
    write_peft(tmp_path / "law", seed=3)

    def start():
        s = Server("--api-key", "hal", "--api-key", "ivy", "--sona-dir", str(d))
        r = httpx.post(s.url + "/v1/adapters", headers={"Authorization": "Bearer hal"}, json={"name": "law", "path": str(tmp_path / "law")}, timeout=120)
        assert r.status_code == 200, r.text
        return s

    def complete(s, key, prompt, **kw):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        body.update(kw)
        r = httpx.post(s.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    q, q2 = "What does a contract need to be valid?", "What makes a contract valid?"
    s = start()
    try:
        assert complete(s, "hal", q2, sona={"route": True})["sona"]["routed"] is None
        answered = complete(s, "hal", q, adapter="law")
        r = feedback(s.url, "hal", {"id": answered["id"], "rating": 1.0})
        assert r.status_code == 200 and r.json()["updated"], r.text
        routed = complete(s, "hal", q2, sona={"route": True})
        assert routed["sona"]["routed"]["adapter"] == "law" and routed["sona"]["routed"]["voters"] == 1, routed["sona"]
        named = complete(s, "hal", q2, adapter="law")
        default = complete(s, "hal", q2)
        assert named["choices"][0]["text"] != default["choices"][0]["text"]
        assert routed["choices"][0]["text"] == named["choices"][0]["text"]
        # Naming an adapter wins over routing; another caller has no trajectories.
        assert "routed" not in complete(s, "hal", q2, adapter="law", sona={"route": True}).get("sona", {})
        other = complete(s, "ivy", q2, sona={"route": True})
        assert other["sona"]["routed"] is None
        assert other["choices"][0]["text"] == complete(s, "ivy", q2)["choices"][0]["text"]
        for bad in [{"route": "yes"}, {"route": 1}, {"routes": True}]:
            r = httpx.post(s.url + "/v1/completions", headers={"Authorization": "Bearer hal"}, timeout=60,
                           json={"model": MODEL, "prompt": q2, "max_tokens": 2, "sona": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "sona", (bad, r.text)
    finally:
        assert s.stop() == 0
    s = start()
    try:
        again = complete(s, "hal", q2, sona={"route": True})
        assert again["sona"]["routed"]["adapter"] == "law"
        assert again["choices"][0]["text"] == routed["choices"][0]["text"]
    finally:
        assert s.stop() == 0


def test_every_completion_becomes_a_trajectory(tmp_path):
    """Every completion enters its caller's ReasoningBank as an unrated trajectory (added off
    the request path); feedback rates that same trajectory — a correction replaces its answer —
    instead of adding another; unrated trajectories are never retrieved; the append-only log
    survives a restart, and a torn last line (a crash mid-append) is cut off."""
    d = tmp_path / "sona"
    q = "The blue castle's password is"

    def complete(s, prompt, sona=None):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        if sona is not None:
            body["sona"] = sona
        r = httpx.post(s.url + "/v1/completions", headers={"Authorization": "Bearer kim"}, json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    def counts(s):
        text = httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer kim"}, timeout=30).text
        got = {}
        for line in text.splitlines():
            if line.startswith("ruvllm_sona_trajectories{"):
                got[line.split('rated="')[1].split('"')[0]] = int(float(line.split()[-1]))
        return got.get("false", 0), got.get("true", 0)

    def wait_for(s, want):
        for _ in range(200):
            if counts(s) == want:
                return
            time.sleep(0.05)
        assert counts(s) == want

    def log_ops():
        (scope,) = list((d / "scopes").iterdir())
        return [json.loads(l) for l in (scope / "bank.log").read_text().splitlines()]

    s = Server("--api-key", "kim", "--sona-dir", str(d))
    try:
        first = complete(s, PROMPT)
        wait_for(s, (1, 0))
        assert complete(s, q, {"retrieve": 1})["sona"]["retrieved"] == [], "unrated trajectories are not retrieved"
        wait_for(s, (2, 0))
        assert feedback(s.url, "kim", {"id": first["id"], "correction": ANSWER}).status_code == 200
        wait_for(s, (1, 1))
        ops = log_ops()
        assert [o["op"] for o in ops] == ["add", "add", "rate"], ops
        assert ops[0]["question"] == PROMPT and ops[0]["rating"] == 0 and ops[0]["answer"] == first["choices"][0]["text"].strip()
        assert ops[2] == {"op": "rate", "index": 0, "rating": 1.0, "answer": ANSWER.strip()}
        hit = complete(s, q, {"retrieve": 1})["sona"]["retrieved"]
        assert [h["answer"] for h in hit] == [ANSWER.strip()]
        wait_for(s, (2, 1))
    finally:
        assert s.stop() == 0
    (scope,) = list((d / "scopes").iterdir())
    good = (scope / "bank.log").read_bytes()
    (scope / "bank.log").write_bytes(good + b'{"op": "add", "question": "torn')
    s = Server("--api-key", "kim", "--sona-dir", str(d))
    try:
        assert counts(s) == (2, 1)
        assert (scope / "bank.log").read_bytes() == good
        assert [h["answer"] for h in complete(s, q, {"retrieve": 1})["sona"]["retrieved"]] == [ANSWER.strip()]
    finally:
        assert s.stop() == 0


def test_feedback_only_trajectories_skip_unrated_completions():
    """`--sona-trajectories feedback`: a completion nobody rates costs no embedding pass and
    adds nothing; a correction still enters the bank, rated."""
    s = Server("--api-key", "lou", "--sona-trajectories", "feedback")
    try:
        first = ask(s.url, "lou")
        ask(s.url, "lou")
        time.sleep(1.0)
        m = httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer lou"}, timeout=30).text
        assert 'ruvllm_sona_trajectories{rated="false"} 0' in m and 'ruvllm_sona_trajectories{rated="true"} 0' in m, m
        assert feedback(s.url, "lou", {"id": first["id"], "correction": ANSWER}).status_code == 200
        m = httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer lou"}, timeout=30).text
        assert 'ruvllm_sona_trajectories{rated="true"} 1' in m and 'ruvllm_sona_trajectories{rated="false"} 0' in m, m
    finally:
        assert s.stop() == 0


def _metric(url, key, name):
    for line in httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            if " " in line and not line.startswith("#"):
                yield line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1])


def metric(url, key, name):
    return dict(_metric(url, key, name))


def test_a_rating_trains_on_activations_kept_while_generating():
    """A rated answer's lesson comes from the activations its generation kept, its rows picked
    by the log-probabilities the tokens were served with: no prompt or answer token runs
    through the model again, and the update is exactly the one a server that keeps nothing
    (`--sona-keep-mib 0`) computes with the engine and the base model's log-probabilities
    (the same here: neither caller has an adapter yet)."""
    runs = {}
    for name, extra in [("kept", ()), ("computed", ("--sona-keep-mib", "0"))]:
        s = Server("--api-key", "kim", "--api-key", "lea", "--sona-trajectories", "feedback", *extra)
        try:
            q_tokens = httpx.post(s.url + "/tokenize", headers={"Authorization": "Bearer kim"},
                                  json={"prompt": "The history of the harbor town of Pellow"}).json()["tokens"]
            out = []
            for key in ("kim", "lea"):
                r = httpx.post(s.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                               json={"model": MODEL, "prompt": "The history of the harbor town of Pellow", "max_tokens": 40,
                                     "temperature": 0, "ignore_eos": True})
                c = r.json()
                before = metric(s.url, key, "ruvllm:prompt_tokens_computed_total")
                r = feedback(s.url, key, {"id": c["id"], "rating": -1})
                assert r.status_code == 200, r.text
                after = metric(s.url, key, "ruvllm:prompt_tokens_computed_total")
                out.append((c["choices"][0]["text"], r.json(), before, after))
            # The rating changed the caller's own outputs: a rating of 8 rows of 40 teaches.
            again = httpx.post(s.url + "/v1/completions", headers={"Authorization": "Bearer kim"}, timeout=120,
                               json={"model": MODEL, "prompt": "The history of the harbor town of Pellow", "max_tokens": 40,
                                     "temperature": 0, "ignore_eos": True}).json()
            assert again["choices"][0]["text"] != out[0][0]
            lessons = metric(s.url, "kim", "ruvllm_sona_lessons_total")
            kept_bytes = metric(s.url, "kim", "ruvllm_sona_kept_bytes")["ruvllm_sona_kept_bytes"]
            runs[name] = (out, lessons, kept_bytes)
        finally:
            assert s.stop() == 0
    (kept, kept_lessons, kept_bytes), (computed, computed_lessons, none_kept) = runs["kept"], runs["computed"]
    # The first event also computes the anchor text's lesson once.
    assert kept_lessons == {'ruvllm_sona_lessons_total{source="kept"}': 2, 'ruvllm_sona_lessons_total{source="computed"}': 1}, kept_lessons
    assert computed_lessons == {'ruvllm_sona_lessons_total{source="kept"}': 0, 'ruvllm_sona_lessons_total{source="computed"}': 3}, computed_lessons
    assert kept_bytes > 0 and none_kept == 0
    # The second rating ran nothing of prompt or answer through the model with kept rows
    # (only its question's embedding pass for the bank: `--sona-trajectories feedback` adds
    # a rated trajectory at once, so that `--sona-apply near` knows the question); the engine
    # ran the answer again without them.
    delta = lambda o: sum(o[3].values()) - sum(o[2].values())
    question_tokens = len(q_tokens)
    assert delta(kept[1]) == question_tokens, (kept[1], question_tokens)
    assert delta(computed[1]) > question_tokens + 8, computed[1]
    # Identical lessons (8 of the 40 rows each): same answers, losses, steps.
    for (ta, fa, *_), (tb, fb, *_) in zip(kept, computed):
        assert ta == tb
        assert {k: fa[k] for k in ("updated", "steps", "loss_before", "loss_after", "version")} == \
               {k: fb[k] for k in ("updated", "steps", "loss_before", "loss_after", "version")}, (fa, fb)
