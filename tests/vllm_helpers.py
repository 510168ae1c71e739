"""Helpers for the vLLM end-to-end tests and benchmark: an offline tiny Llama and a subprocess harness.

The harness runs ``python tests/vllm_helpers.py <spec.json>`` in a fresh
process: it builds ``vllm.LLM`` with the given ``kv_transfer_config``, runs the listed phases of
token-id prompts with greedy sampling, and writes a JSON result with the output token ids, vLLM's
own external prefix-cache hit counter per phase (``vllm:external_prefix_cache_hits``), and, when
the engine runs in-process, the kvbm scheduler's counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def build_tiny_llama(path: str | os.PathLike, *, layers: int = 2, hidden: int = 128, heads: int = 4,
                     kv_heads: int = 2, head_dim: int = 32, intermediate: int = 256, vocab: int = 1024,
                     max_pos: int = 8192, seed: int = 0, std: float = 0.05) -> str:
    """Save a random-weight Llama (bf16) with ``save_pretrained``; no download, no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(path)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=max_pos, torch_dtype="bfloat16",
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # larger random weights make greedy outputs depend on the whole context
        for p in model.parameters():
            p.normal_(0.0, std)
    model.save_pretrained(path)
    return path


def add_word_tokenizer(model_dir: str | os.PathLike, vocab: int = 1024) -> str:
    """Save a word-level tokenizer (token ``t<i>`` = id i) next to the model, for the OpenAI server."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(
        str(model_dir))
    return str(model_dir)


def gpu_vllm_skip_reason(need_ucx: bool = False) -> str | None:
    """Why real vLLM on CUDA cannot run here (None: it can): no vLLM, torch, CUDA GPU, CUDA build
    of kvbm or, with ``need_ucx``, UCX."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (the GPU machine gets vLLM 0.26 from scripts/gpu_all.sh vllm)"
    try:
        import torch

        from kvbm import _native
        from kvbm.transfer import ucx_available
    except ImportError as e:
        return f"torch or kvbm's native extension is missing: {e}"
    if not torch.cuda.is_available():
        return "no CUDA GPU (real vLLM on CUDA)"
    if not _native.cuda_available():
        return "kvbm was built without CUDA (KVBM_CUDA=ON)"
    if need_ucx:
        ok, why = ucx_available()
        if not ok:
            return why or "UCX unavailable"
    return None


def agree(a: list[int], b: list[int]) -> int:
    """Leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def kvbm_transfer_config(**extra: Any) -> dict[str, Any]:
    return {"kv_connector": "KvbmConnector", "kv_connector_module_path": "kvbm.integrations.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def run_engine(spec: dict[str, Any], *, multiprocess: bool = False, timeout: float = 600,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the harness in a fresh process; returns its JSON result (raises with its log on failure)."""
    spec_path = Path(spec["out"]).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, **(env or {}))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(HERE / "vllm_helpers.py"), str(spec_path)], check=False, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"engine process failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-8000:]}")
    result = json.loads(Path(spec["out"]).read_text())
    result["log"] = (proc.stdout[-20000:] + proc.stderr[-20000:])  # vLLM (and kvbm inside it) log to stdout
    return result


def _external_hits(llm: Any) -> int:
    total = 0
    for m in llm.get_metrics():
        if m.name == "vllm:external_prefix_cache_hits":
            total += int(getattr(m, "value", 0))
    return total


def _scheduler_connector(llm: Any) -> Any:
    try:
        return llm.llm_engine.engine_core.engine_core.scheduler.connector
    except AttributeError:
        return None


def _secondary_tier_stats(conn: Any) -> list[dict[str, int]] | None:
    """Counters of kvbm's secondary tiers under vLLM's native offloading (``OffloadingConnector``
    with ``TieringOffloadingSpec``), else None."""
    mgr = getattr(getattr(conn, "connector_scheduler", None), "manager", None)
    tiers = [t for t in getattr(mgr, "secondary_tiers", []) if hasattr(t, "stats")]
    return [dict(t.stats, chunks=len(t.catalog)) if hasattr(t, "catalog") else dict(t.stats) for t in tiers] or None


def _worker_copy_stats() -> dict[str, Any] | None:
    """The worker half's copy counters (``KvbmWorker.copy_stats``) when it lives in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), else None."""
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        worker = getattr(get_kv_transfer_group(), "_worker", None) if has_kv_transfer_group() else None
    except Exception:  # noqa: BLE001 - no kv transfer group in this process
        return None
    return worker.copy_stats() if worker is not None and hasattr(worker, "copy_stats") else None


def _main(spec_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("rlimit_fsize"):  # writes past this file offset fail with EFBIG (CPython ignores SIGXFSZ)
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["rlimit_fsize"], spec["rlimit_fsize"]))
    kwargs: dict[str, Any] = {
        "model": spec["model"], "skip_tokenizer_init": True, "enforce_eager": True,
        "kv_cache_memory_bytes": spec.get("kv_cache_memory_bytes", 64 << 20),
        "max_model_len": spec.get("max_model_len", 4096), "block_size": spec.get("block_size", 32),
        "seed": 0, "disable_log_stats": False,
        "max_num_batched_tokens": spec.get("max_num_batched_tokens", 8192),
    }
    if spec.get("kv_transfer_config") is not None:
        kwargs["kv_transfer_config"] = spec["kv_transfer_config"]
    kwargs.update(spec.get("llm_kwargs", {}))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    result: dict[str, Any] = {"startup_s": time.perf_counter() - t0, "phases": []}
    sp = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16), ignore_eos=True)
    if spec.get("loop_seed") is not None:  # crash tests: random prompts (and the spec's) until killed
        import random

        rng = random.Random(spec["loop_seed"])
        fixed = [p for ph in spec["phases"] for p in ph["prompts"]]
        print("ready", flush=True)
        while True:
            if fixed and rng.random() < 0.3:
                prompt = rng.choice(fixed)
            else:
                prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(2, 12) * 32 + 5)]
            llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)
            llm.reset_prefix_cache()
    for phase in spec["phases"]:
        if phase.get("reset_prefix_cache", True):
            llm.reset_prefix_cache()
        before = _external_hits(llm)
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in phase["prompts"]], sp, use_tqdm=False)
        dt = time.perf_counter() - t
        conn = _scheduler_connector(llm)
        result["phases"].append({
            "outputs": [list(o.outputs[0].token_ids) for o in outs],
            "num_cached_tokens": [o.num_cached_tokens for o in outs],
            "external_hits": _external_hits(llm) - before,
            "seconds": dt,
            "kvbm": conn.kvbm_stats() if conn is not None and hasattr(conn, "kvbm_stats") else None,
            "worker": _worker_copy_stats(),
            "secondary_tier": _secondary_tier_stats(conn),
        })
    import vllm

    result["vllm_version"] = vllm.__version__
    cc = getattr(getattr(llm.llm_engine, "vllm_config", None), "compilation_config", None)
    result["cudagraph_mode"] = str(getattr(getattr(cc, "cudagraph_mode", None), "name", None))
    conn = _scheduler_connector(llm)
    if spec.get("hash_prompts") and conn is not None:  # kvbm's block hashes (disk catalog keys) of prompts
        from kvbm.hashing import block_hashes

        geo = conn._sched.geo
        result["hashes"] = [[h.hex() for h in block_hashes(p[:len(p) // geo.block_size * geo.block_size],
                                                           geo.block_size, geo.namespace, None)]
                            for p in spec["hash_prompts"]]
    Path(spec["out"]).write_text(json.dumps(result))
    del llm


if __name__ == "__main__":
    _main(sys.argv[1])
