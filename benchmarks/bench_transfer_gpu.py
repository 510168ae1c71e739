"""GPU transfers between two processes through kvbm's engine, on one GPU machine:
GPU memory -> GPU memory of another process on the same GPU (UCX cuda_ipc), and GPU memory ->
another process's host memory, vs a device-to-device copy of the same bytes in one process.

A row is a batch of S bytes made of --block-byte blocks scattered to random slots of the
target's buffer; one put request per batch, waited before the next (wall clock). The baseline is
one contiguous device-to-device copy of S bytes (torch), timed the same way (wall clock around the
copy and a synchronize) and with CUDA events. Every path is checked byte for byte first.

    python benchmarks/bench_transfer_gpu.py --out benchmarks/results/transfer_gpu
"""

from __future__ import annotations

import os

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
os.environ["NCCL_NVLS_ENABLE"] = "0"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

TLS = "cuda_ipc,cuda_copy,sm,tcp"
SIZES = [64 << 10, 1 << 20, 16 << 20, 256 << 20]
BUF = 512 << 20
PEER = str(Path(__file__).resolve().parent.parent / "tests" / "transfer_peer.py")


def run(a: argparse.Namespace) -> None:
    import torch

    from kvbm.transfer import TransferEngine

    env = dict(os.environ, UCX_TLS=TLS, PYTHONUNBUFFERED="1")
    rows = []
    eng = TransferEngine("gpu-bench", transports=TLS, net_devices="lo", error_handling=False, progress=a.progress)
    src = torch.randint(0, 256, (BUF,), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    rs = eng.register(src.data_ptr(), BUF, memory="cuda")
    src_np = None
    for target in ("cuda", "host"):
        peer_proc = subprocess.Popen(
            [sys.executable, PEER, "--name", f"target-{target}", "--transports", TLS, "--error-handling", "0",
             "--size", str(BUF), "--seed", "3"] + (["--cuda"] if target == "cuda" else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = peer_proc.stdout.readline()
        if not line.startswith("PORT "):
            raise SystemExit(f"target did not start: {line!r}")
        peer = eng.connect("127.0.0.1", int(line.split()[1]))
        (remote,) = peer.remote_regions
        try:
            # Byte-exact check of a scattered batch first (digest computed by the target).
            if src_np is None:
                src_np = src.cpu().numpy()
            mirror = np.random.default_rng(3).integers(0, 256, BUF, dtype=np.uint8)
            blk = a.block
            rng = np.random.default_rng(7)
            s_ids = rng.choice(BUF // blk, 512, replace=False)
            d_ids = rng.choice(BUF // blk, 512, replace=False)
            peer.put_blocks(rs.addr, s_ids, remote.addr, d_ids, blk, notify=b"digest 0 %d chk" % BUF).wait(60)
            for s, d in zip(s_ids, d_ids):
                mirror[d * blk : (d + 1) * blk] = src_np[s * blk : (s + 1) * blk]
            want = hashlib.sha256(mirror.tobytes()).hexdigest()
            got = None
            while got is None:
                ln = peer_proc.stdout.readline()
                if not ln:
                    raise SystemExit("target exited before the digest")
                if ln.startswith("DIGEST chk"):
                    got = ln.split()[2]
            if got != want:
                raise SystemExit(f"GPU -> {target}: scattered put was not byte-exact")
            for size in SIZES:
                block = min(blk, size)
                n = size // block
                r2 = np.random.default_rng(size)
                ids = r2.choice(BUF // block, (2, n), replace=True).astype(np.uint64)
                loc = np.uint64(rs.addr) + ids[0] * np.uint64(block)
                rem = np.uint64(remote.addr) + ids[1] * np.uint64(block)
                for _ in range(3):
                    peer.put(loc, rem, block).wait(60)
                ts = []
                for _ in range(a.reps):
                    t0 = time.perf_counter()
                    peer.put(loc, rem, block).wait(60)
                    ts.append(time.perf_counter() - t0)
                t = statistics.median(ts)
                rows.append({"path": f"gpu->{'gpu (other process, cuda_ipc)' if target == 'cuda' else 'remote host'}",
                             "batch_bytes": size, "block_bytes": block, "blocks": n, "kvbm_GBps": size / t / 1e9,
                             "kvbm_us": t * 1e6})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            peer.close()
            peer_proc.stdin.close()
            peer_proc.wait(30)
    # Baseline: one contiguous device-to-device copy of the same bytes.
    dst = torch.empty(BUF, dtype=torch.uint8, device="cuda")
    base = {}
    for size in SIZES:
        for _ in range(3):
            dst[:size].copy_(src[:size])
        torch.cuda.synchronize()
        wall, ev = [], []
        for _ in range(a.reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            e0.record()
            dst[:size].copy_(src[:size])
            e1.record()
            torch.cuda.synchronize()
            wall.append(time.perf_counter() - t0)
            ev.append(e0.elapsed_time(e1) / 1e3)
        base[size] = (size / statistics.median(wall) / 1e9, size / statistics.median(ev) / 1e9)
    for r in rows:
        r["d2d_copy_wall_GBps"], r["d2d_copy_events_GBps"] = base[r["batch_bytes"]]
        r["kvbm_vs_d2d_wall"] = r["kvbm_GBps"] / r["d2d_copy_wall_GBps"]
    eng.close()
    result = {"meta": {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "device": torch.cuda.get_device_name(0), "ucx_tls": TLS, "progress": a.progress,
                       "reps": a.reps, "note": "GB/s = 1e9 bytes/s, medians; kvbm wall clock per batch incl. wait"},
              "rows": rows}
    print(json.dumps(result["meta"]))
    if a.out:
        Path(a.out + ".json").write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=64 << 10)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--progress", default="thread", choices=["thread", "caller"])
    ap.add_argument("--out", default="")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
