"""Time-to-first-token of a repeated 4k-token prompt with real vLLM (CPU) and the kvbm connector.

Measures, each engine in its own fresh process:
  * TTFT cold (nothing cached), from kvbm's host tier (after ``reset_prefix_cache()``), and from
    kvbm's disk tier in a new engine over the same disk directory (host tier empty);
  * decode step time with 0% hits, with the connector vs plain vLLM.
Greedy outputs of every hit run are compared with the cold run token for token.

Usage:  python benchmarks/bench_vllm_ttft.py [--layers 8 --hidden 1024 --prompt 4096 --out FILE]
Writes Markdown (default benchmarks/results/vllm_ttft.md) with the command, git commit, machine, date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.vllm_helpers import build_tiny_llama, kvbm_transfer_config


def _engine_main(spec_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    kw: dict[str, Any] = {
        "model": spec["model"], "skip_tokenizer_init": True, "enforce_eager": True, "seed": 0,
        "kv_cache_memory_bytes": spec["kv_cache_memory_bytes"], "max_model_len": spec["max_model_len"],
        "max_num_batched_tokens": spec["max_model_len"], "disable_log_stats": False,
    }
    if spec.get("kv_transfer_config"):
        kw["kv_transfer_config"] = spec["kv_transfer_config"]
    llm = LLM(**kw)
    out: list[dict[str, Any]] = []
    for ph in spec["phases"]:
        llm.reset_prefix_cache()
        sp = SamplingParams(temperature=0.0, max_tokens=ph["max_tokens"], ignore_eos=True)
        t = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=ph["prompt"])], sp, use_tqdm=False)
        dt = time.perf_counter() - t
        ext = sum(int(getattr(m, "value", 0)) for m in llm.get_metrics()
                  if m.name == "vllm:external_prefix_cache_hits")
        out.append({"name": ph["name"], "seconds": dt, "tokens": list(res[0].outputs[0].token_ids),
                    "num_cached_tokens": res[0].num_cached_tokens, "external_hits_total": ext})
    Path(spec["out"]).write_text(json.dumps(out))


def _run(spec: dict[str, Any], workdir: Path, name: str, multiprocess: bool) -> list[dict[str, Any]]:
    spec = dict(spec, out=str(workdir / f"{name}.json"))
    sp = workdir / f"{name}.spec.json"
    sp.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING",
               VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, __file__, "--engine", str(sp)], env=env, capture_output=True, text=True,
                       check=False)
    if p.returncode != 0:
        raise RuntimeError(f"engine {name} failed:\n{p.stderr[-6000:]}")
    return json.loads(Path(spec["out"]).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--decode-prompt", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--multiprocess", action="store_true", help="default vLLM multi-process mode")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/vllm_ttft.md"))
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.engine:
        _engine_main(a.engine)
        return

    work = Path(tempfile.mkdtemp(prefix="kvbm_bench_vllm_"))
    heads = a.hidden // 64
    model = build_tiny_llama(work / "model", layers=a.layers, hidden=a.hidden, heads=heads, kv_heads=heads // 2,
                             head_dim=64, intermediate=a.hidden * 11 // 4, vocab=4096, max_pos=2 * a.prompt + 256,
                             std=0.02)
    rng = random.Random(0)
    prompt = [rng.randrange(1, 4000) for _ in range(a.prompt)]
    warm = [rng.randrange(1, 4000) for _ in range(256)]
    base = {"model": model, "kv_cache_memory_bytes": 1 << 30, "max_model_len": a.prompt + 256}
    kvcfg = kvbm_transfer_config(host_bytes="2GiB", disk_path=str(work / "disk"), disk_bytes="8GiB")
    mp = a.multiprocess
    t0 = time.time()
    # Engine 1: warm-up, cold, host hit (twice).
    e1 = _run(dict(base, kv_transfer_config=kvcfg, phases=[
        {"name": "warmup", "prompt": warm, "max_tokens": 1},
        {"name": "cold", "prompt": prompt, "max_tokens": 1},
        {"name": "host", "prompt": prompt, "max_tokens": 1},
        {"name": "host", "prompt": prompt, "max_tokens": 1},
        {"name": "cold_out", "prompt": prompt, "max_tokens": 16}]), work, "e1", mp)
    # Engine 2: new process over the same disk directory: the host tier is empty.
    e2 = _run(dict(base, kv_transfer_config=kvcfg, phases=[
        {"name": "warmup", "prompt": warm, "max_tokens": 1},
        {"name": "disk", "prompt": prompt, "max_tokens": 1},
        {"name": "disk_out", "prompt": prompt, "max_tokens": 16}]), work, "e2", mp)
    # Engines 3/4: decode with 0% hits, with and without the connector (fresh prompts each time).
    dec_phases = [{"name": "warmup", "prompt": warm, "max_tokens": 1}]
    for r in range(a.reps):
        p = [rng.randrange(1, 4000) for _ in range(a.decode_prompt)]
        q = [rng.randrange(1, 4000) for _ in range(a.decode_prompt)]
        dec_phases += [{"name": f"d1_{r}", "prompt": p, "max_tokens": 1},
                       {"name": f"dN_{r}", "prompt": q, "max_tokens": a.decode_tokens + 1}]
    e3 = _run(dict(base, kv_transfer_config=None, phases=dec_phases), work, "e3", mp)
    e4 = _run(dict(base, kv_transfer_config=kvbm_transfer_config(host_bytes="2GiB"), phases=dec_phases), work, "e4", mp)

    def ph(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
        return [x for x in runs if x["name"] == name]

    cold = ph(e1, "cold")[0]["seconds"]
    host = min(x["seconds"] for x in ph(e1, "host"))
    disk = ph(e2, "disk")[0]["seconds"]
    host_hits = ph(e1, "host")[0]["num_cached_tokens"]
    disk_hits = ph(e2, "disk")[0]["num_cached_tokens"]
    same = ph(e1, "cold_out")[0]["tokens"] == ph(e2, "disk_out")[0]["tokens"]

    def step(runs: list[dict[str, Any]]) -> float:
        vals = [(ph(runs, f"dN_{r}")[0]["seconds"] - ph(runs, f"d1_{r}")[0]["seconds"]) / a.decode_tokens
                for r in range(a.reps)]
        return statistics.median(vals)

    s_plain, s_kvbm = step(e3), step(e4)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    import vllm

    lines = [
        "# vLLM TTFT with the kvbm connector (CPU)", "",
        f"- command: `python benchmarks/bench_vllm_ttft.py {' '.join(sys.argv[1:])}`",
        f"- git commit: {commit}; vllm {vllm.__version__}; date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        (f"- machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs "
         f"({'multi-process' if mp else 'in-process'} engine); wall time {time.time() - t0:.0f} s"),
        (f"- model: random Llama, {a.layers} layers, hidden {a.hidden}, {heads} heads / {heads // 2} KV heads, "
         f"head_dim 64, bf16; block size 128 (vLLM CPU default); prompt {a.prompt} tokens"),
        "",
        "| measurement | seconds | vs cold | external hit tokens |",
        "|---|---|---|---|",
        f"| TTFT cold | {cold:.3f} | 1.0x | 0 |",
        f"| TTFT from kvbm host tier | {host:.3f} | {cold / host:.1f}x faster | {host_hits} |",
        f"| TTFT from kvbm disk tier, new engine process | {disk:.3f} | {cold / disk:.1f}x faster | {disk_hits} |",
        "",
        f"Greedy 16-token output after a disk hit identical to the cold run: **{same}**.",
        "",
        f"Decode step, 0% hits ({a.decode_prompt}-token prompts, {a.decode_tokens} tokens, median of {a.reps}):",
        "",
        "| engine | ms/step |", "|---|---|",
        f"| vLLM, no connector | {s_plain * 1e3:.2f} |",
        f"| vLLM + kvbm connector | {s_kvbm * 1e3:.2f} |",
        "",
        f"Overhead at 0% hits: {100 * (s_kvbm / s_plain - 1):+.1f}% (targets: host >= 5x, disk >= 3x, overhead <= 2%).",
        "",
        "Raw phases (seconds): " + json.dumps({"e1": [(x['name'], round(x['seconds'], 4)) for x in e1],
                                               "e2": [(x['name'], round(x['seconds'], 4)) for x in e2],
                                               "e3": [(x['name'], round(x['seconds'], 4)) for x in e3],
                                               "e4": [(x['name'], round(x['seconds'], 4)) for x in e4]}),
    ]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
