"""KV handoff between two processes through kvbm's transfer engine (GPU memory -> GPU memory).

Process 0 (the prefill side, --src-device) fills paged KV buffers laid out as vLLM's CUDA
attention backends hold them (per layer a [num_blocks, block_size, num_kv_heads, 2*head_size]
tensor; block addresses come from the tensor's strides) and hands a request's blocks to process 1
(--dst-device), which receives them scattered into its own paged buffers: one batched put of
every (layer, block) chunk from process 0's block ids to process 1's block ids, with a
notification that arrives after the data. Process 1 checks every handed-off block byte for byte.

Each path is one row per size (--paths, both by default): ``cuda_ipc``, the engine's same-host
CUDA IPC path (process 1's buffers mapped into process 0, one kernel copies every chunk), and
``ucx``, the same engine with that path off (``cuda_ipc=False``: one UCX cuda_ipc operation per
chunk). Each path has its own sender engine; process 1 answers whichever sent the notification.
A row whose handles did not take the path it names says so (``path_used``).

Reported: bandwidth for 1, 64 and 1,024 blocks vs a plain peer-to-peer device copy of the same
bytes in one process (a contiguous copy, and torch's gather/scatter of the same chunks), and the
latency of one handoff (post -> data complete at process 1, and the round trip including
process 1 seeing the notification and answering it).

    python benchmarks/two_gpu_handoff.py --src-device 0 --dst-device 1 --out benchmarks/results/two_gpu_handoff
    python benchmarks/two_gpu_handoff.py --src-device 0 --dst-device 0   # one GPU, two processes
    python benchmarks/two_gpu_handoff.py --paths ucx                      # the UCX-only row alone
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast (shared machines)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

TLS = "cuda_ipc,cuda_copy,sm,tcp"
COUNTS = [1, 64, 1024]
PATHS = ("cuda_ipc", "ucx")


def make_kv(torch, device: int, a: argparse.Namespace, seed: int | None):
    """Per-layer paged KV tensors on `device`, random from `seed` (or poisoned with 0xAB when None)."""
    shape = (a.num_blocks, a.block_size, a.kv_heads, 2 * a.head_size)
    layers = []
    for layer in range(a.layers):
        if seed is None:
            t = torch.full(shape, 0, dtype=torch.int16, device=f"cuda:{device}").fill_(-21589)  # 0xABAB
        else:
            g = torch.Generator(device=f"cuda:{device}").manual_seed(seed * 1000 + layer)
            t = torch.randint(-32768, 32767, shape, dtype=torch.int16, device=f"cuda:{device}", generator=g)
        layers.append(t.view(torch.bfloat16))
    torch.cuda.synchronize(device)
    return layers


def block_geometry(t) -> tuple[int, int]:
    """(block stride bytes, block bytes) read from the tensor, never assumed."""
    stride = t.stride(0) * t.element_size()
    nbytes = t[0].numel() * t.element_size()
    if not t[0].is_contiguous():
        raise SystemExit("a KV block is not contiguous in this layout: copy per contiguous chunk instead")
    return stride, nbytes


def plan(a: argparse.Namespace, n: int, rep: int):
    import numpy as np

    rng = np.random.default_rng(1000 * n + rep)
    return rng.choice(a.num_blocks, n, replace=False), rng.choice(a.num_blocks, n, replace=False)


def receiver(a: argparse.Namespace) -> None:
    import torch

    from kvbm.transfer import TransferEngine

    torch.cuda.set_device(a.dst_device)
    eng = TransferEngine("decode", transports=TLS, net_devices="lo", error_handling=False, progress=a.progress)
    kv = make_kv(torch, a.dst_device, a, None)
    for t in kv:
        eng.register(t.data_ptr(), t.numel() * t.element_size(), memory="cuda")
    _, port = eng.listen()
    print(f"PORT {port}", flush=True)
    ref = None
    peers = {}  # sender engine name -> Peer (one sender engine per path)
    bad = 0
    while True:
        if not eng.wait_notification(60):
            print("RECEIVER timeout waiting for a handoff", flush=True)
            return
        for note in eng.notifications():
            parts = note.message.decode().split()
            peer = peers.get(note.sender)
            if parts[0] == "quit":
                print(f"RECEIVER done bad={bad}", flush=True)
                eng.close()
                return
            if parts[0] == "hello":
                peers[note.sender] = eng.connect("127.0.0.1", int(parts[1]))
                continue
            if parts[0] == "ping":  # latency probe: answer at once
                peer.notify(b"pong " + parts[1].encode()).wait(10)
                continue
            if parts[0] == "check":  # verify the last handoff of n blocks, rep r
                n, rep = int(parts[1]), int(parts[2])
                if ref is None:
                    ref = make_kv(torch, a.dst_device, a, a.seed)  # process 0's data, regenerated here
                s_ids, d_ids = plan(a, n, rep)
                s_t = torch.as_tensor(s_ids, device=f"cuda:{a.dst_device}")
                d_t = torch.as_tensor(d_ids, device=f"cuda:{a.dst_device}")
                ok = all(torch.equal(kv[i].index_select(0, d_t).view(torch.int16),
                                     ref[i].index_select(0, s_t).view(torch.int16)) for i in range(a.layers))
                bad += 0 if ok else 1
                peer.notify(f"checked {n} {rep} {int(ok)}".encode()).wait(10)
                for t in kv:  # poison again for the next check
                    t.view(torch.int16).fill_(-21589)
                torch.cuda.synchronize()


class PathRunner:
    """One sender engine (the CUDA IPC path on or off) connected to the receiver."""

    def __init__(self, a: argparse.Namespace, path: str, kv, rx_port: int) -> None:
        from kvbm.transfer import TransferEngine

        self.a, self.path = a, path
        self.eng = TransferEngine(f"prefill-{path}", transports=TLS, net_devices="lo", error_handling=False,
                                  progress=a.progress, cuda_ipc=path == "cuda_ipc")
        regs = [self.eng.register(t.data_ptr(), t.numel() * t.element_size(), memory="cuda") for t in kv]
        if path == "cuda_ipc" and not all(r.ipc for r in regs):
            print(f"note: local KV not exported for CUDA IPC ({regs[0].ipc_note})", flush=True)
        _, my_port = self.eng.listen()
        self.peer = self.eng.connect("127.0.0.1", rx_port)
        self.peer.notify(f"hello {my_port}".encode()).wait(10)
        # Metadata lists regions in registration order: the receiver's layer i is remote_regions[i].
        self.remote_bases = [r.addr for r in self.peer.remote_regions]
        if len(self.remote_bases) != a.layers:
            raise SystemExit(f"receiver registered {len(self.remote_bases)} regions, expected {a.layers}")
        self.local_bases = [r.addr for r in regs]
        self.stride, self.chunk = block_geometry(kv[0])
        self.paths_used: set[str] = set()

    def wait_note(self, prefix: str, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.eng.wait_notification(0.5)
            for note in self.eng.notifications():
                parts = note.message.decode().split()
                if parts[0] == prefix:
                    return parts
        raise SystemExit(f"no '{prefix}' notification from the receiver")

    def addrs(self, n: int, rep: int):
        import numpy as np

        s_ids, d_ids = plan(self.a, n, rep)
        st = np.uint64(self.stride)
        loc = np.concatenate([np.uint64(b) + s_ids.astype(np.uint64) * st for b in self.local_bases])
        rem = np.concatenate([np.uint64(b) + d_ids.astype(np.uint64) * st for b in self.remote_bases])
        return loc, rem

    def put(self, n: int, rep: int, notify: bytes | None = None, timeout: float = 60.0) -> None:
        loc, rem = self.addrs(n, rep)
        h = self.peer.put(loc, rem, self.chunk, notify=notify)
        h.wait(timeout)
        self.paths_used.add("cuda_ipc" if h.cuda_ipc else "ucx")

    def handoff(self, n: int) -> float:
        """Median seconds of one handoff of n blocks, after one handoff checked byte for byte."""
        self.put(n, 0, notify=f"check {n} 0".encode())
        checked = self.wait_note("checked")
        if checked[3] != "1":
            raise SystemExit(f"{self.path}: handoff of {n} blocks was not byte-exact")
        times = []
        for rep in range(self.a.reps):
            t0 = time.perf_counter()
            self.put(n, rep + 1)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def latency(self) -> dict:
        """One handoff (1 block, all layers): post -> complete at the receiver, and the round trip
        with the receiver seeing the notification and answering."""
        one, rtt = [], []
        for rep in range(self.a.reps):
            t0 = time.perf_counter()
            self.put(1, rep + 100, notify=f"ping {rep}".encode(), timeout=30)
            t1 = time.perf_counter()
            self.wait_note("pong")
            t2 = time.perf_counter()
            one.append(t1 - t0)
            rtt.append(t2 - t0)
        return {"path": self.path, "blocks": 1, "bytes": self.a.layers * self.chunk,
                "post_to_complete_us": statistics.median(one) * 1e6,
                "round_trip_with_notification_us": statistics.median(rtt) * 1e6}


def baselines(torch, a: argparse.Namespace, kv, n: int, nbytes: int) -> dict:
    """Seconds of a contiguous device copy of the same bytes and of torch's gather/scatter of the
    same chunks between the two devices (CUDA events, medians), in this process."""
    src_flat = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{a.src_device}").random_(0, 255)
    dst_flat = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{a.dst_device}")
    dst_kv = [torch.empty_like(t, device=f"cuda:{a.dst_device}") for t in kv]
    s_ids, d_ids = plan(a, n, 1)
    s_t = torch.as_tensor(s_ids, device=f"cuda:{a.src_device}")
    d_t = torch.as_tensor(d_ids, device=f"cuda:{a.dst_device}")

    def p2p() -> None:
        dst_flat.copy_(src_flat, non_blocking=True)

    def scatter() -> None:
        for i in range(a.layers):
            dst_kv[i].index_copy_(0, d_t, kv[i].index_select(0, s_t).to(f"cuda:{a.dst_device}", non_blocking=True))

    base = {}
    for name, fn in (("p2p_copy", p2p), ("torch_gather_scatter", scatter)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize(a.src_device)
        torch.cuda.synchronize(a.dst_device)
        ts = []
        for _ in range(a.reps):
            ev0 = torch.cuda.Event(enable_timing=True)
            ev1 = torch.cuda.Event(enable_timing=True)
            ev0.record()
            fn()
            ev1.record()
            torch.cuda.synchronize(a.src_device)
            torch.cuda.synchronize(a.dst_device)
            ts.append(ev0.elapsed_time(ev1) / 1e3)
        base[name] = statistics.median(ts)
    return base


def sender(a: argparse.Namespace) -> None:
    import torch

    torch.cuda.set_device(a.src_device)
    paths = [p for p in a.paths.split(",") if p]
    if not paths or any(p not in PATHS for p in paths):
        raise SystemExit(f"--paths: a comma-separated subset of {','.join(PATHS)}, got {a.paths!r}")
    rx = subprocess.Popen([sys.executable, __file__, "--role", "receiver", *sys.argv[1:]], stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ))
    line = rx.stdout.readline()
    if not line.startswith("PORT "):
        raise SystemExit(f"receiver did not start: {line!r}")
    kv = make_kv(torch, a.src_device, a, a.seed)
    runners = [PathRunner(a, p, kv, int(line.split()[1])) for p in paths]
    chunk = runners[0].chunk
    results = {"handoff": [], "latency": []}
    for n in COUNTS:
        nbytes = n * a.layers * chunk
        measured = {r.path: r.handoff(n) for r in runners}
        base = baselines(torch, a, kv, n, nbytes)
        for r in runners:
            med = measured[r.path]
            row = {
                "path": r.path, "path_used": ",".join(sorted(r.paths_used)),
                "blocks": n, "layers": a.layers, "chunk_bytes": chunk, "bytes": nbytes, "ops": n * a.layers,
                "kvbm_s": med, "kvbm_GBps": nbytes / med / 1e9,
                "p2p_copy_GBps": nbytes / base["p2p_copy"] / 1e9,
                "torch_gather_scatter_GBps": nbytes / base["torch_gather_scatter"] / 1e9,
            }
            row["kvbm_vs_p2p_copy"] = row["kvbm_GBps"] / row["p2p_copy_GBps"]
            results["handoff"].append(row)
            print(json.dumps(row), flush=True)
    for r in runners:
        results["latency"].append(r.latency())
        print(json.dumps(results["latency"][-1]), flush=True)
    runners[0].peer.notify(b"quit").wait(10)
    out, _ = rx.communicate(timeout=60)
    print(out.strip(), flush=True)
    if "bad=0" not in out:
        raise SystemExit("receiver reported blocks that were not byte-exact")
    for r in runners:
        r.eng.close()
    print("| path (used) | blocks | bytes | kvbm GB/s | contiguous copy GB/s | kvbm / copy |")
    print("|---|---|---|---|---|---|")
    for row in results["handoff"]:
        print(f"| {row['path']} ({row['path_used']}) | {row['blocks']} | {row['bytes'] >> 10} KiB | "
              f"{row['kvbm_GBps']:.2f} | {row['p2p_copy_GBps']:.1f} | {row['kvbm_vs_p2p_copy']:.4f} |")
    results["meta"] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "devices": [torch.cuda.get_device_name(a.src_device), torch.cuda.get_device_name(a.dst_device)],
        "src_device": a.src_device, "dst_device": a.dst_device, "host": platform.node(), "ucx_tls": TLS,
        "paths": paths, "progress": a.progress,
        "kv": {"layers": a.layers, "num_blocks": a.num_blocks, "block_size": a.block_size,
               "kv_heads": a.kv_heads, "head_size": a.head_size, "dtype": "bfloat16"},
    }
    if a.out:
        Path(a.out + ".json").write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="sender")
    ap.add_argument("--src-device", type=int, default=0)
    ap.add_argument("--dst-device", type=int, default=0)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--progress", default="thread", choices=["thread", "caller"])
    ap.add_argument("--paths", default=",".join(PATHS), help="rows to measure: cuda_ipc, ucx or both (default)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.num_blocks < max(COUNTS):
        raise SystemExit(f"--num-blocks must be >= {max(COUNTS)}")
    (receiver if a.role == "receiver" else sender)(a)


if __name__ == "__main__":
    main()
