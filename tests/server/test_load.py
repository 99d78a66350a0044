"""Load: 200 streamed requests at concurrency 32 with zero errors; then a burst of clients that
disconnect mid-stream. Afterwards every KV block is free or cached."""
import asyncio
import statistics
import time

import httpx
from conftest import KEY, MODEL, metrics


async def one_stream(client, i, ttfts, tokens):
    t0 = time.perf_counter()
    first = None
    n = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Tell me fact number {i} about the ocean."}],
        max_tokens=32, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            n = chunk.usage.completion_tokens
    ttfts.append(first if first is not None else time.perf_counter() - t0)
    tokens.append(n)


def wait_until_idle(http, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = metrics(http)
        if m["ruvllm:requests_running"] == 0 and m["ruvllm:requests_waiting"] == 0 and m["ruvllm:kv_blocks_used"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError(f"engine did not go idle: {metrics(http)}")


def test_200_streams_at_concurrency_32_then_disconnects(server, http):
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        sem = asyncio.Semaphore(32)
        ttfts, tokens, errors = [], [], []

        async def guarded(i):
            async with sem:
                try:
                    await one_stream(client, i, ttfts, tokens)
                except Exception as e:  # counted, then asserted zero
                    errors.append(repr(e))

        t0 = time.perf_counter()
        await asyncio.gather(*(guarded(i) for i in range(200)))
        wall = time.perf_counter() - t0
        await client.close()
        return ttfts, tokens, errors, wall

    ttfts, tokens, errors, wall = asyncio.run(main())
    assert errors == []
    assert len(tokens) == 200 and all(t > 0 for t in tokens)
    q = statistics.quantiles(ttfts, n=100)
    print(f"\nLOAD: 200 streamed requests, concurrency 32: {200 / wall:.2f} req/s, {sum(tokens) / wall:.1f} tokens/s, "
          f"TTFT p50 {q[49] * 1e3:.0f} ms p99 {q[98] * 1e3:.0f} ms, wall {wall:.1f} s")
    m = wait_until_idle(http)
    assert m["ruvllm:kv_blocks_used"] == 0
    assert m["ruvllm:kv_blocks_cached"] <= m["ruvllm:kv_blocks_total"]

    # A burst of clients that read a little and hang up.
    async def hang_up(i):
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            body = {"model": MODEL, "prompt": f"Write a long essay number {i}", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        if seen >= 3:
                            break  # leaving the block closes the connection mid-stream

    async def burst():
        await asyncio.gather(*(hang_up(i) for i in range(24)))

    asyncio.run(burst())
    m = wait_until_idle(http, timeout=30)
    assert m["ruvllm:kv_blocks_used"] == 0
    # Nothing ran to 1000 tokens: far fewer than 24 × 1000 were generated after the disconnects.
    assert m["ruvllm:generation_tokens_total"] < 200 * 32 + 24 * 200
