"""Measure llama.cpp (through llama-cpp-python) the way `ruvllm bench` measures ruvllm:
pp = one batch of P random prompt tokens from an empty cache, tg = N single-token decode steps
from an empty cache; one warm-up, then R repetitions; mean and standard deviation of tokens/s.

usage: llama_cpp_bench.py MODEL.gguf [-p 512] [-n 128] [-r 5] [-t 2]
Prints JSON records shaped like llama-bench's (`n_prompt`, `n_gen`, `avg_ts`, `stddev_ts`).
The Python loop adds per-token overhead to tg (about 12% on SmolLM2 per ../shared/peers/README.md),
so tg ratios against this script flatter ruvllm by that much; the note says so where used.
"""
import argparse, json, os, statistics, time
import numpy as np
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("-p", type=int, default=512)
ap.add_argument("-n", type=int, default=128)
ap.add_argument("-r", type=int, default=5)
ap.add_argument("-t", type=int, default=2)
a = ap.parse_args()

llm = Llama(model_path=a.model, n_ctx=max(a.p, a.n) + 16, n_threads=a.t, n_threads_batch=a.t,
            n_batch=max(a.p, 1), verbose=False)
vocab = llm.n_vocab()
toks = [int(x) for x in np.random.default_rng(0).integers(100, vocab, max(a.p, a.n))]
records = []
for np_, ng in [(a.p, 0), (0, a.n)]:
    if np_ + ng == 0:
        continue
    samples = []
    for rep in range(a.r + 1):
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm, "_ctx") and hasattr(llm._ctx, "kv_cache_clear") else None
        t = time.perf_counter()
        if np_:
            llm.eval(toks[:np_])
        else:
            for tk in toks[:ng]:
                llm.eval([tk])
        dt = time.perf_counter() - t
        if rep:
            samples.append((np_ + ng) / dt)
    records.append({"model_filename": os.path.basename(a.model), "n_threads": a.t, "n_prompt": np_, "n_gen": ng,
                    "avg_ts": statistics.mean(samples), "stddev_ts": statistics.stdev(samples) if len(samples) > 1 else 0.0,
                    "samples_ts": samples, "backend": "llama.cpp via llama-cpp-python"})
print(json.dumps(records))
