#!/usr/bin/env python3
"""Load generator for OpenAI-compatible servers (ruvllm serve, llama-server): N requests at a
given concurrency, each a prompt of random token ids and `max_tokens` generated with
`ignore_eos`, streamed. Prints one JSON object: requests/s, aggregate generated tokens/s,
TTFT p50/p99, inter-token latency p50/p99, errors.

usage: serve_bench.py URL [--model M] [--concurrency 16] [--requests 16] [--prompt-tokens 32]
                          [--max-tokens 64] [--api-key K]
Needs httpx (the server test venv has it).
"""
import argparse, asyncio, json, random, statistics, time

import httpx


def pct(v, q):
    if not v:
        return 0.0
    v = sorted(v)
    return v[min(len(v) - 1, int(round((len(v) - 1) * q)))]


async def one(client, args, i, out):
    rng = random.Random(i)
    prompt = [rng.randrange(100, 10000) for _ in range(args.prompt_tokens)]
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "cache_prompt": False}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            out["errors"] += 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", []):
                if c.get("text"):
                    stamps.append(time.perf_counter() - t0)
    out["ttft"].append(stamps[0] if stamps else time.perf_counter() - t0)
    out["itl"].extend(b - a for a, b in zip(stamps, stamps[1:]))
    out["chunks"] += len(stamps)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    out = {"ttft": [], "itl": [], "chunks": 0, "errors": 0}
    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=600, limits=limits) as client:
        async def guarded(i):
            async with sem:
                await one(client, args, i, out)
        t0 = time.perf_counter()
        await asyncio.gather(*(guarded(i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
    done = args.requests - out["errors"]
    print(json.dumps({
        "requests": args.requests, "concurrency": args.concurrency, "errors": out["errors"], "text_chunks": out["chunks"],
        "wall_s": round(wall, 3), "requests_per_s": round(done / wall, 3),
        "generated_tokens_per_s": round(done * args.max_tokens / wall, 1),
        "ttft_p50_ms": round(pct(out["ttft"], 0.5) * 1e3, 1), "ttft_p99_ms": round(pct(out["ttft"], 0.99) * 1e3, 1),
        "itl_p50_ms": round(pct(out["itl"], 0.5) * 1e3, 2), "itl_p99_ms": round(pct(out["itl"], 0.99) * 1e3, 2),
    }))


asyncio.run(main())
