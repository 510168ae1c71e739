"""The transfer engine's same-host CUDA IPC path on a GPU (Note [CUDA IPC path] in transfer/cuda_ipc.h).

A peer process (tests/transfer_peer.py --cuda --split: one GPU buffer registered as two regions
that share one CUDA allocation) receives random block sets from this process's GPU memory; the
oracle is the SHA-256 of its whole buffer, computed when the put's notification arrives, so a
match also proves that the notification came after the data. Cases: 1/64/1,024 blocks and
unaligned per-chunk lengths through the IPC path (put and get), the path switched off on either
side (UCX, still byte-exact), bad ranges (errors, nothing posted), several threads putting at
once, batches mixing host and GPU memory (UCX), two engines in one process, and an engine closed
with a copy in flight. Needs a GPU, a CUDA+UCX build of kvbm and a CUDA build of torch; CPU-side
logic is covered in test_transfer.py. Run with -s to see each case's path and bandwidth:

    python -m pytest -q -s tests/test_transfer_cuda_ipc_gpu.py
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest
from test_transfer import GPU_TLS, _cuda_peer

from kvbm import _native
from kvbm.errors import InvalidArgumentError, KvbmError, PeerError
from kvbm.transfer import TransferEngine, ucx_available

if not (_native.cuda_compiled() and _native.cuda_available()):
    pytest.skip("needs a CUDA GPU and a CUDA build of kvbm (KVBM_CUDA=ON): none here", allow_module_level=True)
torch = pytest.importorskip("torch", reason="needs torch (a CUDA build) to fill and read GPU buffers")

_UCX, _UCX_WHY = ucx_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _UCX, reason=f"needs kvbm built with UCX and the UCX libraries: {_UCX_WHY}"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU (a CPU-only torch build?)"),
]

BLOCK = 16 << 10  # bytes per block
NBLK = 2048  # blocks in the peer's buffer: its two regions hold 1,024 each
SIZE = BLOCK * NBLK


def _client(name: str = "ipc-client", **kw) -> TransferEngine:
    return TransferEngine(name, transports=GPU_TLS, net_devices="lo", error_handling=False, **kw)


@pytest.fixture
def server():
    p = _cuda_peer("ipc-server", SIZE, seed=31, cuda=True, extra=("--split",))
    yield p
    p.stop()


def _random_gpu(seed: int, nbytes: int = SIZE):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda", generator=g)
    torch.cuda.synchronize()
    return t


def _base(peer) -> int:
    """The peer's buffer start (its two regions are its halves, in order)."""
    regions = sorted(peer.remote_regions, key=lambda r: r.addr)
    assert len(regions) == 2 and regions[0].addr + regions[0].length == regions[1].addr
    return regions[0].addr


def _check(proc, tag: str) -> None:
    assert proc.digest(tag, timeout=60) == hashlib.sha256(proc.mirror.tobytes()).hexdigest(), f"{tag}: bytes differ"


def _put_blocks(peer, proc, src, src_np: np.ndarray, n: int, rng, tag: str) -> tuple[object, float]:
    """Put n random blocks to n random blocks with a digest notification; returns (handle, GB/s)."""
    s_ids, d_ids = rng.choice(NBLK, n, replace=False), rng.choice(NBLK, n, replace=False)
    t0 = time.perf_counter()
    h = peer.put_blocks(src.data_ptr(), s_ids, _base(peer), d_ids, BLOCK, notify=f"digest 0 {SIZE} {tag}".encode())
    h.wait(60)
    dt = time.perf_counter() - t0
    for s, d in zip(s_ids, d_ids):
        proc.mirror[d * BLOCK : (d + 1) * BLOCK] = src_np[s * BLOCK : (s + 1) * BLOCK]
    _check(proc, tag)
    return h, n * BLOCK / dt / 1e9


def test_two_processes_random_blocks_byte_exact(server) -> None:
    rng = np.random.default_rng(3)
    with _client() as eng:
        assert eng.cuda_ipc, "the engine should run the CUDA IPC path on a GPU"
        src = _random_gpu(5)
        back = torch.zeros(SIZE, dtype=torch.uint8, device="cuda")
        rs = eng.register(src.data_ptr(), SIZE, memory="cuda")
        rb = eng.register(back.data_ptr(), SIZE, memory="cuda")
        assert rs.ipc and rb.ipc, f"torch memory was not exported: {rs.ipc_note!r}"
        peer = eng.connect("127.0.0.1", server.port)
        assert all(r.cuda_ipc for r in peer.remote_regions), "the peer did not export its regions"
        assert peer.cuda_ipc and set(peer.cuda_ipc_states().values()) == {"not mapped"}
        src_np = src.cpu().numpy()
        for n in (1, 64, 1024):
            h, gbps = _put_blocks(peer, server, src, src_np, n, rng, f"p{n}")
            print(f"CUDA_IPC put {n} blocks x {BLOCK} B: path={'cuda_ipc' if h.cuda_ipc else 'ucx'} {gbps:.1f} GB/s")
            assert h.cuda_ipc and h.nbytes == n * BLOCK and h.count == n
        assert set(peer.cuda_ipc_states().values()) == {"mapped"}
        # Per-chunk lengths at odd addresses: narrower accesses and byte tails.
        offs = rng.choice(NBLK - 1, 40, replace=False)
        dsts = rng.choice(NBLK - 1, 40, replace=False)
        lens = rng.integers(1, BLOCK, 40).astype(np.uint64)
        loc = np.uint64(src.data_ptr()) + offs.astype(np.uint64) * np.uint64(BLOCK) + np.uint64(3)
        rem = np.uint64(_base(peer)) + dsts.astype(np.uint64) * np.uint64(BLOCK) + np.uint64(1)
        h = peer.put(loc, rem, lens, notify=f"digest 0 {SIZE} odd".encode())
        h.wait(30)
        assert h.cuda_ipc
        for o, d, ln in zip(offs, dsts, lens):
            a, b = int(o) * BLOCK + 3, int(d) * BLOCK + 1
            server.mirror[b : b + int(ln)] = src_np[a : a + int(ln)]
        _check(server, "odd")
        # get: the peer's blocks into ours, through the same mappings.
        from_ids, into_ids = rng.choice(NBLK, 1024, replace=False), rng.choice(NBLK, 1024, replace=False)
        t0 = time.perf_counter()
        h = peer.get_blocks(rb.addr, into_ids, _base(peer), from_ids, BLOCK)
        h.wait(30)
        gbps = 1024 * BLOCK / (time.perf_counter() - t0) / 1e9
        print(f"CUDA_IPC get 1024 blocks: path={'cuda_ipc' if h.cuda_ipc else 'ucx'} {gbps:.1f} GB/s")
        assert h.cuda_ipc
        got = back.cpu().numpy()
        for f, t in zip(from_ids, into_ids):
            assert np.array_equal(got[t * BLOCK : (t + 1) * BLOCK], server.mirror[f * BLOCK : (f + 1) * BLOCK])
        peer.flush().wait(10)
        peer.close()
        assert peer.cuda_ipc_states() == {} and not peer.cuda_ipc
        with pytest.raises(PeerError):
            peer.put(rs.addr, 0, 8)


@pytest.mark.parametrize("off", ["initiator", "receiver_env"])
def test_path_switched_off_stays_on_ucx_byte_exact(off: str) -> None:
    env = {"KVBM_TRANSFER_CUDA_IPC": "0"} if off == "receiver_env" else None
    proc = _cuda_peer("ipc-server", SIZE, seed=32, cuda=True, extra=("--split",), env_extra=env)
    try:
        with _client(cuda_ipc=off != "initiator") as eng:
            src = _random_gpu(6)
            eng.register(src.data_ptr(), SIZE, memory="cuda")
            peer = eng.connect("127.0.0.1", proc.port)
            assert not peer.cuda_ipc
            src_np, rng = src.cpu().numpy(), np.random.default_rng(4)
            for n in (1, 64, 1024):
                h, gbps = _put_blocks(peer, proc, src, src_np, n, rng, f"u{n}")
                path = "cuda_ipc" if h.cuda_ipc else "ucx"
                print(f"CUDA_IPC off ({off}) put {n} blocks: path={path} {gbps:.1f} GB/s")
                assert not h.cuda_ipc
            peer.close()
    finally:
        proc.stop()


def test_bad_ranges_are_errors_and_post_nothing(server) -> None:
    with _client() as eng:
        src = _random_gpu(7)
        rs = eng.register(src.data_ptr(), SIZE, memory="cuda")
        peer = eng.connect("127.0.0.1", server.port)
        base, half = _base(peer), SIZE // 2
        cases = [
            (rs.addr, base + SIZE - 8, 16, r"remote\[1\]"),  # past the peer's buffer
            (rs.addr, base + half - 8, 16, r"remote\[1\]"),  # across its two regions
            (rs.addr + SIZE - 4, base, 16, r"local\[1\]"),  # past ours
            (rs.addr, base, 0, r"lengths\[1\] is 0"),
        ]
        for loc, rem, ln, match in cases:
            with pytest.raises(InvalidArgumentError, match=match) as e:
                peer.put([rs.addr, loc], [base + 4096, rem], [64, ln])
            assert isinstance(e.value, KvbmError)
        # Nothing was posted, and the path still works.
        h, _ = _put_blocks(peer, server, src, src.cpu().numpy(), 8, np.random.default_rng(5), "after-bad")
        assert h.cuda_ipc
        peer.close()


def test_threads_putting_concurrently_to_distinct_blocks(server) -> None:
    threads_n, puts, per_put = 4, 6, 40
    with _client() as eng:
        src = _random_gpu(8)
        eng.register(src.data_ptr(), SIZE, memory="cuda")
        peer = eng.connect("127.0.0.1", server.port)
        base, src_np = _base(peer), src.cpu().numpy()
        dst = np.random.default_rng(6).permutation(NBLK)[: threads_n * puts * per_put].reshape(threads_n, puts, per_put)
        errors: list[BaseException] = []
        paths: list[bool] = []
        lock = threading.Lock()

        def worker(t: int) -> None:
            rng = np.random.default_rng(100 + t)
            try:
                handles = []
                for k in range(puts):
                    s_ids = rng.choice(NBLK, per_put, replace=False)
                    handles.append(peer.put_blocks(src.data_ptr(), s_ids, base, dst[t, k], BLOCK))
                    with lock:
                        for s, d in zip(s_ids, dst[t, k]):
                            server.mirror[d * BLOCK : (d + 1) * BLOCK] = src_np[s * BLOCK : (s + 1) * BLOCK]
                for h in handles:
                    h.wait(60)
                    with lock:
                        paths.append(h.cuda_ipc)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert not errors, errors
        assert paths == [True] * (threads_n * puts)
        peer.notify(f"digest 0 {SIZE} threads".encode()).wait(10)  # every put above was waited for
        _check(server, "threads")
        peer.close()


def test_mixed_host_and_gpu_batch_takes_ucx(server) -> None:
    with _client() as eng:
        src = _random_gpu(9)
        host = torch.randint(0, 256, (4 * BLOCK,), dtype=torch.uint8).pin_memory()
        rs = eng.register(src.data_ptr(), SIZE, memory="cuda")
        rh = eng.register(host.data_ptr(), host.numel(), memory="host")
        peer = eng.connect("127.0.0.1", server.port)
        base, src_np = _base(peer), src.cpu().numpy()
        h = peer.put([rs.addr + 5 * BLOCK, rh.addr], [base + 100 * BLOCK, base + 1500 * BLOCK], BLOCK,
                     notify=f"digest 0 {SIZE} mixed".encode())
        h.wait(30)
        assert not h.cuda_ipc
        server.mirror[100 * BLOCK : 101 * BLOCK] = src_np[5 * BLOCK : 6 * BLOCK]
        server.mirror[1500 * BLOCK : 1501 * BLOCK] = host[:BLOCK].numpy()
        _check(server, "mixed")
        peer.close()


def test_two_engines_in_one_process_same_device() -> None:
    with _client("a") as a, _client("b") as b:
        src, dst = _random_gpu(10, 64 * BLOCK), torch.zeros(64 * BLOCK, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        ra = a.register(src.data_ptr(), src.numel(), memory="cuda")
        rb = b.register(dst.data_ptr(), dst.numel(), memory="cuda")
        peer = a.add_peer(b.metadata())
        assert peer.cuda_ipc
        ids = np.random.default_rng(8).permutation(64)
        h = peer.put_blocks(ra.addr, ids, rb.addr, np.arange(64), BLOCK, notify=b"done")
        assert b.wait_notification(30)
        # The notification came after the data: read it now, without waiting on the handle.
        want = src.view(64, BLOCK)[torch.as_tensor(ids, device="cuda")]
        assert torch.equal(dst.view(64, BLOCK), want)
        h.wait(10)
        assert h.cuda_ipc and peer.cuda_ipc_states() == {rb.addr: "mapped"}
        peer.close()


def test_engine_closed_with_a_copy_in_flight() -> None:
    proc = _cuda_peer("ipc-server", SIZE, seed=33, cuda=True, extra=("--split",))
    try:
        eng = _client()
        src = _random_gpu(11)
        eng.register(src.data_ptr(), SIZE, memory="cuda")
        peer = eng.connect("127.0.0.1", proc.port)
        ids = np.random.default_rng(9).choice(NBLK, 1024, replace=False)
        h = peer.put_blocks(src.data_ptr(), ids, _base(peer), ids, BLOCK, notify=b"digest 0 16 late")
        eng.close()  # must neither hang nor crash; the handle finishes either way
        assert h.done
        assert h.error is None or "shut down" in h.error or "closed" in h.error, h.error
    finally:
        proc.stop()
