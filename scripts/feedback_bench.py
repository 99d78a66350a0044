#!/usr/bin/env python3
"""Feedback latency of rated (or, with `--correction`, corrected) answers: for each question, a greedy completion of up to
`--max-tokens` tokens, then `POST /v1/feedback {rating}`; reports the feedback requests' wall
time (instant loop: lesson capture, training rounds, publish, then the bank's bookkeeping)
p50/p90/max over `--questions`, and the server's `published_ms` (request arrival to the new
adapter's publication: issue 6's latency) p50/p90, and where that time went (the response's
`phases`: capture, candidates, steps, checks, ... p50 each).
Run it against a server started with and without `--sona-keep-mib 0` to see what keeping the
generation's activations saves.

    python3 scripts/feedback_bench.py --url http://127.0.0.1:8080 --questions 24
"""
import argparse
import statistics
import sys
import time

import httpx

QUESTIONS = [
    "Describe the city of {}.", "What is the history of {}?", "Write a short poem about {}.",
    "Explain how {} works.", "List three facts about {}.", "Why do people like {}?",
]
THINGS = ["Paris", "the ocean", "bicycles", "volcanoes", "chess", "the moon", "coffee", "rain"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", default="bench")
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rating", type=float, default=-1.0)
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between one feedback answer and the next question (lets work that follows an answer finish)")
    ap.add_argument("--correction", default=None, help="send this text (plus the question's number) as a correction instead of a rating")
    ap.add_argument("--corrections", default=None, help="a file of corrections, one per line: question i gets line i (cycling), as it is — distinct answers to distinct questions, where --correction gives every question nearly the same one")
    ap.add_argument("--verify-delay", type=float, default=0.0, help="with --verify: seconds to wait before asking again (lets a background run the event started finish)")
    ap.add_argument("--show", action="store_true", help="with --verify: print each re-asked answer (stderr)")
    ap.add_argument("--verify", action="store_true", help="with --correction: after each event ask the question again (greedy) and report how much of the correction the answer reproduces")
    a = ap.parse_args()
    lines = None
    if a.corrections is not None:
        with open(a.corrections, encoding="utf-8") as f:
            lines = [l.strip() for l in f if l.strip()]
        a.correction = a.correction or ""

    def correction(i):
        return lines[i % len(lines)] if lines else f"{a.correction} ({i})"
    h = {"Authorization": f"Bearer {a.key}"}
    times, lens, published, phases, exact, prefix, follows = [], [], [], [], [], [], []
    with httpx.Client(timeout=300) as c:
        for i in range(a.questions):
            q = QUESTIONS[i % len(QUESTIONS)].format(THINGS[(i // len(QUESTIONS) + i) % len(THINGS)])
            r = c.post(a.url + "/v1/chat/completions", headers=h, json={
                "model": "smollm2-135m", "messages": [{"role": "user", "content": q}],
                "max_tokens": a.max_tokens, "temperature": 0}).json()
            lens.append(r["usage"]["completion_tokens"])
            t = time.perf_counter()
            fb = {"id": r["id"], "rating": a.rating} if a.correction is None else {"id": r["id"], "correction": correction(i)}
            f = c.post(a.url + "/v1/feedback", headers=h, json=fb)
            times.append((time.perf_counter() - t) * 1e3)
            assert f.status_code == 200, f.text
            if "published_ms" in f.json():  # (servers before it was reported lack it)
                published.append(f.json()["published_ms"])
            if "phases" in f.json():
                phases.append(f.json()["phases"])
            if "follows" in f.json():
                follows.append(f.json()["follows"])
            if a.verify and a.correction is not None:
                time.sleep(a.verify_delay)
                want = correction(i).split()
                again = c.post(a.url + "/v1/chat/completions", headers=h, json={
                    "model": "smollm2-135m", "messages": [{"role": "user", "content": q}],
                    "max_tokens": 2 * len(want) + 16, "temperature": 0}).json()
                got = again["choices"][0]["message"]["content"].split()
                if a.show:
                    print(f"[{i}] {' '.join(got)}", file=sys.stderr)
                same = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
                exact.append(same == len(want))
                prefix.append(same / len(want))
            time.sleep(a.pause)
    s, pub = sorted(times), sorted(published)
    line = (f"answers {statistics.mean(lens):.1f} tokens (mean); feedback ms p50 {statistics.median(s):.1f} "
            f"p90 {s[int(0.9 * (len(s) - 1))]:.1f} max {s[-1]:.1f} (first event, with the anchor lesson: {times[0]:.1f})")
    if pub:
        line += f"; published (server) p50 {statistics.median(pub):.1f} p90 {pub[int(0.9 * (len(pub) - 1))]:.1f}"
    if follows:
        line += f"; server says it took (follows): {sum(follows)}/{len(follows)}"
    if exact:
        line += (f"; re-asked: whole correction {sum(exact)}/{len(exact)}, "
                 f"leading words reproduced {100 * statistics.mean(prefix):.0f}% (mean)")
    if phases:
        # Each phase's median over the events (the first one's anchor lesson included).
        line += "; phases p50: " + " ".join(
            f"{k.removesuffix('_ms')} {statistics.median(p[k] for p in phases):.1f}" for k in phases[0])
    print(line)


if __name__ == "__main__":
    main()
