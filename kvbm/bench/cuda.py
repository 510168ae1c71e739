"""The CUDA data path benchmark needs a GPU and torch (its limit is torch's contiguous pinned copy),
so `kvbm bench` only points at it; results from the GPU machine are in benchmarks/results/."""

from __future__ import annotations

import importlib.util

import kvbm
from kvbm.bench import Context, Row


def run(ctx: Context) -> list[Row]:
    if not kvbm.build_info()["cuda_available"]:
        return ctx.skip("cuda", "no usable GPU here (cuda_available() is False)")
    if importlib.util.find_spec("torch") is None:
        return ctx.skip("cuda", "needs torch for the contiguous-copy limit")
    return ctx.skip("cuda", "run `python benchmarks/bench_cuda_datapath.py --out DIR` from a source checkout")
