"""A long-lived vLLM (CPU) instance driven over stdin/stdout, for the prefill/decode tests and benchmark.

``python tests/vllm_pd_peer.py '<spec json>'`` builds ``vllm.LLM`` (tiny offline model, token-id
prompts, greedy) and prints ``@@ {"ready": ...}``. Then each stdin line is a JSON command and gets
one ``@@ <json>`` line back:

* ``{"op": "generate", "prompt": [ids], "max_tokens": n, "kv_transfer_params": {...} | null}`` ->
  ``{"tokens": [...], "kv_transfer_params": ..., "seconds": s, "external_hits": n, "kvbm": stats}``
  (``seconds``: wall time of the generate call, i.e. time to the last token).
* ``{"op": "stats"}`` -> ``{"kvbm": stats, "worker": the worker's copy counters}``;
  ``{"op": "reset"}`` resets vLLM's prefix cache.

:class:`Instance` starts and drives one such process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class Instance:
    """One instance in its own process (this script), in-process engine, UCX on loopback tcp."""

    def __init__(self, model: str, kv_transfer_config: dict | None, log: Path, multiprocess: bool = False,
                 env: dict[str, str] | None = None, **spec_kw: Any) -> None:
        extra_env = env or {}
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1",
                   UCX_NET_DEVICES="lo", UCX_WARN_UNUSED_ENV_VARS="n", UCX_TLS="tcp", PYTHONUNBUFFERED="1")
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env.update(extra_env)
        env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
        spec = {"model": model, "kv_transfer_config": kv_transfer_config, **spec_kw}
        self.log = log
        self._err = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "vllm_pd_peer.py"), json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env=env)
        self.ready: dict | None = None

    def _read(self, timeout: float) -> dict:
        box: list[str] = []

        def rd() -> None:
            for line in self.proc.stdout:
                if line.startswith("@@ "):
                    box.append(line[3:])
                    return
                # vLLM (and kvbm inside it, through vLLM's handler) log to stdout: keep it in the log
                self._err.write(line)
                self._err.flush()

        t = threading.Thread(target=rd, daemon=True)
        t.start()
        t.join(timeout)
        if not box:
            raise RuntimeError(f"instance gave no answer in {timeout} s (rc={self.proc.poll()}); log tail:\n"
                               f"{self.log.read_text()[-6000:]}")
        return json.loads(box[0])

    def wait_ready(self, timeout: float = 300) -> dict:
        if self.ready is None:
            self.ready = self._read(timeout)
        return self.ready

    def call(self, timeout: float = 120, **cmd: Any) -> dict:
        self.wait_ready()
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _stats(llm: Any) -> dict[str, Any] | None:
    try:
        conn = llm.llm_engine.engine_core.engine_core.scheduler.connector
    except AttributeError:
        return None
    return conn.kvbm_stats() if conn is not None and hasattr(conn, "kvbm_stats") else None


def _worker_stats() -> dict[str, Any] | None:
    """The worker half's copy counters, in-process engines only (``vllm_helpers``)."""
    sys.path.insert(0, str(HERE))
    from vllm_helpers import _worker_copy_stats

    return _worker_copy_stats()


def _external_hits(llm: Any) -> int:
    return sum(int(getattr(m, "value", 0)) for m in llm.get_metrics() if m.name == "vllm:external_prefix_cache_hits")


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(sys.argv[1])
    kwargs: dict[str, Any] = {
        "model": spec["model"], "skip_tokenizer_init": True, "enforce_eager": True,
        "kv_cache_memory_bytes": spec.get("kv_cache_memory_bytes", 64 << 20),
        "max_model_len": spec.get("max_model_len", 4096), "block_size": spec.get("block_size", 32),
        "seed": 0, "disable_log_stats": False, "max_num_batched_tokens": spec.get("max_num_batched_tokens", 8192),
    }
    if spec.get("kv_transfer_config") is not None:
        kwargs["kv_transfer_config"] = spec["kv_transfer_config"]
    kwargs.update(spec.get("llm_kwargs", {}))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    _reply({"ready": True, "startup_s": time.perf_counter() - t0})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "exit":
            break
        if op == "reset":
            llm.reset_prefix_cache()
            _reply({"ok": True})
        elif op == "stats":
            _reply({"kvbm": _stats(llm), "worker": _worker_stats()})
        elif op == "generate":
            extra = {"kv_transfer_params": cmd["kv_transfer_params"]} if cmd.get("kv_transfer_params") else None
            sp = SamplingParams(temperature=0.0, max_tokens=cmd.get("max_tokens", 16), ignore_eos=True,
                                extra_args=extra)
            before = _external_hits(llm)
            t = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=cmd["prompt"])], sp, use_tqdm=False)[0]
            dt = time.perf_counter() - t
            _reply({"tokens": list(out.outputs[0].token_ids), "kv_transfer_params": out.kv_transfer_params,
                    "seconds": dt, "external_hits": _external_hits(llm) - before, "kvbm": _stats(llm)})
        else:
            _reply({"error": f"unknown op {op!r}"})


if __name__ == "__main__":
    main()
