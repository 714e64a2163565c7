"""Load on `prealign serve`: concurrent clients on 127.0.0.1, one JSON object per level.

Starts the server on a trained run (default: the demo's, workdir/cpu_demo; `launch/
local_train.sh` makes it) in a subprocess, then for each --levels entry runs that many
concurrent clients (the official `openai` AsyncOpenAI client), each sending
--requests_per_client completions one after another (max_tokens --max_tokens, the
`grammar` policy, a document to continue, temperature 0.7), and prints

    {"clients", "requests", "requests_per_s", "tokens_per_s", "p50_ms", "p99_ms",
     "errors", "mean_batch_occupancy"}

tokens_per_s counts generated tokens (usage.completion_tokens) over the level's wall time;
p50/p99 are request latencies (the whole response); mean_batch_occupancy is rows active
per decode step during the level, from the server's /metrics. A level starts after a
warm-up request; the server runs with nothing else on the machine but this client.

    python bench/serve_load.py [--workdir workdir/cpu_demo] [--levels 1,4,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The morning the river flooded,", "My neighbour asked me to",
           "Dear diary, today at work", "The town council met to decide"]


def start_server(workdir: str, max_batch: int, steps_per_call: int):
    proc = subprocess.Popen(
        [sys.executable, "-m", "prealign_jax.main", "serve", f"--workdir={workdir}",
         "--port=0", f"--max_batch={max_batch}", f"--steps_per_call={steps_per_call}",
         "--policies", "grammar"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    url, ready = [], threading.Event()

    def read():
        for line in proc.stdout:
            print(line, end="", file=sys.stderr)
            if " on http://" in line and not url:
                url.append(line.split(" on ")[1].split()[0])
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(600)
    if not url:
        proc.kill()
        sys.exit("bench: the server did not start (its output is above)")
    return proc, url[0]


def occupancy_counters(base: str) -> tuple[float, float]:
    with urllib.request.urlopen(base + "/metrics") as r:
        text = r.read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    return values["prealign_decode_row_steps_total"], values["prealign_decode_steps_total"]


async def level(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    latencies, tokens, errors = [], [], []

    async def one_client(c: int):
        for i in range(per_client):
            start = time.perf_counter()
            try:
                r = await client.completions.create(
                    model=None, prompt=PROMPTS[(c + i) % len(PROMPTS)], max_tokens=max_tokens,
                    temperature=0.7, seed=c * 1000 + i, extra_body={"policy": "grammar"})
            except openai.OpenAIError as e:
                errors.append(repr(e))
                continue
            latencies.append(time.perf_counter() - start)
            tokens.append(r.usage.completion_tokens)

    base = url.removesuffix("/v1")
    rows_before, steps_before = occupancy_counters(base)
    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    rows_after, steps_after = occupancy_counters(base)
    await client.close()
    ms = sorted(x * 1000 for x in latencies)
    return {"clients": clients, "requests": len(latencies) + len(errors),
            "requests_per_s": round(len(latencies) / wall, 2),
            "tokens_per_s": round(sum(tokens) / wall, 1),
            "p50_ms": round(statistics.median(ms), 1) if ms else None,
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1) if ms else None,
            "errors": len(errors),
            "mean_batch_occupancy": round((rows_after - rows_before)
                                          / max(steps_after - steps_before, 1), 2),
            **({"first_error": errors[0]} if errors else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "workdir", "cpu_demo"))
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--requests_per_client", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--max_batch", type=int, default=16)
    parser.add_argument("--steps_per_call", type=int, default=8)
    args = parser.parse_args()
    proc, url = start_server(args.workdir, args.max_batch, args.steps_per_call)
    try:
        asyncio.run(level(url, 1, 1, args.max_tokens))  # warm-up
        for clients in (int(x) for x in args.levels.split(",")):
            result = asyncio.run(level(url, clients, args.requests_per_client,
                                       args.max_tokens))
            print(json.dumps(result), flush=True)
    finally:
        proc.terminate()
        proc.wait(120)


if __name__ == "__main__":
    main()
