"""Layer-wise loads/saves of the vLLM connector's worker on CUDA vs whole blocks, without vLLM.

One engine step = a forward of ``--layers`` layers in vLLM's hook order (``wait_for_layer_load`` ->
attention -> ``save_kv_layer`` per layer, ``start_load_kv`` before, ``wait_for_save`` after) through
``KvbmWorker`` on real CUDA tensors in vLLM 0.32's CUDA layout (per-layer views of one allocation,
Llama-3-8B-like: 8 KV heads x 128, block of 16 tokens, bf16: 2 MiB a block over 32 layers). Each
layer's "attention" reads the layer's KV of the K loaded blocks, runs bf16 matmuls sized so a
layer takes about ``--layer-ms`` (calibrated here), and writes the layer's KV of K new blocks,
which the step stores. Modes, measured in the same run:

  (a) none       the forward alone (no connector work): the floor;
  (b) whole      whole blocks: the load completes before layer 0, the save runs after the last
                 layer, on kvbm's streams with GPU events (``layerwise: false``);
  (b') whole_current_stream  the connector's path before this change, literally: whole-block
                 scatter on the forward stream and a host wait before the forward, gather on it
                 and a host wait after (kvbm.copy calls as the old worker made them);
  (c) layerwise  layer l's load gates layer l only; layer l is saved right after its attention.

Reports per mode the median step time (CUDA events on the forward stream; the end event is
recorded after ``wait_for_save`` returned, i.e. after the saves) and host wall time, and
``overlap = (whole - layerwise) / (whole - none)``: the share of the connector's cost hidden.
Every mode's loads and saves are checked byte for byte after timing.

Run: python benchmarks/bench_vllm_layerwise_gpu.py --out DIR/vllm_layerwise   (writes .json and .md)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kvbm
from kvbm import _native
from kvbm.bench.provenance import git_commit
from kvbm.copy import gather, scatter
from kvbm.hashing import Namespace
from kvbm.integrations.vllm.common import Geometry
from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, LoadOp, StoreOp
from kvbm.integrations.vllm.worker import KvbmWorker

HEADS, BS, HEAD = 8, 16, 128


def make_worker(kv: dict, num_blocks: int, slots: int, layerwise: bool, method: str,
                layer_method: str | None) -> KvbmWorker:
    layers = len(kv)
    slot_bytes = layers * HEADS * BS * 2 * HEAD * 2
    cfg = ConnectorConfig.from_extra_config({"host_capacity_bytes": slots * slot_bytes, "layerwise": layerwise})
    geo = Geometry(block_size=BS, slot_bytes=slot_bytes, num_host_slots=slots, disk_capacity_blocks=0, tp_world=1,
                   namespace=Namespace(model_id="bench", dtype="bfloat16", kv_layout="vllm", block_size=BS))
    w = KvbmWorker(cfg, geo, num_blocks)
    w.copy_method = method
    if layer_method:
        w.layer_copy_method = layer_method
    w.register_kv_caches(kv)
    assert w.layerwise is layerwise
    return w


class Forward:
    """The simulated model: per layer, read the loaded blocks' KV, matmuls, write the new blocks' KV."""

    def __init__(self, kv: dict, load_ids: torch.Tensor, save_ids: torch.Tensor, m: int, d: int) -> None:
        self.kv, self.load_ids, self.save_ids = kv, load_ids, save_ids
        dev = next(iter(kv.values())).device
        self.x = torch.randn(m, d, device=dev, dtype=torch.bfloat16)
        self.w1 = torch.randn(d, d, device=dev, dtype=torch.bfloat16) / d ** 0.5
        self.w2 = torch.randn(d, d, device=dev, dtype=torch.bfloat16) / d ** 0.5
        self.mix = torch.randn(2 * HEAD, 2 * HEAD, device=dev, dtype=torch.bfloat16) / (2 * HEAD) ** 0.5

    def layer(self, kvl: torch.Tensor) -> None:
        h = torch.relu(self.x @ self.w1) @ self.w2  # the layer's compute (MLP-like)
        ctx = kvl[self.load_ids]  # reads the loaded KV of this layer
        new = (ctx.reshape(-1, 2 * HEAD) @ self.mix).reshape(ctx.shape) + h[0, 0]
        kvl[self.save_ids] = new  # writes this layer's KV of the new blocks

    def run(self, worker: KvbmWorker | None, meta: KvbmConnectorMetadata | None) -> None:
        if worker is not None:
            worker.start_load_kv(meta)
        for name, kvl in self.kv.items():
            if worker is not None:
                worker.wait_for_layer_load(name)
            self.layer(kvl)
            if worker is not None:
                worker.save_kv_layer(name, meta)
        if worker is not None:
            worker.wait_for_save(meta)


def calibrate(kv: dict, load_ids, save_ids, target_ms: float) -> tuple[int, int]:
    d, m = 4096, 256
    while True:
        f = Forward(kv, load_ids, save_ids, m, d)
        kvl = next(iter(kv.values()))
        for _ in range(3):
            f.layer(kvl)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            f.layer(kvl)
        e.record()
        e.synchronize()
        ms = s.elapsed_time(e) / 10
        if ms >= target_ms or m >= 65536:
            return m, d
        m = min(65536, max(m + 256, int(m * target_ms / max(ms, 1e-3) / 256 + 1) * 256))


def time_mode(fwd: Forward | OldPath, worker, meta, reps: int) -> dict:
    stream = torch.cuda.current_stream()
    for _ in range(3):
        fwd.run(worker, meta)
    torch.cuda.synchronize()
    gpu, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record(stream)
        fwd.run(worker, meta)
        e.record(stream)
        e.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        gpu.append(s.elapsed_time(e))
    return {"step_ms": statistics.median(gpu), "step_ms_min": min(gpu), "step_ms_max": max(gpu),
            "wall_ms": statistics.median(wall)}


class OldPath:
    """The worker's copies before layer-wise: whole blocks on the current stream, host waits."""

    def __init__(self, w: KvbmWorker, fwd: Forward, meta: KvbmConnectorMetadata) -> None:
        self.w, self.fwd = w, fwd
        self.load_ids = np.array([op.block_id for op in meta.loads], dtype=np.int64)
        self.load_addrs = w._slot_addrs[np.array([op.slot for op in meta.loads], dtype=np.int64)]
        self.save_ids = np.array([op.block_id for op in meta.stores], dtype=np.int64)
        self.save_addrs = w._slot_addrs[np.array([op.slot for op in meta.stores], dtype=np.int64)]

    def run(self, worker: KvbmWorker | None, meta: KvbmConnectorMetadata | None) -> None:
        cur = torch.cuda.current_stream()
        scatter(self.w.layout, self.load_ids, self.load_addrs, cur, method=self.w.copy_method).wait()
        self.fwd.run(None, None)
        gather(self.w.layout, self.save_ids, self.save_addrs, cur, method=self.w.copy_method).wait()


def check(worker: KvbmWorker, buf: torch.Tensor, load_ids: list[int], load_slots: list[int], save_ids: list[int],
          save_slots: list[int]) -> None:
    torch.cuda.synchronize()
    offs, lens = worker.layout.layer_offsets, worker.layout.layer_bytes
    for layer in range(buf.shape[0]):
        for b, s in list(zip(load_ids, load_slots))[:: max(1, len(load_ids) // 8)]:
            got = buf[layer, b].reshape(-1).view(torch.uint8).cpu()
            assert torch.equal(got, worker.arena[s, offs[layer]:offs[layer] + lens[layer]]), f"load {b} layer {layer}"
        for b, s in list(zip(save_ids, save_slots))[:: max(1, len(save_ids) // 8)]:
            got = buf[layer, b].reshape(-1).view(torch.uint8).cpu()
            assert torch.equal(got, worker.arena[s, offs[layer]:offs[layer] + lens[layer]]), f"save {b} layer {layer}"


def machine() -> dict:
    commit = git_commit()
    props = torch.cuda.get_device_properties(0)
    return {"command": " ".join(["python", *sys.argv]), "git_commit": commit or "unknown",
            "device": torch.cuda.get_device_name(0), "sm_count": props.multi_processor_count,
            "torch": torch.__version__, "kvbm_build": str(kvbm.build_info()), "host": platform.node(),
            "cpus": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="path prefix: writes <out>.json and <out>.md")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=64, help="K: blocks loaded and blocks saved per step")
    ap.add_argument("--layer-ms", type=float, default=0.5, help="target compute time of one layer")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--method", default="auto", help="kvbm.copy method of whole-block copies")
    ap.add_argument("--layer-method", default=None, help="kvbm.copy method of per-layer copies (default: the worker's)")
    args = ap.parse_args()
    assert torch.cuda.is_available() and _native.cuda_available(), "needs a GPU and a CUDA build of kvbm"
    L, K = args.layers, args.blocks
    nb = 2 * K + 16
    buf = torch.empty((L, nb, HEADS, BS, 2 * HEAD), dtype=torch.bfloat16, device="cuda")
    buf.normal_()
    kv = {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(L)}
    rng = np.random.default_rng(0)
    ids = rng.permutation(nb)[:2 * K]
    load_ids, save_ids = [int(b) for b in ids[:K]], [int(b) for b in ids[K:]]
    load_slots, save_slots = list(range(K)), list(range(K, 2 * K))
    lt, st = torch.tensor(load_ids, device="cuda"), torch.tensor(save_ids, device="cuda")
    m, d = calibrate(kv, lt, st, args.layer_ms)
    fwd = Forward(kv, lt, st, m, d)
    meta = KvbmConnectorMetadata(
        loads=[LoadOp(b, "host", s, i.to_bytes(16, "little"), "load") for i, (b, s) in
               enumerate(zip(load_ids, load_slots))],
        stores=[StoreOp(b, s, (1 << 64 | i).to_bytes(16, "little"), False, "new") for i, (b, s) in
                enumerate(zip(save_ids, save_slots))])
    out = {**machine(), "layers": L, "blocks_loaded": K, "blocks_saved": K, "kv_heads": HEADS, "block_size": BS,
           "head_size": HEAD, "dtype": "bfloat16", "method": args.method,
           "layer_method": args.layer_method,
           "matmul_m": m, "matmul_d": d,
           "reps": args.reps, "modes": {}}
    res = out["modes"]
    res["none"] = time_mode(fwd, None, None, args.reps)
    for mode, layerwise in (("whole_current_stream", False), ("whole", False), ("layerwise", True)):
        w = make_worker(kv, nb, 2 * K, layerwise, args.method, args.layer_method)
        if layerwise:
            out["layer_method"] = w.layer_copy_method
        out["block_bytes"] = w.layout.block_bytes
        for s in load_slots:  # fresh random (valid bf16) KV to load
            w.arena[s].view(torch.bfloat16).copy_(torch.randn(w.arena.shape[1] // 2).to(torch.bfloat16))
        step = OldPath(w, fwd, meta) if mode == "whole_current_stream" else fwd
        res[mode] = time_mode(step, w, meta, args.reps)
        buf.view(torch.int16)[:, torch.as_tensor(ids, device="cuda")] = 0x7BAD  # poison; one more checked step
        step.run(w, meta)
        check(w, buf, load_ids, load_slots, save_ids, save_slots)
        res[mode]["checked"] = True
        w.shutdown()
        del w
    moved = 2 * K * out["block_bytes"]
    out["bytes_per_step"] = moved
    out["layer_ms"] = res["none"]["step_ms"] / L
    cost = res["whole"]["step_ms"] - res["none"]["step_ms"]
    out["whole_overhead_ms"] = cost
    out["layerwise_overhead_ms"] = res["layerwise"]["step_ms"] - res["none"]["step_ms"]
    out["overlap"] = (res["whole"]["step_ms"] - res["layerwise"]["step_ms"]) / cost if cost > 0 else None
    out["speedup_vs_whole"] = res["whole"]["step_ms"] / res["layerwise"]["step_ms"]
    out["speedup_vs_whole_current_stream"] = res["whole_current_stream"]["step_ms"] / res["layerwise"]["step_ms"]
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(str(prefix) + ".json").write_text(json.dumps(out, indent=1))
    Path(str(prefix) + ".md").write_text(render_md(out))
    print(render_md(out))
    return 0


def render_md(o: dict) -> str:
    r = o["modes"]
    lines = [f"# vLLM connector worker: layer-wise vs whole-block copies — {o['device']}",
             f"`{o['command']}` at commit `{o['git_commit']}`, {o['date']}, torch {o['torch']}, {o['cpus']} CPUs", "",
             (f"{o['layers']} layers, {o['blocks_loaded']} blocks loaded + {o['blocks_saved']} saved per step "
              f"({o['block_bytes'] >> 20} MiB a block, {o['bytes_per_step'] >> 20} MiB moved), a layer computes "
              f"{o['layer_ms']:.2f} ms (matmuls {o['matmul_m']}x{o['matmul_d']}), copy method "
              f"{o['method']} (whole blocks), {o.get('layer_method')} (per layer)"), "",
             "| mode | step ms (GPU, median) | min | max | wall ms | bytes checked |", "|---|---|---|---|---|---|"]
    for k in ("none", "whole_current_stream", "whole", "layerwise"):
        v = r[k]
        lines.append(f"| {k} | {v['step_ms']:.2f} | {v['step_ms_min']:.2f} | {v['step_ms_max']:.2f} | "
                     f"{v['wall_ms']:.2f} | {'yes' if v.get('checked') else '-'} |")
    ov = o["overlap"]
    lines += ["", (f"Connector cost over the bare forward: whole {o['whole_overhead_ms']:.2f} ms, layer-wise "
                   f"{o['layerwise_overhead_ms']:.2f} ms; overlap (share of the whole-block cost hidden): "
                   f"{'n/a' if ov is None else f'{ov:.1%}'}; step speed-up vs whole blocks "
                   f"{o['speedup_vs_whole']:.3f}x, vs the old current-stream path "
                   f"{o['speedup_vs_whole_current_stream']:.3f}x."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
