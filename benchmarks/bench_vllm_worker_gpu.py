"""The vLLM connector's worker-side save/load path on CUDA, without vLLM (the GPU machine has none):
per-layer tensors in vLLM 0.32's CUDA layout (views [num_blocks, num_kv_heads, block_size,
2*head_size] of one allocation, layer-major), a pinned host arena, and exactly the calls
`KvbmWorker` makes (`KvLayout.from_tensors(kind="vllm")`, `slot_addresses`, `gather`/`scatter` on the
current stream). Reports bytes/s against a contiguous pinned copy of the same bytes in the same run
(the CUDA issue's limit), and checks every byte.

Run: python benchmarks/bench_vllm_worker_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from kvbm.copy import gather, scatter, slot_addresses
from kvbm.kv_layout import KvLayout

LAYERS, HEADS, BS, HEAD = 32, 8, 16, 128  # Llama-3-8B-like, bf16: 32 KiB per K or V of a block


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    num_blocks = args.blocks * 2
    # one allocation, per-layer views, the way vLLM's GPU model runner hands them to a connector
    buf = torch.empty((LAYERS, num_blocks, HEADS, BS, 2 * HEAD), dtype=torch.bfloat16, device=dev)
    buf.view(torch.int16).random_(-32768, 32767)
    kv = {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(LAYERS)}
    layout = KvLayout.from_tensors(kv, kind="vllm")
    n = args.blocks
    arena = torch.empty((n, layout.block_bytes), dtype=torch.uint8, pin_memory=True)
    addrs = slot_addresses(arena.numpy())
    rng = np.random.default_rng(0)
    ids = rng.permutation(num_blocks)[:n].astype(np.int64)
    stream = torch.cuda.current_stream()
    nbytes = n * layout.block_bytes

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(args.reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(stream)
            fn()
            e.record(stream)
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        return statistics.median(ts)

    save = timed(lambda: gather(layout, ids, addrs, stream).wait())
    # byte check of the save: slot i = layer-major concatenation of block ids[i]'s per-layer region
    for i in (0, n // 2, n - 1):
        expect = torch.cat([buf[layer, int(ids[i])].reshape(-1) for layer in range(LAYERS)]).view(torch.uint8).cpu()
        assert torch.equal(arena[i], expect), f"slot {i} differs"
    dst_ids = rng.permutation(num_blocks)[:n].astype(np.int64)
    saved = buf.clone()
    buf.view(torch.int16).fill_(0x7BAD)  # poison
    load = timed(lambda: scatter(layout, dst_ids, addrs, stream).wait())
    for i in (0, n // 2, n - 1):
        # compare bits (random bf16 bit patterns include NaNs, which never compare equal)
        assert torch.equal(buf[:, int(dst_ids[i])].view(torch.int16), saved[:, int(ids[i])].view(torch.int16)), (
            f"block {dst_ids[i]} differs"
        )
    dev_src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    d2h = timed(lambda: arena.view(-1).copy_(dev_src, non_blocking=True))
    h2d = timed(lambda: dev_src.copy_(arena.view(-1), non_blocking=True))
    res = {
        "device": torch.cuda.get_device_name(0), "layers": LAYERS, "kv_heads": HEADS, "block_size": BS,
        "head_size": HEAD, "dtype": "bfloat16", "blocks": n, "block_bytes": layout.block_bytes,
        "save_GBps": nbytes / save / 1e9, "load_GBps": nbytes / load / 1e9,
        "limit_d2h_GBps": nbytes / d2h / 1e9, "limit_h2d_GBps": nbytes / h2d / 1e9,
    }
    res["save_vs_limit"] = res["save_GBps"] / res["limit_d2h_GBps"]
    res["load_vs_limit"] = res["load_GBps"] / res["limit_h2d_GBps"]
    Path(args.out + ".json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
