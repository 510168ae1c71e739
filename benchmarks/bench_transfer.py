"""Host -> host transfer bandwidth, two processes on loopback: kvbm's engine vs raw UCX
(`ucx_perftest` ucp_put_bw) vs NIXL (nixl-cu13), tcp and shared memory, in one run.

A row is a batch of S bytes (64 KiB, 1 MiB, 16 MiB) made of blocks of --block bytes scattered to
random block slots of the target's buffer (kvbm and NIXL: one request per batch, waited before
the next; perftest: S-byte contiguous puts with its default window of 32 in flight, the raw
ceiling). Each method runs in its own processes (one UCX copy per process); trials interleave
the methods so that the shared machine's noise hits all of them alike; medians are reported.

    python benchmarks/bench_transfer.py --out benchmarks/results/transfer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvbm.bench.provenance import git_commit

SIZES = [64 << 10, 1 << 20, 16 << 20]
MODES = {
    "tcp": {"tls": "tcp", "error_handling": True},
    "sm": {"tls": "sm,tcp", "error_handling": False},
    "tcp-noeh": {"tls": "tcp", "error_handling": False},
}
BUF = 64 << 20
ALL_METHODS = ["kvbm", "kvbm_caller", "kvbm_window", "ucx_perftest", "nixl"]


def _env(mode: str) -> dict:
    env = dict(os.environ)
    env.update(UCX_NET_DEVICES="lo", UCX_TLS=MODES[mode]["tls"], UCX_WARN_UNUSED_ENV_VARS="n", PYTHONUNBUFFERED="1")
    return env


def _timed_loop(post_and_wait, nbytes: int, min_time: float, min_iters: int) -> float:
    """MB/s (1e6 bytes/s) of back-to-back batches for at least min_time seconds."""
    for _ in range(3):
        post_and_wait()
    n, t0 = 0, time.perf_counter()
    while True:
        post_and_wait()
        n += 1
        dt = time.perf_counter() - t0
        if n >= min_iters and dt >= min_time:
            return nbytes * n / dt / 1e6


def _block_plan(size: int, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = max(1, size // block)
    src = rng.choice(BUF // block, n, replace=False).astype(np.uint64)
    dst = rng.choice(BUF // block, n, replace=False).astype(np.uint64)
    return src, dst


# ---- child roles -----------------------------------------------------------------------------
def role_kvbm_target(a: argparse.Namespace) -> None:
    from kvbm.transfer import TransferEngine

    m = MODES[a.mode]
    eng = TransferEngine("target", transports=m["tls"], net_devices="lo", error_handling=m["error_handling"],
                         spin_us=a.spin_us)
    buf = np.zeros(BUF, dtype=np.uint8)
    eng.register(buf)
    _, port = eng.listen()
    print(f"PORT {port}", flush=True)
    sys.stdin.read()
    eng.close()


def role_kvbm_initiator(a: argparse.Namespace) -> None:
    from kvbm.transfer import TransferEngine

    m = MODES[a.mode]
    eng = TransferEngine("initiator", transports=m["tls"], net_devices="lo", error_handling=m["error_handling"],
                         progress=a.progress, spin_us=a.spin_us)
    src = np.random.default_rng(0).integers(0, 256, BUF, dtype=np.uint8)
    rs = eng.register(src)
    peer = eng.connect("127.0.0.1", a.port)
    (remote,) = peer.remote_regions
    out = {}
    for size in SIZES:
        block = min(a.block, size)
        s_ids, d_ids = _block_plan(size, block, size)
        loc = np.uint64(rs.addr) + s_ids * np.uint64(block)
        rem = np.uint64(remote.addr) + d_ids * np.uint64(block)

        if a.window <= 1:

            def once(loc=loc, rem=rem, block=block) -> None:
                peer.put(loc, rem, block).wait(30)

            out[size] = _timed_loop(once, size, a.min_time, 5)
        else:  # keep `window` batches in flight, as ucx_perftest keeps a window of puts
            inflight: list = []

            def once(loc=loc, rem=rem, block=block, inflight=inflight) -> None:
                while len(inflight) >= a.window:
                    inflight.pop(0).wait(30)
                inflight.append(peer.put(loc, rem, block))

            out[size] = _timed_loop(once, size, a.min_time, 5)
            for h in inflight:
                h.wait(30)
    print("RESULT " + json.dumps(out), flush=True)
    peer.close()
    eng.close()


def _nixl_agent(name: str, mode: str):
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[]))
    params = {} if MODES[mode]["error_handling"] else {"ucx_error_handling_mode": "none"}
    agent.create_backend("UCX", params)
    return agent


def role_nixl_target(a: argparse.Namespace) -> None:
    agent = _nixl_agent("target", a.mode)
    buf = np.zeros(BUF, dtype=np.uint8)
    agent.register_memory([(buf.ctypes.data, BUF, 0, "")], "DRAM")
    Path(a.md).write_bytes(agent.get_agent_metadata())
    print(f"ADDR {buf.ctypes.data}", flush=True)
    while True:
        notes = agent.get_new_notifs()
        if any(b"quit" in m for msgs in notes.values() for m in msgs):
            break
    print("BYE", flush=True)


def role_nixl_initiator(a: argparse.Namespace) -> None:
    agent = _nixl_agent("initiator", a.mode)
    src = np.random.default_rng(0).integers(0, 256, BUF, dtype=np.uint8)
    agent.register_memory([(src.ctypes.data, BUF, 0, "")], "DRAM")
    remote = agent.add_remote_agent(Path(a.md).read_bytes())
    out = {}
    for size in SIZES:
        block = min(a.block, size)
        s_ids, d_ids = _block_plan(size, block, size)
        n = len(s_ids)
        ld = np.stack([src.ctypes.data + s_ids.astype(np.int64) * block, np.full(n, block), np.zeros(n)], 1)
        rd = np.stack([a.remote_addr + d_ids.astype(np.int64) * block, np.full(n, block), np.zeros(n)], 1)
        h = agent.initialize_xfer("WRITE", agent.get_xfer_descs(ld.astype(np.int64), "DRAM"),
                                  agent.get_xfer_descs(rd.astype(np.int64), "DRAM"), remote)

        def once(h=h) -> None:
            st = agent.transfer(h)
            while st == "PROC":
                st = agent.check_xfer_state(h)
            if st != "DONE":
                raise RuntimeError(f"NIXL transfer state {st}")

        # The first post also makes the connection.
        out[size] = _timed_loop(once, size, a.min_time, 5)
        h.release()
    agent.send_notif(remote, b"quit")
    t0 = time.time()
    while time.time() - t0 < 1:
        agent.get_new_notifs()
    print("RESULT " + json.dumps(out), flush=True)


# ---- orchestration ---------------------------------------------------------------------------
def _child(args: list[str], mode: str, **kw) -> subprocess.Popen:
    env = _env(mode)
    if args[1].startswith("nixl") and os.path.exists("/dev/nvidia0"):
        # NIXL's UCX backend refuses a UCX_TLS without a CUDA transport when a GPU is present;
        # cuda_copy plays no part in host-to-host transfers.
        env["UCX_TLS"] += ",cuda_copy"
    return subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, **kw)


def _result(p: subprocess.Popen, timeout: float = 300) -> dict:
    out, _ = p.communicate(timeout=timeout)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return {int(k): v for k, v in json.loads(line[7:]).items()}
    raise RuntimeError(f"child failed (rc={p.returncode}): {out[-2000:]}")


def run_kvbm(mode: str, a: argparse.Namespace, progress: str, spin_us: int = 200, window: int = 1) -> dict:
    t = _child(["--role", "kvbm-target", "--mode", mode, "--spin-us", str(spin_us)], mode)
    port = int(t.stdout.readline().split()[1])
    try:
        i = _child(["--role", "kvbm-initiator", "--mode", mode, "--port", str(port), "--block", str(a.block),
                    "--min-time", str(a.min_time), "--progress", progress, "--spin-us", str(spin_us),
                    "--window", str(window)], mode)
        return _result(i)
    finally:
        t.stdin.close()
        t.wait(30)


def run_nixl(mode: str, a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as d:
        md = os.path.join(d, "md")
        t = _child(["--role", "nixl-target", "--mode", mode, "--md", md], mode)
        line = t.stdout.readline()
        while line and not line.startswith("ADDR "):  # NIXL logs to stdout first
            line = t.stdout.readline()
        if not line:
            raise RuntimeError("NIXL target did not start")
        addr = int(line.split()[1])
        try:
            i = _child(["--role", "nixl-initiator", "--mode", mode, "--md", md, "--remote-addr", str(addr),
                        "--block", str(a.block), "--min-time", str(a.min_time)], mode)
            return _result(i)
        finally:
            try:
                t.wait(10)
            except subprocess.TimeoutExpired:
                t.kill()


def _perftest_bin() -> tuple[str, str]:
    import libucx

    d = os.path.dirname(libucx.__file__)
    return os.path.join(d, "bin", "ucx_perftest"), os.path.join(d, "lib")


def run_perftest(mode: str, a: argparse.Namespace, port: int) -> dict:
    exe, lib = _perftest_bin()
    env = _env(mode)
    env["LD_LIBRARY_PATH"] = lib + ":" + env.get("LD_LIBRARY_PATH", "")
    eflag = ["-e"] if MODES[mode]["error_handling"] else []
    out = {}
    for size in SIZES:
        iters = max(50, int(a.min_time * 4e9 / size))  # ~min_time at 4 GB/s
        srv = subprocess.Popen([exe, "-p", str(port), *eflag], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        try:
            r = subprocess.run([exe, "127.0.0.1", "-p", str(port), "-t", "ucp_put_bw", "-s", str(size), "-n",
                                str(iters), "-w", str(max(5, iters // 10)), "-f", *eflag],
                               env=env, capture_output=True, text=True, timeout=300)
        finally:
            try:
                srv.wait(10)
            except subprocess.TimeoutExpired:
                srv.kill()
        rows = [ln.split() for ln in r.stdout.splitlines() if re.match(r"^\s+\d+\s", ln)]
        if not rows:
            raise RuntimeError(f"ucx_perftest gave no result: {r.stdout[-1000:]} {r.stderr[-1000:]}")
        out[size] = float(rows[-1][5]) * 1.048576  # bandwidth "overall" column, MiB/s -> MB/s
        port += 1
    return out


def orchestrate(a: argparse.Namespace) -> None:
    methods = a.methods
    raw: dict = {m: {meth: {s: [] for s in SIZES} for meth in methods} for m in a.modes}
    port = 14100
    for trial in range(a.trials):
        for mode in a.modes:
            for meth in methods:
                if meth == "kvbm":
                    r = run_kvbm(mode, a, "thread")
                elif meth == "kvbm_caller":
                    r = run_kvbm(mode, a, "caller")
                elif meth == "kvbm_window":  # 8 batches in flight (perftest keeps 32 puts in flight)
                    r = run_kvbm(mode, a, "thread", window=8)
                elif meth == "nixl":
                    r = run_nixl(mode, a)
                else:
                    r = run_perftest(mode, a, port)
                    port += len(SIZES)
                for s, v in r.items():
                    raw[mode][meth][s].append(v)
                print(f"trial {trial} {mode:3s} {meth:12s} " + " ".join(f"{v:9.0f}" for v in r.values()), flush=True)
    if set(methods) != set(ALL_METHODS):
        return  # a subset (for experiments): the per-trial lines above are the output
    rows = []
    for mode in a.modes:
        for s in SIZES:
            med = {meth: statistics.median(raw[mode][meth][s]) for meth in methods}
            rows.append({
                "transport": mode, "batch_bytes": s, "block_bytes": min(a.block, s),
                "blocks": max(1, s // a.block), **{f"{k}_MBps": round(v, 1) for k, v in med.items()},
                "kvbm_vs_raw_ucx": round(med["kvbm"] / med["ucx_perftest"], 3),
                "kvbm_vs_nixl": round(med["kvbm"] / med["nixl"], 3),
                "kvbm_caller_vs_raw_ucx": round(med["kvbm_caller"] / med["ucx_perftest"], 3),
                "kvbm_caller_vs_nixl": round(med["kvbm_caller"] / med["nixl"], 3),
                "kvbm_window_vs_raw_ucx": round(med["kvbm_window"] / med["ucx_perftest"], 3),
                "kvbm_window_vs_nixl": round(med["kvbm_window"] / med["nixl"], 3),
                "trials": {meth: [round(v, 1) for v in raw[mode][meth][s]] for meth in methods},
            })
    commit = git_commit(short=True)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {os.cpu_count()} cores {platform.machine()}"
                   + (f" ({a.machine_note})" if a.machine_note else ""),
        "ucx": "libucx-cu13 1.21 (PyPI)", "nixl": "nixl-cu13 1.5.1", "trials": a.trials, "min_time_s": a.min_time,
        "notes": "MB/s = 1e6 bytes/s, medians over trials. kvbm: progress thread (spin_us 200) on both "
                 "sides; kvbm_caller: initiator progress='caller'; kvbm_window: progress thread, 8 "
                 "batches kept in flight (the others wait for each batch before posting the next; perftest keeps "
                 "a window of 32 puts in flight; NIXL runs without progress thread, polling). "
                 "tcp: endpoint error handling on for all three (perftest -e, NIXL's default "
                 "'peer'); sm (sm,tcp) and tcp-noeh: error handling off (NIXL ucx_error_handling_mode=none).",
    }
    result = {"meta": meta, "rows": rows}
    if a.out:
        Path(a.out + ".json").write_text(json.dumps(result, indent=1))
        Path(a.out + ".md").write_text(markdown(result))
    print(markdown(result))


def best(r: dict) -> float:
    return max(r["kvbm_MBps"], r["kvbm_caller_MBps"], r["kvbm_window_MBps"])


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        "# Transfer engine: host -> host, two processes, loopback",
        "",
        f"Command: `{m['command']}`  ",
        f"Commit: {m['git_commit']}; date: {m['date']}; machine: {m['machine']}; {m['ucx']}; {m['nixl']}.  ",
        f"{m['notes']} Trials: {m['trials']}.",
        "",
        "| transport | batch | blocks x size | kvbm | kvbm caller | kvbm 8 in flight | ucx_perftest | NIXL WRITE "
        "| kvbm / raw UCX | kvbm / NIXL | best kvbm / raw UCX | best kvbm / NIXL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        b = r["batch_bytes"]
        bs = f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"
        lines.append(
            f"| {r['transport']} | {bs} | {r['blocks']} x {r['block_bytes'] >> 10} KiB | {r['kvbm_MBps']:.0f} | "
            f"{r['kvbm_caller_MBps']:.0f} | {r['kvbm_window_MBps']:.0f} | {r['ucx_perftest_MBps']:.0f} | "
            f"{r['nixl_MBps']:.0f} | {r['kvbm_vs_raw_ucx']:.2f} | {r['kvbm_vs_nixl']:.2f} | "
            f"{best(r) / r['ucx_perftest_MBps']:.2f} | {best(r) / r['nixl_MBps']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="orchestrate")
    ap.add_argument("--mode", default="tcp")
    ap.add_argument("--modes", nargs="+", default=["tcp", "sm", "tcp-noeh"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--md", default="")
    ap.add_argument("--remote-addr", type=int, default=0)
    ap.add_argument("--block", type=int, default=16 << 10)
    ap.add_argument("--min-time", type=float, default=0.4)
    ap.add_argument("--progress", default="thread")
    ap.add_argument("--spin-us", type=int, default=200)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS,
                    help="subset to run (the table needs all five)")
    ap.add_argument("--machine-note", default="", help="e.g. 'shared, noisy' or 'idle'")
    a = ap.parse_args()
    {
        "orchestrate": orchestrate,
        "kvbm-target": role_kvbm_target,
        "kvbm-initiator": role_kvbm_initiator,
        "nixl-target": role_nixl_target,
        "nixl-initiator": role_nixl_initiator,
    }[a.role](a)


if __name__ == "__main__":
    main()
