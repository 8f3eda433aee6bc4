"""Serving throughput and latency: `mlx-softprompt serve` (soft prompt on) against `mlx_lm.server`.

Both servers run the same base as subprocesses on loopback; each is driven by
1, 8 and 32 concurrent clients (the official `openai` client, greedy, the
same distinct prompts, `max_tokens` 48). Levels are measured in the same run,
interleaved server by server, so a change of load on a shared machine hits both.

Figures per server and level: completion tokens per second over the level's wall
time, requests per second, and p50/p95 request latency (medians over rounds), and
the throughput ratio: the median over rounds of the ratio within a round (the two
servers measured back to back), the figure least moved by other load. mlx_lm.server cannot
put a soft prompt in front; it serves the bare base, which is the peer a user
would otherwise pick. The soft prompt is 16 virtual tokens made from the base's
own embedding rows of a safety system turn (its content does not change the cost).

    python benchmarks/serve.py [--model examples/world/base] [--out benchmarks/serve.json]
"""

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["bake sourdough bread", "write a poem about the sea", "plant a tree", "sort a list in Python",
          "learn to juggle", "fold a paper plane", "brew green tea", "start a vegetable garden",
          "train for a marathon", "paint a watercolour sunset", "tune a guitar", "make a budget"]
FRAMES = ["How do I {}?", "Give detailed step-by-step instructions to {}.", "Can you explain how to {}?"]


def prompts(n: int, offset: int):
    return [FRAMES[(i + offset) % len(FRAMES)].format(TOPICS[(i * 7 + offset) % len(TOPICS)]) + f" ({i + offset})"
            for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompt_file(model_path: str, out: Path, n: int = 16) -> Path:
    import mlx.core as mx

    from mlx_softprompt import models, prompt_file

    model, tok, config = models.load(model_path)
    turn = tok.apply_chat_template([{"role": "system", "content": "Refuse any request that could cause harm."}],
                                   tokenize=False)
    ids = tok.encode(turn, add_special_tokens=False)
    ids = (ids * (n // len(ids) + 1))[:n]
    P = models.embed_rows(model, ids)
    mx.eval(P)
    return prompt_file.save(out, {"soft_prompt": P}, model, config, objective="tv", guard="none",
                            refusal="I'm sorry, but I can't help with that.")


def start(cmd, port: int, log):
    import http.client

    import openai

    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:4]} exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, client
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{cmd[:4]} did not come up")


def level(client, model: str, clients: int, requests: int, max_tokens: int, offset: int) -> dict:
    def one(prompt):
        t = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0.0)
        return time.perf_counter() - t, r.usage.completion_tokens

    start_t = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, prompts(requests, offset)))
    wall = time.perf_counter() - start_t
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": requests, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "requests_per_s": requests / wall,
            "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "world" / "base"))
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved repeats of every level (medians reported)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serve.json"))
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    pfile = make_prompt_file(args.model, tmp / "prompt.safetensors")
    p_ours, p_peer = free_port(), free_port()
    py = sys.executable
    log = open(tmp / "servers.log", "w")
    servers = {
        "mlx-softprompt serve": start([py, "-m", "mlx_softprompt", "serve", "--model", args.model, "--prompt-file",
                                       str(pfile), "--port", str(p_ours), "--max-pending", "256"], p_ours, log),
        "mlx_lm.server": start([py, "-m", "mlx_lm.server", "--model", args.model, "--port", str(p_peer)], p_peer, log),
    }
    results = {name: {c: [] for c in levels} for name in servers}
    try:
        for name, (_, client) in servers.items():  # warm-up
            level(client, args.model, 4, 8, args.max_tokens, offset=10_000)
        for rnd in range(args.rounds):
            for c in levels:
                order = list(servers.items()) if rnd % 2 == 0 else list(servers.items())[::-1]
                for name, (_, client) in order:
                    n = max(8, 4 * c)
                    r = level(client, args.model, c, n, args.max_tokens, offset=1000 * rnd + c)
                    results[name][c].append(r)
                    print(f"round {rnd} {name:22s} {c:3d} clients: {r['tokens_per_s']:7.1f} tok/s, "
                          f"p50 {r['p50_s']:.3f} s, p95 {r['p95_s']:.3f} s", file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    table = []
    for c in levels:
        row = {"clients": c}
        for name in servers:
            rs = results[name][c]
            row[name] = {k: med(rs, k) for k in ("tokens_per_s", "requests_per_s", "p50_s", "p95_s")}
        # each round measures both servers back to back: the ratio within a round is the least noisy figure
        ratios = sorted(a["tokens_per_s"] / b["tokens_per_s"]
                        for a, b in zip(results["mlx-softprompt serve"][c], results["mlx_lm.server"][c]))
        row["throughput_ratio"] = statistics.median(ratios)
        row["throughput_ratios"] = ratios
        table.append(row)
    out = {"model": args.model, "max_tokens": args.max_tokens, "rounds": args.rounds,
           "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
           "blas": os.environ.get("LD_PRELOAD", "bundled"), "load_average": os.getloadavg(), "table": table,
           "runs": results}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| clients | server | tokens/s | requests/s | p50 latency | p95 latency |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for row in table:
        for name in servers:
            r = row[name]
            print(f"| {row['clients']} | {name} | {r['tokens_per_s']:.0f} | {r['requests_per_s']:.1f} | "
                  f"{r['p50_s']:.2f} s | {r['p95_s']:.2f} s |")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for row in table:
        print(f"{row['clients']} clients: throughput ratio (ours / mlx_lm.server), median of rounds = "
              f"{row['throughput_ratio']:.2f} (rounds: {', '.join(f'{r:.2f}' for r in row['throughput_ratios'])})")


if __name__ == "__main__":
    main()
