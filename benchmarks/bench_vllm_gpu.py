"""kvbm against vLLM's own offloading inside real vLLM on one GPU: TTFT of repeated long prompts
(cold, host hit, disk hit after a restart with the page cache dropped), decode inter-token latency
at 0% hits, and a multi-turn chat workload with a small GPU KV cache.

Contenders (one engine process each, same model, same GPU, same CPU bytes):
  none         vLLM without a connector
  native       vLLM's OffloadingConnector, its CPU tier (CPUOffloadingSpec)
  native_fs    vLLM's OffloadingConnector, CPU tier + its built-in ``fs`` secondary tier
  kvbm         kvbm's connector, host tier
  kvbm_disk    kvbm's connector, host tier + write-through disk tier
  native_kvbm  vLLM's OffloadingConnector, CPU tier + kvbm's disk tier as its secondary tier

Engines of a wave start side by side (start-up overlaps) and are measured one at a time: an
engine, once ready, waits for its turn, runs its phases alone on the GPU and exits. Wave 1: the
TTFT + decode engines; wave 2: the disk contenders restarted over their directories (the files
evicted from the page cache before each request, so the bytes come from the device) and the
multi-turn engines (GPU KV cache too small for the sessions' histories).

Time to first token is measured per request inside a step loop over ``LLM.llm_engine``
(``add_request`` then ``step`` until the request's first output token), in-process engine core.

Usage (GPU machine, vLLM 0.26 on PYTHONPATH; see scripts/gpu_all.sh vllm-bench):
  python benchmarks/bench_vllm_gpu.py --out DIR [--contenders none,native,kvbm ...]
Writes DIR/vllm_gpu_bench.json and DIR/vllm_gpu_bench.md (command, commit, machine, vLLM version).
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
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

CONTENDERS = ("none", "native", "native_fs", "kvbm", "kvbm_disk", "native_kvbm")
DISK_CONTENDERS = ("native_fs", "kvbm_disk", "native_kvbm")
GIB = 1 << 30


def transfer_config(kind: str, cpu_bytes: int, disk_dir: str) -> dict[str, Any] | None:
    """The ``kv_transfer_config`` of a contender: every one gets ``cpu_bytes`` of host memory."""
    from vllm_helpers import kvbm_transfer_config

    native = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}
    if kind == "none":
        return None
    if kind == "native":
        return {**native, "kv_connector_extra_config": {"cpu_bytes_to_use": cpu_bytes}}
    if kind == "native_fs":
        return {**native, "kv_connector_extra_config": {
            "spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": cpu_bytes,
            "secondary_tiers": [{"type": "fs", "root_dir": disk_dir}]}}
    if kind == "native_kvbm":
        return {**native, "kv_connector_extra_config": {
            "spec_name": "KvbmTieringOffloadingSpec", "spec_module_path": "kvbm.integrations.vllm.secondary_tier",
            "cpu_bytes_to_use": cpu_bytes,
            "secondary_tiers": [{"type": "kvbm", "disk_path": disk_dir, "disk_capacity_bytes": "48GiB"}]}}
    if kind == "kvbm":
        return kvbm_transfer_config(host_capacity_bytes=cpu_bytes)
    if kind == "kvbm_disk":
        return kvbm_transfer_config(host_capacity_bytes=cpu_bytes, disk_path=disk_dir, disk_capacity_bytes="48GiB")
    raise ValueError(f"unknown contender {kind!r}; known: {', '.join(CONTENDERS)}")


def drop_page_cache(directory: str) -> int:
    """Evict every file under ``directory`` from the OS page cache (fsync, then FADV_DONTNEED)."""
    n = 0
    for root, _, files in os.walk(directory):
        for f in files:
            try:
                fd = os.open(os.path.join(root, f), os.O_RDONLY)
            except OSError:
                continue  # a temp file renamed away meanwhile
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


# --- the engine process --------------------------------------------------------------------------

def _run_batch(llm: Any, prompts: list[list[int]], max_tokens: int, tag: str) -> list[dict[str, Any]]:
    """Add ``prompts`` at once and step the engine until all finish; per request: time to first
    token, the times of its later tokens, output ids, cached tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        eng.add_request(rid, TokensPrompt(prompt_token_ids=p), sp)
    recs: dict[str, dict[str, Any]] = {rid: {"times": [], "tokens": [], "cached": None} for rid in ids}
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            r = recs.get(o.request_id)
            if r is None or not o.outputs:
                continue
            toks = list(o.outputs[0].token_ids)
            if len(toks) > len(r["tokens"]):
                r["times"] += [now - t0] * (len(toks) - len(r["tokens"]))
                r["tokens"] = toks
            if o.num_cached_tokens is not None:
                r["cached"] = o.num_cached_tokens
    res = []
    for rid in ids:
        r = recs[rid]
        ts = r["times"]
        res.append({"ttft_s": ts[0] if ts else None, "end_s": ts[-1] if ts else None, "n": len(r["tokens"]),
                    "itl_s": (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else None,
                    "tokens": r["tokens"], "cached": r["cached"]})
    return res


def _engine_main(spec_path: str) -> None:
    from vllm import LLM
    from vllm_helpers import _external_hits  # vLLM's external prefix-cache hit counter

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    kw: dict[str, Any] = {
        "model": spec["model"], "skip_tokenizer_init": True, "enforce_eager": True, "seed": 0,
        "kv_cache_memory_bytes": spec["gpu_kv_bytes"], "max_model_len": spec["max_model_len"],
        "max_num_batched_tokens": spec["max_num_batched_tokens"], "max_num_seqs": spec["max_num_seqs"],
        "gpu_memory_utilization": spec["gpu_memory_utilization"], "disable_log_stats": False,
    }
    kw.update(spec.get("llm_kwargs", {}))
    if spec.get("kv_transfer_config"):
        kw["kv_transfer_config"] = spec["kv_transfer_config"]
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    Path(spec["ready"]).write_text(str(startup))
    while not os.path.exists(spec["go"]):  # the parent measures one engine at a time
        time.sleep(0.05)
    out: dict[str, Any] = {"startup_s": startup, "phases": []}
    for ph in spec["phases"]:
        if ph.get("reset", True):
            llm.reset_prefix_cache()
        if ph.get("drop_page_cache"):
            drop_page_cache(ph["drop_page_cache"])
        ext0 = _external_hits(llm)
        t = time.perf_counter()
        reqs = _run_batch(llm, ph["prompts"], ph["max_tokens"], ph["name"])
        for r in reqs:
            r["tokens"] = r["tokens"][:4]
        out["phases"].append({"name": ph["name"], "wall_s": time.perf_counter() - t, "requests": reqs,
                              "external_hits": _external_hits(llm) - ext0})
    if spec.get("multiturn"):
        out["multiturn"] = _multiturn(llm, spec["multiturn"])
    import vllm

    out["vllm_version"] = vllm.__version__
    Path(spec["out"]).write_text(json.dumps(out))


def _multiturn(llm: Any, mt: dict[str, Any]) -> dict[str, Any]:
    """``sessions`` chats sharing a system prompt; every turn all sessions send their whole history
    plus a new user message at once; the reply is appended to the history."""
    rng = random.Random(mt["seed"])
    system = [rng.randrange(3, mt["vocab"]) for _ in range(mt["system_tokens"])]
    hist = [list(system) for _ in range(mt["sessions"])]
    ttft, turns = [], []
    cached = prompt_tokens = out_tokens = 0
    t0 = time.perf_counter()
    for t in range(mt["turns"]):
        for h in hist:
            h += [rng.randrange(3, mt["vocab"]) for _ in range(mt["user_tokens"])]
        ts = time.perf_counter()
        reqs = _run_batch(llm, hist, mt["output_tokens"], f"mt{t}")
        wall = time.perf_counter() - ts
        for h, r in zip(hist, reqs, strict=True):
            prompt_tokens += len(h)
            cached += r["cached"] or 0
            out_tokens += r["n"]
            ttft.append(r["ttft_s"])
        turns.append({"turn": t, "wall_s": wall, "cached": sum(r["cached"] or 0 for r in reqs),
                      "prompt_tokens": sum(len(h) for h in hist)})
        for h, r in zip(hist, reqs, strict=True):
            h += r["tokens"]  # the reply joins the history
    wall = time.perf_counter() - t0
    ttft.sort()
    return {"wall_s": wall, "output_tokens": out_tokens, "output_tok_s": out_tokens / wall,
            "ttft_p50_s": ttft[len(ttft) // 2], "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "cached_tokens": cached, "prompt_tokens": prompt_tokens, "turns": turns}


# --- the parent ----------------------------------------------------------------------------------

def _wave(jobs: dict[str, dict[str, Any]], work: Path, timeout: float) -> dict[str, dict[str, Any]]:
    """Start every engine of ``jobs`` at once, then let each run alone, in order."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_LOGGING_LEVEL="WARNING", VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONHASHSEED="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs: dict[str, tuple[subprocess.Popen, dict[str, Any], Any]] = {}
    for name, spec in jobs.items():
        spec = dict(spec, ready=str(work / f"{name}.ready"), go=str(work / f"{name}.go"),
                    out=str(work / f"{name}.json"))
        sp = work / f"{name}.spec.json"
        sp.write_text(json.dumps(spec))
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed below
        procs[name] = (subprocess.Popen([sys.executable, __file__, "--engine", str(sp)], env=env, stdout=log,
                                        stderr=subprocess.STDOUT), spec, log)
    deadline = time.time() + timeout
    res: dict[str, dict[str, Any]] = {}
    for name, (p, spec, log) in procs.items():
        while not os.path.exists(spec["ready"]) and p.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if os.path.exists(spec["ready"]):
            Path(spec["go"]).touch()
            t = time.perf_counter()
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            print(f"  {name}: measured in {time.perf_counter() - t:.1f} s (rc {p.returncode})", flush=True)
        else:
            p.kill()
            p.wait()
        log.close()
        if p.returncode == 0 and os.path.exists(spec["out"]):
            res[name] = json.loads(Path(spec["out"]).read_text())
        else:
            tail = (work / f"{name}.log").read_text(errors="replace")[-4000:]
            res[name] = {"error": f"engine {name} failed (rc={p.returncode}):\n{tail}"}
            print(res[name]["error"][-1500:], flush=True)
    return res


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory for vllm_gpu_bench.{md,json} (required)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--lens", default="8192,32768", help="prompt lengths of the TTFT rows")
    ap.add_argument("--host-reps", type=int, default=3)
    ap.add_argument("--cpu-gib", type=float, default=8.0, help="host bytes of every offloading contender")
    ap.add_argument("--gpu-kv-gib", type=float, default=4.5, help="GPU KV cache of the TTFT engines")
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--decode-prompt", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--user-tokens", type=int, default=256)
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--mt-gpu-kv-gib", type=float, default=1.5, help="GPU KV cache of the multi-turn engines")
    ap.add_argument("--mt-cpu-gib", type=float, default=6.0, help="host bytes of the multi-turn engines")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-mem-util", type=float, default=0.05,
                    help="only vLLM's start-up check of free memory (the KV cache size is given)")
    ap.add_argument("--device", default="cuda", help="where the random weights are drawn")
    ap.add_argument("--wave-timeout", type=float, default=400)
    ap.add_argument("--work", default=None, help="work directory (model, disk tiers); default: a temp dir")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.engine:
        _engine_main(a.engine)
        return
    if not a.out:
        ap.error("--out DIR is required")
    import tempfile

    import torch
    from vllm_helpers import build_tiny_llama

    from kvbm.bench.provenance import git_commit

    names = [c.strip() for c in a.contenders.split(",") if c.strip()]
    for c in names:
        transfer_config(c, 1, "/nonexistent")  # unknown names fail before any engine starts
    work = Path(a.work or tempfile.mkdtemp(prefix="kvbm_vllm_gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    heads = a.hidden // a.head_dim
    lens = [int(x) for x in a.lens.split(",")]
    with torch.device(a.device):
        model = build_tiny_llama(work / "model", layers=a.layers, hidden=a.hidden, heads=heads, kv_heads=a.kv_heads,
                                 head_dim=a.head_dim, intermediate=a.intermediate, vocab=a.vocab,
                                 max_pos=max(lens) + 1024, std=0.02)
    t_model = time.perf_counter() - t_all
    kv_per_token = a.layers * 2 * a.kv_heads * a.head_dim * 2
    prompts = {n: _tokens(n, seed=100 + i, vocab=a.vocab) for i, n in enumerate(lens)}
    common = {"model": model, "max_model_len": max(lens) + 256, "max_num_batched_tokens": a.max_num_batched_tokens,
              "gpu_memory_utilization": a.gpu_mem_util,
              # FlashInfer's autotune (~90 s per start) is of no use to FlashAttention engines
              "llm_kwargs": {"kernel_config": {"enable_flashinfer_autotune": False}} if a.device == "cuda" else {}}
    cpu_bytes, mt_cpu = int(a.cpu_gib * GIB), int(a.mt_cpu_gib * GIB)
    # Wave 1: per contender, TTFT cold and from its host tier per length, then decode at 0% hits.
    ph1: list[dict[str, Any]] = [{"name": "warmup", "prompts": [_tokens(512, 7, a.vocab)], "max_tokens": 2}]
    for n, p in prompts.items():
        ph1.append({"name": f"cold_{n}", "prompts": [p], "max_tokens": 1})
        ph1 += [{"name": f"host_{n}", "prompts": [p], "max_tokens": 1} for _ in range(a.host_reps)]
    dec = [_tokens(a.decode_prompt, seed=1000 + i, vocab=a.vocab) for i in range(a.decode_batch)]
    ph1.append({"name": "decode", "prompts": dec, "max_tokens": a.decode_tokens + 1})
    jobs1 = {c: dict(common, gpu_kv_bytes=int(a.gpu_kv_gib * GIB), max_num_seqs=max(a.decode_batch, 8),
                     kv_transfer_config=transfer_config(c, cpu_bytes, str(work / f"disk_{c}")), phases=ph1)
             for c in names}
    print(f"wave 1: {', '.join(jobs1)}", flush=True)
    t1 = time.perf_counter()
    r1 = _wave(jobs1, work, a.wave_timeout)
    t1 = time.perf_counter() - t1

    def report(r2: dict[str, Any], t2: float) -> None:  # written after each wave: a cut-off run keeps wave 1
        rep = {
            "command": "python benchmarks/bench_vllm_gpu.py " + " ".join(sys.argv[1:]),
            "commit": os.environ.get("KVBM_COMMIT") or git_commit(short=True),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "vllm_version": next((r["vllm_version"] for r in {**r1, **r2}.values() if "vllm_version" in r), None),
            "model": {"layers": a.layers, "hidden": a.hidden, "heads": heads, "kv_heads": a.kv_heads,
                      "head_dim": a.head_dim, "intermediate": a.intermediate, "vocab": a.vocab, "dtype": "bfloat16",
                      "kv_bytes_per_token": kv_per_token},
            "settings": vars(a), "seconds": {"model_build": t_model, "wave1": t1, "wave2": t2,
                                             "all": time.perf_counter() - t_all},
            "wave1": r1, "wave2": r2,
        }
        (outdir / "vllm_gpu_bench.json").write_text(json.dumps(rep, indent=1))
        (outdir / "vllm_gpu_bench.md").write_text(render(rep))

    report({}, 0.0)
    # Wave 2: disk contenders restarted (host tiers empty, files out of the page cache), and the
    # multi-turn engines (small GPU KV cache, multi-turn CPU bytes).
    jobs2: dict[str, dict[str, Any]] = {}
    for c in names:
        if c in DISK_CONTENDERS and "error" not in r1.get(c, {"error": 1}):
            d = str(work / f"disk_{c}")
            ph2 = [{"name": "warmup", "prompts": [_tokens(512, 8, a.vocab)], "max_tokens": 2}]
            ph2 += [{"name": f"disk_{n}", "prompts": [p], "max_tokens": 1, "drop_page_cache": d}
                    for n, p in prompts.items()]
            jobs2[f"{c}_restart"] = dict(common, gpu_kv_bytes=int(a.gpu_kv_gib * GIB), max_num_seqs=8,
                                         kv_transfer_config=transfer_config(c, cpu_bytes, d), phases=ph2)
    mt = {"seed": 5, "vocab": a.vocab, "sessions": a.sessions, "turns": a.turns, "system_tokens": a.system_tokens,
          "user_tokens": a.user_tokens, "output_tokens": a.reply_tokens}
    mt_len = a.system_tokens + a.turns * (a.user_tokens + a.reply_tokens) + 64
    for c in names:
        jobs2[f"{c}_mt"] = dict(common, gpu_kv_bytes=int(a.mt_gpu_kv_gib * GIB), max_num_seqs=a.sessions,
                                max_model_len=max(mt_len, 2048),
                                kv_transfer_config=transfer_config(c, mt_cpu, str(work / f"mtdisk_{c}")),
                                phases=[{"name": "warmup", "prompts": [_tokens(256, 9, a.vocab)], "max_tokens": 2}],
                                multiturn=mt)
    print(f"wave 2: {', '.join(jobs2)}", flush=True)
    t2 = time.perf_counter()
    r2 = _wave(jobs2, work, a.wave_timeout)
    t2 = time.perf_counter() - t2
    report(r2, t2)
    print((outdir / "vllm_gpu_bench.md").read_text())


# --- the report ----------------------------------------------------------------------------------

def _phase(run: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [p for p in run.get("phases", []) if p["name"] == name]


def _ttft(run: dict[str, Any] | None, name: str) -> tuple[float | None, list[int]]:
    """Median TTFT of the phases ``name`` and the cached-token counts they reported."""
    if not run or "error" in run:
        return None, []
    ps = _phase(run, name)
    v = [p["requests"][0]["ttft_s"] for p in ps if p["requests"][0]["ttft_s"] is not None]
    return (statistics.median(v) if v else None), [p["requests"][0]["cached"] for p in ps]


def _first_tokens(run: dict[str, Any] | None, name: str) -> list[int]:
    if not run or "error" in run:
        return []
    return [p["requests"][0]["tokens"][0] for p in _phase(run, name) if p["requests"][0]["tokens"]]


def _fmt(v: float | None, ref: float | None, nat: float | None, ms: bool = True) -> str:
    if v is None:
        return "—"
    s = f"{v * 1e3:.1f} ms" if ms else f"{v:.1f}"
    parts = []
    if ref:
        parts.append(f"{v / ref:.2f}x none")
    if nat:
        parts.append(f"{v / nat:.2f}x native")
    return s + (f" ({', '.join(parts)})" if parts else "")


def render(rep: dict[str, Any]) -> str:
    r1, r2 = rep["wave1"], rep["wave2"]
    names = [c for c in CONTENDERS if c in r1]
    m = rep["model"]
    lens = [int(x) for x in str(rep["settings"]["lens"]).split(",")]
    L = [
        "# kvbm vs vLLM's own offloading inside real vLLM on one GPU", "",
        f"- command: `{rep['command']}`",
        f"- commit {rep['commit']}; vLLM {rep['vllm_version']}; {rep['date']}; GPU {rep['gpu']}; {rep['machine']}",
        (f"- model: random-weight Llama with Llama-3-8B's KV geometry: {m['layers']} layers, {m['kv_heads']} KV heads, "
         f"head dim {m['head_dim']}, bf16 ({m['kv_bytes_per_token'] // 1024} KiB of KV per token); "
         f"hidden {m['hidden']}, "
         f"{m['heads']} heads, intermediate {m['intermediate']}, vocab {m['vocab']} (smaller than 8B's so every "
         "engine start fits the device time)"),
        (f"- every offloading contender gets {rep['settings']['cpu_gib']} GiB of host memory (multi-turn: "
         f"{rep['settings']['mt_cpu_gib']} GiB); GPU KV cache {rep['settings']['gpu_kv_gib']} GiB (multi-turn: "
         f"{rep['settings']['mt_gpu_kv_gib']} GiB); eager mode; chunked prefill of "
         f"{rep['settings']['max_num_batched_tokens']} tokens; wall {rep['seconds']['all']:.0f} s"),
        "", ("Ratios: time / the same column's figure of vLLM without offloading (none: it recomputes the prompt; "
             "its disk-column reference is its warm recompute, the host column) and of vLLM's CPU offloading "
             "(native); < 1 is faster."),
        "",
    ]
    base = r1.get("none")
    nat = r1.get("native")
    for n in lens:
        L += [f"## TTFT, repeated {n}-token prompt", "",
              ("| contender | cold | host hit | disk hit after restart, page cache dropped "
               "| cached tokens (host / disk) | first token = cold's (host, disk) |"),
              "|---|---|---|---|---|---|"]
        # "x none": vLLM without offloading recomputing the same prompt in the same phase (its "host"
        # phase recomputes after the prefix-cache reset; a restart recomputes as it does there)
        c_ref, h_ref = _ttft(base, f"cold_{n}")[0], _ttft(base, f"host_{n}")[0]
        c_nat, h_nat = _ttft(nat, f"cold_{n}")[0], _ttft(nat, f"host_{n}")[0]
        d_ref = None
        for c in names:
            run = r1[c]
            if "error" in run:
                L.append(f"| {c} | failed: {run['error'].strip().splitlines()[-1][:120]} | | | | |")
                continue
            cold, _ = _ttft(run, f"cold_{n}")
            host, hc = _ttft(run, f"host_{n}")
            disk, dc = _ttft(r2.get(f"{c}_restart"), f"disk_{n}")
            if c == "native_fs":
                d_ref = disk
            ref_tok = _first_tokens(run, f"cold_{n}")
            same = [t == ref_tok[0] for t in _first_tokens(run, f"host_{n}") + _first_tokens(
                r2.get(f"{c}_restart"), f"disk_{n}")] if ref_tok else []
            agree = f"{sum(same)}/{len(same)}" if same else "—"
            dcol = _fmt(disk, h_ref, None) if disk is not None else ("—" if c not in DISK_CONTENDERS else "failed")
            L.append(f"| {c} | {_fmt(cold, c_ref, c_nat)} | {_fmt(host, h_ref, h_nat)} | {dcol}"
                     f" | {hc} / {dc} | {agree} |")
        if d_ref:
            for c in ("kvbm_disk", "native_kvbm"):
                dv = _ttft(r2.get(f"{c}_restart"), f"disk_{n}")[0]
                if dv:
                    L.append(f"\n{c} disk hit / native_fs disk hit: {dv / d_ref:.2f}x")
        cold_tok = {c: _first_tokens(r1[c], f"cold_{n}")[:1] for c in names}
        L.append(f"\nCold first tokens (every contender computes the prompt itself): {cold_tok}")
        L.append("")
    L += ["## Decode inter-token latency at 0% hits", "",
          f"{rep['settings']['decode_batch']} fresh {rep['settings']['decode_prompt']}-token prompts at once, "
          f"{rep['settings']['decode_tokens']} tokens after the first; mean over requests of (last - first token "
          "time) / tokens.", "", "| contender | ITL | vs none |", "|---|---|---|"]
    itl_ref = None
    for c in names:
        ps = _phase(r1[c], "decode") if "error" not in r1[c] else []
        v = [q["itl_s"] for p in ps for q in p["requests"] if q["itl_s"]]
        itl = statistics.mean(v) if v else None
        if c == "none":
            itl_ref = itl
        L.append(f"| {c} | {itl * 1e3:.3f} ms | {(itl / itl_ref - 1) * 100:+.1f}% |" if itl and itl_ref
                 else f"| {c} | {'—' if itl is None else f'{itl * 1e3:.3f} ms'} | |")
    s = rep["settings"]
    L += ["", "## Multi-turn chat, small GPU KV cache", "",
          (f"{s['sessions']} sessions sharing a {s['system_tokens']}-token system prompt, {s['turns']} turns; "
           f"each turn every session sends its whole history + {s['user_tokens']} new tokens at once and gets "
           f"{s['reply_tokens']} tokens back."), "",
          "| contender | output tok/s | TTFT p50 | TTFT p99 | prompt tokens served from a cache |",
          "|---|---|---|---|---|"]
    mref = (r2.get("none_mt") or {}).get("multiturn")
    mnat = (r2.get("native_mt") or {}).get("multiturn")
    for c in names:
        run = r2.get(f"{c}_mt") or {"error": "not run"}
        if "error" in run:
            L.append(f"| {c} | failed: {run['error'].strip().splitlines()[-1][:120]} | | | |")
            continue
        mt = run["multiturn"]

        def rat(k: str, mt: dict = mt) -> str:
            parts = [f"{mt[k] / x[k]:.2f}x {nm}" for nm, x in (("none", mref), ("native", mnat)) if x and x[k]]
            return f" ({', '.join(parts)})" if parts else ""

        L.append(f"| {c} | {mt['output_tok_s']:.0f}{rat('output_tok_s')} | {mt['ttft_p50_s'] * 1e3:.0f} ms"
                 f"{rat('ttft_p50_s')} | {mt['ttft_p99_s'] * 1e3:.0f} ms{rat('ttft_p99_s')} | "
                 f"{mt['cached_tokens'] / max(1, mt['prompt_tokens']):.1%} |")
    L += ["", "## Engines", "", "| engine | start-up s | error |", "|---|---|---|"]
    for name, run in {**r1, **r2}.items():
        err = run.get("error", "").strip().splitlines()[-1][:160] if "error" in run else ""
        L.append(f"| {name} | {run.get('startup_s', 0):.1f} | {err} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
