"""CUDA data path benchmark: offload/onboard of paged KV blocks vs the contiguous PCIe limit.

Run on a GPU machine (needs torch with CUDA and a KVBM_CUDA=ON build):
    python benchmarks/bench_cuda_datapath.py --out DIR
Writes DIR/cuda_datapath.json and DIR/cuda_datapath.md.

Every figure is a ratio against a limit measured in the same run: one contiguous
cudaMemcpyAsync of the same bytes between a device buffer and the same pinned host buffer.
Timing: CUDA events on the stream doing the work, warm-up first, median of many repetitions;
>1 GiB of random engine data (far above L2), host slots poisoned before the first run and every
byte checked afterwards against a torch reference (offload), engine blocks poisoned and checked
(onboard).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from kvbm import _native
from kvbm.bench.provenance import git_commit
from kvbm.copy import gather, scatter
from kvbm.kv_layout import KvLayout

GiB = 1 << 30


def timed(fn, stream, reps: int, warmup: int = 3) -> list[float]:
    """Milliseconds per call (events on `stream` around fn's work), after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(stream)
        fn()
        e.record(stream)
        e.synchronize()
        out.append(s.elapsed_time(e))
    return out


def summary(ms: list[float], nbytes: int) -> dict:
    med = statistics.median(ms)
    return {"median_ms": med, "min_ms": min(ms), "max_ms": max(ms), "reps": len(ms),
            "gbps": nbytes / (med * 1e-3) / 1e9}


class Geometry:
    def __init__(self, name: str, layers: int, heads: int, head: int, block_size: int, num_blocks: int, n: int):
        self.name, self.n = name, n
        dev = torch.device("cuda")
        self.k = [torch.empty((num_blocks, block_size, heads, head), dtype=torch.bfloat16, device=dev)
                  for _ in range(layers)]
        self.v = [torch.empty_like(t) for t in self.k]
        for t in self.k + self.v:
            t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8, device=dev))
        self.layout = KvLayout.from_tensors(list(zip(self.k, self.v)), kind="kv_split")
        self.bb = self.layout.block_bytes
        self.chunk_bytes = block_size * heads * head * 2
        rng = np.random.default_rng(0)
        perm = rng.permutation(num_blocks)
        self.ids_a, self.ids_b = perm[:n].astype(np.int64), perm[n:2 * n].astype(np.int64)
        self.slots_a = torch.empty((n, self.bb), dtype=torch.uint8).pin_memory()
        self.slots_b = torch.empty((n, self.bb), dtype=torch.uint8).pin_memory()
        self.nbytes = n * self.bb

    def reference(self, ids: np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(ids, device="cuda")
        parts = []
        for k, v in zip(self.k, self.v):
            parts += [k[idx].view(torch.uint8).reshape(len(ids), -1), v[idx].view(torch.uint8).reshape(len(ids), -1)]
        return torch.cat(parts, dim=1)

    def snapshot(self, ids):
        idx = torch.as_tensor(ids, device="cuda")
        return [t[idx].clone() for t in self.k + self.v]

    def poison_blocks(self, ids):
        idx = torch.as_tensor(ids, device="cuda")
        for t in self.k + self.v:
            t.view(torch.uint8)[idx] = 0x5A

    def blocks_equal(self, ids, snap) -> bool:
        idx = torch.as_tensor(ids, device="cuda")
        return all(torch.equal(t[idx].view(torch.uint8), s.view(torch.uint8)) for t, s in zip(self.k + self.v, snap))


def run_geometry(g: Geometry, reps: int, sweep: list[int], matmul_n: int) -> dict:
    res: dict = {"geometry": g.name, "block_bytes": g.bb, "chunk_bytes": g.chunk_bytes, "blocks": g.n,
                 "bytes": g.nbytes, "chunks_per_block": len(g.layout.chunks)}
    s = torch.cuda.Stream()
    dev_contig = torch.empty(g.nbytes, dtype=torch.uint8, device="cuda")
    host_flat = g.slots_a.view(-1)
    with torch.cuda.stream(s):
        lim_d2h = timed(lambda: host_flat.copy_(dev_contig, non_blocking=True), s, reps)
        lim_h2d = timed(lambda: dev_contig.copy_(host_flat, non_blocking=True), s, reps)
    res["limit_d2h"] = summary(lim_d2h, g.nbytes)
    res["limit_h2d"] = summary(lim_h2d, g.nbytes)
    ref_a = g.reference(g.ids_a)
    checks = {}

    def offload(method, ctas=0):
        return lambda: gather(g.layout, g.ids_a, g.slots_a, stream=s, method=method, max_ctas=ctas)

    def onboard(method, ctas=0):
        return lambda: scatter(g.layout, g.ids_a, g.slots_a, stream=s, method=method, max_ctas=ctas)

    snap = g.snapshot(g.ids_a)

    def measure(label, method, ctas=0, r=reps):
        g.slots_a.fill_(0xA5)
        off = timed(offload(method, ctas), s, r, warmup=2)
        torch.cuda.synchronize()
        ok_off = torch.equal(g.slots_a.cuda(non_blocking=False), ref_a)
        g.poison_blocks(g.ids_a)
        torch.cuda.synchronize()
        on = timed(onboard(method, ctas), s, r, warmup=2)
        torch.cuda.synchronize()
        ok_on = g.blocks_equal(g.ids_a, snap)
        checks[label] = {"offload_bytes_exact": ok_off, "onboard_bytes_exact": ok_on}
        res[label] = {"offload": summary(off, g.nbytes), "onboard": summary(on, g.nbytes)}
        res[label]["offload"]["of_limit"] = res[label]["offload"]["gbps"] / res["limit_d2h"]["gbps"]
        res[label]["onboard"]["of_limit"] = res[label]["onboard"]["gbps"] / res["limit_h2d"]["gbps"]
        print(f"  {g.name} {label:>18}: offload {res[label]['offload']['gbps']:6.1f} GB/s "
              f"({res[label]['offload']['of_limit']:.1%})  onboard {res[label]['onboard']['gbps']:6.1f} GB/s "
              f"({res[label]['onboard']['of_limit']:.1%})  exact={ok_off and ok_on}", flush=True)

    print(f"  {g.name} limit: d2h {res['limit_d2h']['gbps']:.1f} GB/s  h2d {res['limit_h2d']['gbps']:.1f} GB/s")
    measure("kernel", "kernel")
    for c in sweep:
        measure(f"kernel_ctas{c}", "kernel", c)
    measure("copy_engine", "copy_engine")
    measure("staged", "staged")
    measure("staged_ctas32", "staged", 32)
    measure("naive", "naive", r=3)

    # Offload and onboard at once, on kvbm's own two streams (disjoint blocks and slots).
    g.slots_b.copy_(g.reference(g.ids_b).cpu())
    snap_b = g.snapshot(g.ids_b)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both(method, ctas=0, limit=False):
        def fn():
            ev = torch.cuda.Event()
            ev.record(s)
            s1.wait_event(ev)
            s2.wait_event(ev)
            if limit:
                with torch.cuda.stream(s1):
                    host_flat.copy_(dev_contig, non_blocking=True)
                with torch.cuda.stream(s2):
                    dev_contig2.copy_(g.slots_b.view(-1), non_blocking=True)
            else:
                gather(g.layout, g.ids_a, g.slots_a, stream=s1, method=method, max_ctas=ctas)
                scatter(g.layout, g.ids_b, g.slots_b, stream=s2, method=method, max_ctas=ctas)
            e1, e2 = torch.cuda.Event(), torch.cuda.Event()
            e1.record(s1)
            e2.record(s2)
            s.wait_event(e1)
            s.wait_event(e2)
        return fn

    dev_contig2 = torch.empty(g.nbytes, dtype=torch.uint8, device="cuda")
    bidir = {}
    for label, method, limit in [("limit", None, True), ("kernel", "kernel", False),
                                 ("copy_engine", "copy_engine", False), ("staged", "staged", False)]:
        g.slots_a.fill_(0xA5)
        g.poison_blocks(g.ids_b)
        torch.cuda.synchronize()
        ms = timed(both(method, limit=limit), s, reps)
        torch.cuda.synchronize()
        d = summary(ms, 2 * g.nbytes)
        single = res["limit_d2h" if limit else label]
        one_dir = (single["gbps"] if limit else (single["offload"]["gbps"] + single["onboard"]["gbps"]) / 2)
        d["x_one_direction"] = d["gbps"] / one_dir
        if not limit:
            d["bytes_exact"] = bool(torch.equal(g.slots_a.cuda(), ref_a) and g.blocks_equal(g.ids_b, snap_b))
            checks[f"bidir_{label}"] = d["bytes_exact"]
        bidir[label] = d
        print(f"  {g.name} both directions {label:>12}: {d['gbps']:6.1f} GB/s total, "
              f"{d['x_one_direction']:.2f}x one direction", flush=True)
    res["bidirectional"] = bidir

    # Interference with a large bf16 matmul on another stream.
    if matmul_n:
        a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device="cuda")
        sm = torch.cuda.Stream()
        iters = 60

        def mm_loop():
            with torch.cuda.stream(sm):
                for _ in range(iters):
                    torch.mm(a, b)

        mm_alone = statistics.median(timed(mm_loop, sm, 5, warmup=1))
        mm_ms = mm_alone / iters
        inter = {"matmul_n": matmul_n, "matmul_ms_alone": mm_ms,
                 "matmul_tflops_alone": 2 * matmul_n ** 3 / (mm_ms * 1e-3) / 1e12}
        one_xfer = res["kernel"]["offload"]["median_ms"]
        n_xfers = max(2, int(mm_alone / one_xfer) + 1)
        variants = [("kernel", "kernel", 0), ("kernel_ctas8", "kernel", 8), ("copy_engine", "copy_engine", 0),
                    ("staged", "staged", 0), ("staged_ctas32", "staged", 32)]
        for label, method, ctas in variants:
            for direction in ("offload", "onboard"):
                fn = gather if direction == "offload" else scatter
                mm_times, x_times = [], []
                for _ in range(3):
                    torch.cuda.synchronize()
                    ev = torch.cuda.Event()
                    ev.record(s)
                    sm.wait_event(ev)
                    xs, xe = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    ms_, me_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    ms_.record(sm)
                    mm_loop()
                    me_.record(sm)
                    xs.record(s)
                    for _ in range(n_xfers):
                        fn(g.layout, g.ids_a, g.slots_a, stream=s, method=method, max_ctas=ctas)
                    xe.record(s)
                    torch.cuda.synchronize()
                    mm_times.append(ms_.elapsed_time(me_) / iters)
                    x_times.append(xs.elapsed_time(xe))
                mm_with = statistics.median(mm_times)
                xfer_gbps = n_xfers * g.nbytes / (statistics.median(x_times) * 1e-3) / 1e9
                inter[f"{label}_{direction}"] = {"matmul_ms": mm_with, "matmul_slowdown": mm_with / mm_ms - 1,
                                                 "transfer_gbps": xfer_gbps}
                print(f"  {g.name} with matmul {label:>14} {direction}: transfer {xfer_gbps:6.1f} GB/s, "
                      f"matmul slowdown {mm_with / mm_ms - 1:+.1%}", flush=True)
        res["interference"] = inter
    res["checks"] = checks
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    assert _native.cuda_available(), "needs a GPU and a CUDA build of kvbm"
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    sweep = [8, 16, 32, sms]
    commit = git_commit()
    out = {"command": " ".join(["python", *sys.argv]), "git_commit": commit,
           "device": torch.cuda.get_device_name(0), "sm_count": sms, "torch": torch.__version__,
           "host": platform.node(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "results": []}
    geos = [("llama3_8b_bs16", 32, 8, 128, 16, 2048, 512), ("llama3_8b_bs128", 32, 8, 128, 128, 256, 64)]
    for name, layers, heads, head, bs, nb, n in geos:
        g = Geometry(name, layers, heads, head, bs, nb, n)
        out["results"].append(run_geometry(g, args.reps, sweep, 0 if args.quick else 8192))
        del g
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cuda_datapath.json").write_text(json.dumps(out, indent=1))
    (Path(args.out) / "cuda_datapath.md").write_text(render_md(out))
    print(render_md(out))
    return 0


def render_md(out: dict) -> str:
    lines = [f"# CUDA data path: {out['device']} ({out['sm_count']} SMs), torch {out['torch']}",
             f"`{out['command']}` at commit `{out['git_commit']}`, {out['date']}", ""]
    for r in out["results"]:
        lines += [(f"## {r['geometry']}: {r['blocks']} blocks x {r['block_bytes'] >> 20} MiB, "
                  f"{r['chunks_per_block']} chunks of {r['chunk_bytes'] >> 10} KiB per block"),
                  "", (f"Limit (one contiguous copy of the same {r['bytes'] >> 20} MiB): "
                  f"D2H {r['limit_d2h']['gbps']:.1f} GB/s, H2D {r['limit_h2d']['gbps']:.1f} GB/s"), "",
                  "| method | offload GB/s | of limit | onboard GB/s | of limit |", "|---|---|---|---|---|"]
        for k, v in r.items():
            if isinstance(v, dict) and "offload" in v and "onboard" in v:
                lines.append(f"| {k} | {v['offload']['gbps']:.1f} | {v['offload']['of_limit']:.1%} | "
                             f"{v['onboard']['gbps']:.1f} | {v['onboard']['of_limit']:.1%} |")
        lines += ["", "| both directions at once | total GB/s | x one direction |", "|---|---|---|"]
        for k, v in r["bidirectional"].items():
            lines.append(f"| {k} | {v['gbps']:.1f} | {v['x_one_direction']:.2f} |")
        if "interference" in r:
            i = r["interference"]
            lines += ["", (f"With a {i['matmul_n']}^3 bf16 matmul loop on another stream "
                      f"({i['matmul_ms_alone']:.2f} ms each alone, {i['matmul_tflops_alone']:.0f} TFLOP/s):"), "",
                      "| transfer | GB/s during | matmul slowdown |", "|---|---|---|"]
            for k, v in i.items():
                if isinstance(v, dict):
                    lines.append(f"| {k} | {v['transfer_gbps']:.1f} | {v['matmul_slowdown']:+.1%} |")
        lines += ["", f"Byte checks: {json.dumps(r['checks'])}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
