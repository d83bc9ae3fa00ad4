"""Load test of an OpenAI-compatible server (`tsq serve`, llama.cpp's, vLLM's): at each number
of concurrent clients, a fixed number of streamed chat requests; throughput, time to first
token and inter-token latency (p50/p99), failures, 429s, and the server's memory before and
after (with --pid). The same client for every server, so they compare.

    python scripts/bench_serve.py http://127.0.0.1:8000 MODEL [--clients 1,8,32] [--requests 64]
        [--max-tokens 64] [--pid PID] [--label tsq]

Prints a table per level and one JSON line with everything. The client is the official
`openai` package (scripts/test's virtualenv has it), without its retries.
"""

import argparse
import asyncio
import json
import statistics
import time

import openai

QUESTIONS = [
    "What is the capital of France?",
    "Explain in one paragraph why the sky is blue.",
    "Write a Python function that reverses a string.",
    "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
    "Name three prime numbers larger than 50.",
    "What does a compiler do?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How many legs do four spiders have?",
]


def rss_mib(pid):
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def one_request(client, model, question, max_tokens, out):
    started = time.perf_counter()
    first, last, gaps, tokens, chunks = None, None, [], 0, 0
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
            if any(c.delta.content for c in chunk.choices):
                chunks += 1
                now = time.perf_counter()
                if first is None:
                    first = now - started
                else:
                    gaps.append(now - last)
                last = now
    except openai.RateLimitError:
        out["rejected"] += 1
        return
    except openai.OpenAIError as e:
        out["failed"] += 1
        out["errors"].append(repr(e)[:200])
        return
    out["done"] += 1
    if chunks == 0:
        out["empty"] += 1
    # A server that reports no usage in streams (llama-cpp-python) sends a token a chunk.
    out["tokens"] += tokens or chunks
    if first is not None:
        out["ttft"].append(first)
    out["itl"].extend(gaps)


async def level(url, model, clients, requests, max_tokens):
    out = {"done": 0, "empty": 0, "failed": 0, "rejected": 0, "tokens": 0, "ttft": [], "itl": [], "errors": []}
    queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(QUESTIONS[i % len(QUESTIONS)])
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    async with client:

        async def worker():
            while not queue.empty():
                question = queue.get_nowait()
                await one_request(client, model, question, max_tokens, out)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": requests,
        "done": out["done"],
        "empty": out["empty"],
        "failed": out["failed"],
        "rejected_429": out["rejected"],
        "completion_tokens": out["tokens"],
        "seconds": wall,
        "tokens_per_s": out["tokens"] / wall,
        "ttft_samples": len(out["ttft"]),
        "ttft_p50_s": percentile(out["ttft"], 0.5),
        "ttft_p99_s": percentile(out["ttft"], 0.99),
        "itl_p50_s": percentile(out["itl"], 0.5),
        "itl_p99_s": percentile(out["itl"], 0.99),
        "errors": out["errors"][:3],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--pid", type=int)
    p.add_argument("--label", default="server")
    args = p.parse_args()
    levels = []
    memory = [rss_mib(args.pid)]
    print(f"{args.label}: {args.model} at {args.url}, {args.requests} requests a level, max_tokens {args.max_tokens}")
    print(f"  {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} {'failed':>6} {'empty':>5} {'429':>4} {'RSS MiB':>8}")
    for clients in [int(c) for c in args.clients.split(",")]:
        result = asyncio.run(level(args.url, args.model, clients, args.requests, args.max_tokens))
        memory.append(rss_mib(args.pid))
        result["rss_mib_after"] = memory[-1]
        levels.append(result)
        ms = lambda v: f"{1000 * v:7.0f}" if v is not None else "      -"
        rss = f"{memory[-1]:8.0f}" if memory[-1] is not None else "       -"
        print(
            f"  {clients:>7} {result['tokens_per_s']:8.1f} {ms(result['ttft_p50_s'])}ms {ms(result['ttft_p99_s'])} "
            f"{ms(result['itl_p50_s'])}ms {ms(result['itl_p99_s'])} {result['failed']:>6} {result['empty']:>5} {result['rejected_429']:>4} {rss}"
        )
    print(json.dumps({"label": args.label, "model": args.model, "rss_mib_before": memory[0], "levels": levels}))


if __name__ == "__main__":
    main()
