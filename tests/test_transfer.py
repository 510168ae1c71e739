"""The UCX transfer engine: two processes over loopback, tcp and shared memory.

Byte-exact puts/gets of many block sets (checked on the receiving side by SHA-256 of its buffer),
notifications after data, peer killed mid-transfer (error within a bounded time, resources
released, the survivor keeps serving another peer), argument errors. Skipped with the reason
when UCX is not usable here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kvbm
from kvbm.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    KvbmError,
    PeerError,
    TransferTimeoutError,
    UnsupportedError,
)
from kvbm.transfer import TransferEngine, ucx_available

_OK, _WHY = ucx_available()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY or "UCX unavailable")

PEER = str(Path(__file__).with_name("transfer_peer.py"))
# tcp with endpoint error handling; shared memory needs error handling off (../shared/UCX.md).
MODES = {"tcp": dict(transports="tcp", error_handling=True), "sm": dict(transports="sm,tcp", error_handling=False)}


def _env() -> dict:
    env = dict(os.environ)
    env["UCX_NET_DEVICES"] = "lo"
    env["UCX_WARN_UNUSED_ENV_VARS"] = "n"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class PeerProc:
    """A tests/transfer_peer.py process; `mirror` tracks what its buffer must hold."""

    def __init__(self, name: str, mode: str, size: int, seed: int, progress: str = "thread") -> None:
        m = MODES[mode]
        self.proc = subprocess.Popen(
            [sys.executable, PEER, "--name", name, "--transports", m["transports"], "--error-handling",
             str(int(m["error_handling"])), "--size", str(size), "--seed", str(seed), "--progress", progress],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env(), text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), f"peer did not start: {line!r}"
        self.port = int(line.split()[1])
        self.mirror = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)

    def digest(self, tag: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            parts = line.split()
            if parts[:2] == ["DIGEST", tag]:
                return parts[2]
        raise AssertionError(f"no digest {tag} from the peer")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _engine(name: str, mode: str, progress: str = "thread") -> TransferEngine:
    m = MODES[mode]
    return TransferEngine(name, transports=m["transports"], net_devices="lo",
                          error_handling=m["error_handling"], progress=progress)


def _run_block_sets(eng: TransferEngine, peer_proc: PeerProc, rounds: int, rng: np.random.Generator) -> int:
    """Many rounds of random block sets put (with a notification) and read back with get."""
    size = peer_proc.mirror.size
    src = rng.integers(0, 256, size, dtype=np.uint8)
    back = np.zeros(size, dtype=np.uint8)
    rs = eng.register(src)
    rb = eng.register(back)
    peer = eng.connect("127.0.0.1", peer_proc.port)
    (remote,) = peer.remote_regions
    moved = 0
    try:
        for rnd in range(rounds):
            block = int(rng.choice([512, 4096, 65536, 3000]))  # 3000: not a power of two
            nblocks = size // block
            n = int(rng.integers(1, min(nblocks, 300) + 1))
            src_ids = rng.choice(nblocks, n, replace=False)
            dst_ids = rng.choice(nblocks, n, replace=False)
            src[:] = rng.integers(0, 256, size, dtype=np.uint8)
            note = f"digest 0 {size} r{rnd}".encode()
            h = peer.put_blocks(rs.addr, src_ids, remote.addr, dst_ids, block, notify=note)
            h.wait(20)
            assert h.nbytes == n * block and h.count == n
            for s, d in zip(src_ids, dst_ids):
                peer_proc.mirror[d * block : (d + 1) * block] = src[s * block : (s + 1) * block]
            # The notification is sent after the data is complete: the digest already sees it.
            assert peer_proc.digest(f"r{rnd}") == hashlib.sha256(peer_proc.mirror.tobytes()).hexdigest()
            # Read a different random set back (scattered into `back`) and compare.
            k = int(rng.integers(1, min(nblocks, 300) + 1))
            from_ids = rng.choice(nblocks, k, replace=False)
            into_ids = rng.choice(nblocks, k, replace=False)
            back[:] = 0
            peer.get_blocks(rb.addr, into_ids, remote.addr, from_ids, block).wait(20)
            for f, t in zip(from_ids, into_ids):
                assert np.array_equal(back[t * block : (t + 1) * block], peer_proc.mirror[f * block : (f + 1) * block])
            moved += (n + k) * block
    finally:
        peer.close()
    return moved


@pytest.mark.parametrize("mode", ["tcp", "sm"])
def test_many_block_sets_byte_exact(mode: str) -> None:
    rng = np.random.default_rng(1)
    peer_proc = PeerProc("server", mode, size=4 << 20, seed=7)
    try:
        with _engine("client", mode) as eng:
            moved = _run_block_sets(eng, peer_proc, rounds=12, rng=rng)
            assert moved > 0
    finally:
        peer_proc.stop()


def test_caller_progress_mode_both_sides() -> None:
    rng = np.random.default_rng(2)
    peer_proc = PeerProc("server", "tcp", size=1 << 20, seed=3, progress="caller")
    try:
        with _engine("client", "tcp", progress="caller") as eng:
            _run_block_sets(eng, peer_proc, rounds=4, rng=rng)
    finally:
        peer_proc.stop()


def test_peer_killed_mid_transfer_then_survivor_serves_another() -> None:
    size = 64 << 20
    victim = PeerProc("victim", "tcp", size=size, seed=11)
    other = PeerProc("other", "tcp", size=1 << 20, seed=12)
    try:
        with _engine("client", "tcp") as eng:
            src = np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8)
            rs = eng.register(src)
            peer = eng.connect("127.0.0.1", victim.port)
            (remote,) = peer.remote_regions
            block = 64 << 10
            ids = np.arange(size // block)
            handles = [peer.put_blocks(rs.addr, ids, remote.addr, ids[::-1], block) for _ in range(16)]
            victim.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            errors = 0
            for h in handles:
                try:
                    h.wait(10)
                except PeerError:
                    errors += 1
                except TransferTimeoutError:
                    pytest.fail("a transfer to a killed peer hung until the timeout instead of failing")
            elapsed = time.monotonic() - killed_at
            assert errors >= 1, "1 GiB queued to a peer killed at once: some of it must fail"
            assert elapsed < 10, f"errors surfaced after {elapsed:.1f} s"
            # What the engine held for that peer is released, and the peer refuses new work.
            deadline = time.monotonic() + 5
            while not peer.failed and time.monotonic() < deadline:
                time.sleep(0.01)
            assert peer.failed and peer.num_remote_keys == 0
            with pytest.raises(PeerError):
                peer.put_blocks(rs.addr, [0], remote.addr, [0], block)
            with pytest.raises(PeerError):
                peer.check()
            # The survivor still serves another peer, byte-exact.
            _run_block_sets(eng, other, rounds=3, rng=np.random.default_rng(6))
    finally:
        victim.stop()
        other.stop()


_FLOODER = """
import sys, numpy as np
from kvbm.transfer import TransferEngine
eng = TransferEngine("flooder", transports="tcp", net_devices="lo")
src = np.ones(32 << 20, np.uint8); r = eng.register(src)
peer = eng.connect("127.0.0.1", int(sys.argv[1])); dst = peer.remote_regions[0]
print("FLOODING", flush=True)
while True:
    hs = [peer.put(r.addr, dst.addr, dst.length) for _ in range(4)]
    for h in hs:
        h.wait(30)
"""


@pytest.mark.xfail(
    strict=False,
    reason="UCX 1.21 (PyPI) aborts the *target* process about half the time here when its initiator dies with "
    "tcp puts still in the target's socket buffer: ucp_put_handler -> software-RMA ack on the failed endpoint -> "
    "ucs_fatal('unexpected error: Endpoint timeout') in ucp_request.inl:319 (backtrace in docs/transfer.md). "
    "The initiator-side failure handling is tested above; the target side needs an AM-based tcp path or a UCX fix.",
)
def test_initiator_killed_mid_transfer_target_keeps_serving() -> None:
    target = PeerProc("target", "tcp", size=32 << 20, seed=13)
    try:
        flooder = subprocess.Popen([sys.executable, "-c", _FLOODER, str(target.port)], stdout=subprocess.PIPE,
                                   env=_env(), text=True)
        assert flooder.stdout.readline().strip() == "FLOODING"
        time.sleep(0.3)
        flooder.send_signal(signal.SIGKILL)
        flooder.wait(10)
        assert target.proc.poll() is None, "the target died with its initiator"
        # The flooder's writes left the target buffer in an unknown state: track it from a fresh fill.
        with _engine("client", "tcp") as eng:
            fill = np.random.default_rng(4).integers(0, 256, target.mirror.size, dtype=np.uint8)
            rf = eng.register(fill)
            peer = eng.connect("127.0.0.1", target.port)
            peer.put(rf.addr, peer.remote_regions[0].addr, fill.nbytes).wait(20)
            peer.close()
            target.mirror[:] = fill
            eng.deregister(rf)
            _run_block_sets(eng, target, rounds=3, rng=np.random.default_rng(8))
    finally:
        target.stop()


def test_in_process_pair_errors_and_notifications() -> None:
    with _engine("a", "tcp") as a, _engine("b", "tcp") as b:
        x = np.arange(1 << 16, dtype=np.uint8)
        y = np.zeros(1 << 16, dtype=np.uint8)
        rx = a.register(x)
        with pytest.raises(AlreadyExistsError):
            a.register(rx.addr + 16, 64)
        ry = b.register(y)
        peer = a.add_peer(b.metadata())
        assert peer.name == "b" and peer.remote_regions[0].length == y.nbytes
        # Out-of-range requests post nothing and name the entry.
        with pytest.raises(InvalidArgumentError, match=r"remote\[1\]"):
            peer.put([rx.addr, rx.addr], [ry.addr, ry.addr + y.nbytes - 8], 16)
        with pytest.raises(InvalidArgumentError, match=r"local\[0\]"):
            peer.put([rx.addr + x.nbytes], [ry.addr], 1)
        with pytest.raises(InvalidArgumentError, match="lengths"):
            peer.put([rx.addr, rx.addr], [ry.addr, ry.addr], [1, 2, 3])
        with pytest.raises(InvalidArgumentError, match="4096"):
            peer.notify(b"x" * 5000)
        with pytest.raises(InvalidArgumentError, match="malformed"):
            a.add_peer(b"KVBMX1garbage")
        # A handle, then a notification after it, then flush.
        h = peer.put(rx.addr, ry.addr, x.nbytes, notify=b"done-1")
        h.wait(5)
        assert h.test() and h.done and h.error is None
        assert b.wait_notification(5)
        (note,) = b.notifications()
        assert note.sender == "a" and note.message == b"done-1"
        assert np.array_equal(x, y)
        # Runs of consecutive blocks (merged into one operation natively) mixed with scattered ones.
        blk = 1024
        src_ids, dst_ids = [0, 1, 2, 5, 6, 9, 3, 4], [10, 11, 12, 20, 21, 30, 13, 40]
        x[:] = np.random.default_rng(0).integers(0, 256, x.size, dtype=np.uint8)
        y[:] = 0
        peer.put_blocks(rx.addr, src_ids, ry.addr, dst_ids, blk).wait(5)
        want = np.zeros_like(y)
        for s_, d_ in zip(src_ids, dst_ids):
            want[d_ * blk : (d_ + 1) * blk] = x[s_ * blk : (s_ + 1) * blk]
        assert np.array_equal(y, want)
        peer.flush().wait(5)
        peer.notify(b"ping").wait(5)
        assert b.wait_notification(5) and b.notifications()[0].message == b"ping"
        assert not b.wait_notification(0.05)
        peer.close()
        with pytest.raises(PeerError):
            peer.put(rx.addr, ry.addr, 8)
        b.deregister(ry)
        assert b.regions == []
    with pytest.raises(KvbmError):
        a.register(x)


def test_unavailable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvbm.transfer as t

    monkeypatch.setattr(t._native, "ucx_compiled", False)
    with pytest.raises(UnsupportedError, match="KVBM_UCX=OFF"):
        TransferEngine("x")


def test_build_reports_ucx() -> None:
    assert kvbm.build_info()["ucx_compiled"] is True


# ---- CUDA IPC path: what runs without a GPU (GPU cases in test_transfer_cuda_ipc_gpu.py) ----
def _with_ipc(eng: TransferEngine, region, ipc: bytes) -> bytes:
    """eng's metadata with `region` described as exported for CUDA IPC by descriptor `ipc`."""
    eng._regions[region.id] = dataclasses.replace(region, ipc=ipc)
    return eng.metadata()


def test_cuda_ipc_metadata_round_trip_and_path_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvbm import _native

    with _engine("a", "tcp") as a, _engine("b", "tcp") as b:
        x = np.random.default_rng(4).integers(0, 256, 1 << 16, dtype=np.uint8)
        y, z = np.zeros(1 << 16, dtype=np.uint8), np.zeros(1 << 16, dtype=np.uint8)
        rx, ry, rz = a.register(x), b.register(y), b.register(z)
        assert rx.ipc == b"" and rx.memory == "host"  # host memory is never exported
        # Without descriptors: the round trip keeps every region, none IPC-capable.
        name, _, regions = TransferEngine.parse_metadata(b.metadata())
        assert name == "b" and [(r.addr, r.length, r.cuda_ipc) for r, _ in regions] == [
            (ry.addr, ry.length, False), (rz.addr, rz.length, False)]
        # y exported from this host (by another process), z from another host.
        same = _native._cuda_ipc_descriptor(b"h" * 64, offset=4096)
        other = _native._cuda_ipc_descriptor(b"h" * 64, host="some-other-boot-id/elsewhere")
        _with_ipc(b, ry, same)
        md = _with_ipc(b, rz, other)
        _, _, regions = TransferEngine.parse_metadata(md)
        assert [(r.ipc, k) for r, k in regions] == [(same, ry.rkey), (other, rz.rkey)]
        peer = a.add_peer(md)
        states = peer.cuda_ipc_states()
        assert states == {ry.addr: "not mapped", rz.addr: "other host"}, states
        assert peer.cuda_ipc == a.cuda_ipc  # only an engine that runs the path may use it
        # Host memory never takes the IPC path, whatever the remote side exported; bytes exact.
        h = peer.put([rx.addr, rx.addr + 4096], [ry.addr + 8192, rz.addr], [4096, 1024], notify=b"mixed")
        h.wait(10)
        assert not h.cuda_ipc
        assert np.array_equal(y[8192:12288], x[:4096]) and np.array_equal(z[:1024], x[4096:5120])
        assert b.wait_notification(5) and b.notifications()[0].message == b"mixed"
        assert peer.cuda_ipc_states()[ry.addr] == "not mapped"  # nothing was mapped for it
        # A flush after it and a bad remote range behave as on UCX.
        peer.flush().wait(5)
        with pytest.raises(InvalidArgumentError, match=r"remote\[0\]"):
            peer.put(rx.addr, ry.addr + y.nbytes - 8, 16)
        peer.close()
        # Malformed descriptors are refused when the peer is added.
        for bad in (b"junk", _native._cuda_ipc_descriptor(b"h" * 63), same + b"x"):
            with pytest.raises(InvalidArgumentError, match="CUDA IPC descriptor"):
                a.add_peer(_with_ipc(b, ry, bad))
        # Metadata of the previous version (no descriptors) is still read.
        v1 = _v1_metadata(b)
        _, _, regions = TransferEngine.parse_metadata(v1)
        assert [r.cuda_ipc for r, _ in regions] == [False, False]
        a.add_peer(v1).close()
        # The switch: option and environment.
        monkeypatch.setenv("KVBM_TRANSFER_CUDA_IPC", "0")
        with _engine("c", "tcp") as c:
            assert c.cuda_ipc is False
        monkeypatch.delenv("KVBM_TRANSFER_CUDA_IPC")
        with TransferEngine("d", transports="tcp", net_devices="lo", cuda_ipc=False) as d:
            assert d.cuda_ipc is False
        assert a.cuda_ipc == kvbm.build_info()["cuda_available"]


def _v1_metadata(eng: TransferEngine) -> bytes:
    name, addr = eng.name.encode(), eng.address
    out = [b"KVBMX1", struct.pack("<B", len(name)), name, struct.pack("<I", len(addr)), addr,
           struct.pack("<I", len(eng.regions))]
    for r in eng.regions:
        out += [struct.pack("<QQBI", r.addr, r.length, 0, len(r.rkey)), r.rkey]
    return b"".join(out)


# ---- GPU memory (cuda_ipc between two processes on one GPU; GPU -> another process's host) ----
GPU_TLS = "cuda_ipc,cuda_copy,sm,tcp"


def _cuda_peer(name: str, size: int, seed: int, cuda: bool, extra: tuple[str, ...] = (),
               env_extra: dict | None = None) -> PeerProc:
    """A transfer_peer.py process on the GPU transports (`extra` arguments, `env_extra` variables)."""
    p = PeerProc.__new__(PeerProc)
    env = _env()
    env["UCX_TLS"] = GPU_TLS
    env.update(env_extra or {})
    args = [sys.executable, PEER, "--name", name, "--transports", GPU_TLS, "--error-handling", "0", "--size",
            str(size), "--seed", str(seed)] + (["--cuda"] if cuda else []) + list(extra)
    p.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    line = p.proc.stdout.readline()
    assert line.startswith("PORT "), f"peer did not start: {line!r}"
    p.port = int(line.split()[1])
    p.mirror = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    return p


@pytest.mark.gpu
@pytest.mark.parametrize("remote_cuda", [True, False], ids=["gpu_to_gpu_cuda_ipc", "gpu_to_remote_host"])
@pytest.mark.parametrize("progress", ["thread", "caller"])
def test_gpu_memory_two_processes(remote_cuda: bool, progress: str) -> None:
    torch = pytest.importorskip("torch")
    size = 8 << 20
    peer_proc = _cuda_peer("gpu-server", size, seed=21, cuda=remote_cuda)
    try:
        with TransferEngine("gpu-client", transports=GPU_TLS, net_devices="lo", error_handling=False,
                            progress=progress) as eng:
            gen = torch.Generator(device="cuda").manual_seed(5)
            src = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda", generator=gen)
            back = torch.zeros(size, dtype=torch.uint8, device="cuda")
            rs = eng.register(src.data_ptr(), size, memory="cuda")
            rb = eng.register(back.data_ptr(), size, memory="cuda")
            torch.cuda.synchronize()
            peer = eng.connect("127.0.0.1", peer_proc.port)
            (remote,) = peer.remote_regions
            assert remote.memory == ("cuda" if remote_cuda else "host")
            rng = np.random.default_rng(9)
            src_np = src.cpu().numpy()
            for rnd in range(4):
                block = int(rng.choice([4096, 65536, 1 << 20]))
                nb = size // block
                n = int(rng.integers(1, nb + 1))
                s_ids, d_ids = rng.choice(nb, n, replace=False), rng.choice(nb, n, replace=False)
                peer.put_blocks(rs.addr, s_ids, remote.addr, d_ids, block,
                                notify=f"digest 0 {size} g{rnd}".encode()).wait(30)
                for s, d in zip(s_ids, d_ids):
                    peer_proc.mirror[d * block : (d + 1) * block] = src_np[s * block : (s + 1) * block]
                assert peer_proc.digest(f"g{rnd}") == hashlib.sha256(peer_proc.mirror.tobytes()).hexdigest()
                back.zero_()
                torch.cuda.synchronize()
                peer.get_blocks(rb.addr, d_ids, remote.addr, d_ids, block).wait(30)
                got = back.cpu().numpy()
                for d in d_ids:
                    sl = slice(d * block, (d + 1) * block)
                    assert np.array_equal(got[sl], peer_proc.mirror[sl])
            peer.close()
    finally:
        peer_proc.stop()
