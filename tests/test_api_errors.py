"""Issue 12 findings 9, 10 and 12: bad arguments to the Python API, the config and the CLI are
KvbmErrors naming what was wrong (never a segfault, a pybind TypeError/RuntimeError/
OverflowError, a silent truncation, or a traceback from the CLI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import kvbm
from kvbm import BlockManager, KvbmConfig, Pointer
from kvbm.errors import ClosedError, ConfigError, InvalidArgumentError, KvbmError, TraceFormatError

BB = 256


def manager(**kw) -> BlockManager:
    return BlockManager(KvbmConfig(block_bytes=BB, host_capacity_bytes=BB * 16, **kw))


def keys(n: int, salt: int = 0) -> list[bytes]:
    return [bytes([salt, i]) * 8 for i in range(n)]


# ---- finding 9: ints as buffers ------------------------------------------------------------------
def test_int_buffers_do_not_crash_the_process() -> None:
    """Run where a segfault fails the test instead of killing pytest (it crashed before the fix)."""
    code = textwrap.dedent(
        """
        import numpy as np
        from kvbm import BlockManager, KvbmConfig
        from kvbm.errors import InvalidArgumentError
        m = BlockManager(KvbmConfig(block_bytes=256, host_capacity_bytes=256 * 16))
        h = [bytes([i]) * 16 for i in range(2)]
        m.store(h, np.zeros((2, 256), np.uint8))
        cases = [(m.store, 5, "data"), (m.store, True, "data"), (m.store, [4096, 8192], "data[0]"),
                 (m.store, 1 << 40, "data"), (m.load, 5, "out"), (m.load, [4096, 8192], "out[0]"),
                 (m.load, True, "out")]
        for j, (call, arg, name) in enumerate(cases):
            fresh = [bytes([j + 1, i]) * 8 for i in range(2)]  # store: new blocks, so bytes would be copied
            try:
                call(fresh if call == m.store else h, arg)
            except InvalidArgumentError as e:
                assert str(e).startswith(name + ":"), e
                assert "Pointer" in str(e) or "buffer" in str(e), e
            else:
                raise SystemExit(f"{call.__name__}({arg!r}) was accepted")
        print("ALL-REFUSED")
        """
    )
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ALL-REFUSED" in p.stdout, (p.returncode, p.stdout, p.stderr[-2000:])


def test_buffer_checks_name_the_argument() -> None:
    with manager() as m:
        h = keys(2)
        for bad, msg in [
            (np.zeros((2, BB), np.uint8)[:, ::2], "data: array must be C-contiguous"),
            (np.zeros((3, BB), np.uint8), "data: buffer has"),
            (np.zeros(2 * BB // 8, object), "data: an array of Python objects"),
            (memoryview(bytearray(4 * BB))[::2], "data: buffer must be C-contiguous"),
            ([np.zeros(BB, np.uint8)], "data: 1 buffers for 2 blocks"),
            ("x" * (2 * BB), "data: expected a buffer"),
        ]:
            with pytest.raises(InvalidArgumentError, match=msg.replace("(", r"\(")):
                m.store(h, bad)
        assert m.lookup(h).num_hits == 0  # nothing reserved by a refused store
        m.store(h, np.ones((2, BB), np.uint8))
        with pytest.raises(InvalidArgumentError, match="out: buffer must be writable"):
            m.load(h, bytes(2 * BB))
        ro = np.zeros((2, BB), np.uint8)
        ro.flags.writeable = False
        with pytest.raises(InvalidArgumentError, match="out: buffer must be writable"):
            m.load(h, ro)
        with pytest.raises(InvalidArgumentError, match="out: buffer must be writable"):
            m.load(h, Pointer(np.zeros(2 * BB, np.uint8).ctypes.data, 2 * BB, readonly=True))
        assert m.stats()["host"]["pinned_blocks"] == 0


def test_pointer_and_buffer_kinds_round_trip() -> None:
    rng = np.random.default_rng(5)
    with manager() as m:
        data = rng.integers(0, 256, (4, BB), dtype=np.uint8)
        src = data.copy()
        m.store(keys(4), Pointer(src.ctypes.data, src.nbytes, readonly=True))
        out = np.zeros_like(data)
        m.load(keys(4), Pointer(out.ctypes.data, out.nbytes))
        assert np.array_equal(out, data)
        ba = bytearray(4 * BB)
        m.load(keys(4), memoryview(ba))
        assert bytes(ba) == data.tobytes()
        rows = [bytearray(BB) for _ in range(4)]
        m.load(keys(4), rows)
        assert b"".join(rows) == data.tobytes()
        f32 = np.zeros((4, BB // 4), np.float32)  # any dtype: its bytes
        m.load(keys(4), f32)
        assert f32.tobytes() == data.tobytes()
        with pytest.raises(InvalidArgumentError, match="Pointer.address"):
            Pointer(0, 16)
        with pytest.raises(InvalidArgumentError, match="Pointer.nbytes"):
            Pointer(4096, -1)
        with pytest.raises(InvalidArgumentError, match="Pointer.address"):
            Pointer(1 << 64, 16)


def test_torch_cpu_tensors_are_buffers() -> None:
    torch = pytest.importorskip("torch")
    with manager() as m:
        t = torch.arange(2 * BB // 2, dtype=torch.bfloat16).reshape(2, BB // 2)
        m.store(keys(2), t)
        out = torch.zeros_like(t)
        m.load(keys(2), out)
        assert torch.equal(out, t)
        with pytest.raises(InvalidArgumentError, match="out: tensor must be contiguous"):
            m.load(keys(2), torch.zeros(BB // 2, 2, dtype=torch.bfloat16).t())


# ---- finding 10: hashes, counts, ids, closed managers --------------------------------------------
@pytest.mark.parametrize(
    "bad, msg",
    [
        ([None], r"hashes\[0\]: expected a 16-byte block hash, got None"),
        ([-1], r"hashes\[0\]: an int block hash must be in 0..2\*\*128-1, got -1"),
        ([2**130], r"hashes\[0\]: an int block hash must be in 0..2\*\*128-1"),
        ([b"short"], r"hashes\[0\]: a block hash is 16 bytes, got 5"),
        ([1.5], r"hashes\[0\]: expected a 16-byte block hash, got float"),
        ([True], r"hashes\[0\]"),
        (np.zeros((2, 16), np.float32), "hashes: expected an \\(n, 16\\) uint8 array"),
        (np.zeros((2, 8), np.uint8), "hashes: expected an \\(n, 16\\) uint8 array"),
        (None, "hashes: expected a sequence"),
        (b"x" * 16, "hashes: expected a sequence"),
    ],
)
@pytest.mark.parametrize("disk", [False, True])
def test_malformed_hashes(tmp_path: Path, bad, msg, disk: bool) -> None:
    kw = {"disk_path": str(tmp_path), "disk_capacity_bytes": 1 << 20, "disk_o_direct": False} if disk else {}
    with manager(**kw) as m:
        row = np.zeros((1, BB), np.uint8)
        for call in (m.lookup, m.prepare_store, m.promote, m.prefetch, m.remove, m.touch,
                     lambda h: m.store(h, row), lambda h: m.load(h, row)):
            with pytest.raises(InvalidArgumentError, match=msg):
                call(bad)
        assert m.stats()["host"]["used_blocks"] == 0


def test_int_hashes_in_range_are_16_big_endian_bytes() -> None:
    with manager() as m:
        m.store([5, 2**128 - 1], np.zeros((2, BB), np.uint8))
        assert m.lookup([(5).to_bytes(16, "big"), b"\xff" * 16]).num_hits == 2


def test_counts_ids_and_outputs() -> None:
    with manager() as m:
        m.store(keys(2), np.zeros((2, BB), np.uint8))
        with pytest.raises(kvbm.errors.OutOfRangeError, match="count"):
            m.evict(2**64)
        with pytest.raises(InvalidArgumentError, match="count: expected an integer, got 1.5"):
            m.evict(1.5)
        with pytest.raises(InvalidArgumentError, match="tiers_out: expected a 1-D uint8 numpy array"):
            m.lookup_into(keys(2), np.zeros(2, np.float32))
        with pytest.raises(InvalidArgumentError, match="tier"):
            m.evict(1, tier="nvme")
        with pytest.raises(InvalidArgumentError, match="ok: expected 2 bools"):
            m.complete_store(keys(2), [0.5, 1.0])
        with pytest.raises(InvalidArgumentError, match=r"checksums\[0\]"):
            m.complete_store(keys(2), None, [-1, 2])
        assert m.lookup(keys(2)).num_hits == 2


def test_float_block_ids_are_refused_not_truncated() -> None:
    from kvbm.kv_layout import KvLayout

    kv = [np.zeros((4, 1, 4, 16), np.uint16)]
    layout = KvLayout.from_tensors(kv, kind="vllm", dtype="float16")
    with BlockManager(KvbmConfig(block_bytes=layout.block_bytes, host_capacity_bytes=layout.block_bytes * 4)) as m:
        with pytest.raises(InvalidArgumentError, match=r"block_ids\[0\]: expected an integer, got 1.5"):
            m.offload(layout, [1.5], keys(1))
        with pytest.raises(InvalidArgumentError, match="block_ids: expected an integer array, got dtype float64"):
            m.offload(layout, np.array([1.0]), keys(1))
        with pytest.raises(InvalidArgumentError, match="layout: expected a kvbm.kv_layout.KvLayout"):
            m.offload(None, [1], keys(1))
        assert m.lookup(keys(1)).num_hits == 0


def test_index_initial_capacity_is_bounded() -> None:
    with pytest.raises(ConfigError, match="index_initial_capacity"):
        KvbmConfig(block_bytes=BB, index_initial_capacity=2**40)


def test_closed_manager_raises_closed_error_everywhere() -> None:
    m = manager()
    m.store(keys(2), np.zeros((2, BB), np.uint8))
    assert m.lookup(keys(2)).num_hits == 2
    m.close()
    m.close()  # idempotent
    calls = [
        lambda: m.lookup(keys(2)), lambda: m.lookup_into(keys(2), np.zeros(2, np.uint8)),
        lambda: m.contains(keys(1)[0]), lambda: m.store(keys(1), np.zeros((1, BB), np.uint8)),
        lambda: m.load(keys(1), np.zeros((1, BB), np.uint8)), lambda: m.prepare_store(keys(1)),
        lambda: m.complete_store(keys(1)), lambda: m.prepare_load(keys(1)), lambda: m.complete_load(keys(1)),
        lambda: m.touch(keys(1)), lambda: m.evict(1), lambda: m.remove(keys(1)), lambda: m.stats(),
        lambda: m.promote(keys(1)), lambda: m.promote_async(keys(1)), lambda: m.prefetch(keys(1)),
        lambda: m.flush_remote(), lambda: m.offload(None, [0], keys(1)), lambda: m.onboard(None, [0], keys(1)),
    ]
    for c in calls:
        with pytest.raises(ClosedError):
            c()
    assert issubclass(ClosedError, KvbmError)


# ---- finding 12: config and CLI -------------------------------------------------------------------
BIG = "9" * 400


def test_huge_sizes_via_dict_yaml_and_env(tmp_path: Path) -> None:
    for v in (BIG, int(BIG), f"{BIG}GiB", 1e300):
        with pytest.raises(ConfigError, match="host_capacity_bytes"):
            KvbmConfig.from_dict({"host_capacity_bytes": v})
    y = tmp_path / "c.yaml"
    y.write_text(f"host_capacity_bytes: {BIG}\n")
    with pytest.raises(ConfigError, match="host_capacity_bytes"):
        KvbmConfig.from_yaml(y)
    with pytest.raises(ConfigError, match="host_capacity_bytes"):
        KvbmConfig.from_env({"KVBM_HOST_CAPACITY_BYTES": BIG})
    with pytest.raises(ConfigError, match="remote_timeout_s"):
        KvbmConfig.from_env({"KVBM_REMOTE_TIMEOUT_S": BIG})
    with pytest.raises(ConfigError, match="remote_timeout_s"):
        KvbmConfig.from_dict({"remote_timeout_s": int(BIG)})
    assert KvbmConfig.from_dict({"host_capacity_bytes": "1.5GB"}).host_capacity_bytes == 1_500_000_000


def test_bad_yaml_files(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_bytes(b"block_size: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        KvbmConfig.from_yaml(y)
    for doc in ("block_size: " + "[" * 5000 + "]" * 5000, "a: " + "{a: " * 3000 + "1" + "}" * 3000,
                "\n".join(" " * i + "a:" for i in range(3000))):
        y.write_text(doc + "\n")
        with pytest.raises(ConfigError, match="c.yaml"):
            KvbmConfig.from_yaml(y)
    with pytest.raises(ConfigError):
        KvbmConfig.from_env({"KVBM_CONFIG": str(y)})


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("KVBM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "kvbm", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


def test_cli_odd_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"hash_ids": [1, 2]}) + "\n" + '{"hash_ids": [' + "7" * 5000 + "]}\n")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"hash_ids": ' + "[" * 100000 + "]" * 100000 + "}\n")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x01\n")
    notdir = tmp_path / "file"
    notdir.write_text("x")
    cases = [
        (["replay", str(trace)], "TraceFormatError", "line 2"),
        (["replay", str(deep)], "TraceFormatError", "nests too deeply"),
        (["replay", str(binary)], "TraceFormatError", "line 1"),
        (["replay", str(tmp_path / "missing.jsonl")], "InvalidArgumentError", "cannot read"),
        (["inspect", str(tmp_path / "missing")], "ConfigError", "missing"),
        (["inspect", str(notdir)], "Error", "file"),
    ]
    for args, err, text in cases:
        p = _cli(*args, cwd=tmp_path)
        assert p.returncode == 2, (args, p.returncode, p.stderr[-2000:])
        assert "Traceback" not in p.stderr, (args, p.stderr[-2000:])
        line = p.stderr.strip().splitlines()[-1]
        assert err in line and text in line and len(line) < 2500, (args, line)
    p = _cli("inspect", str(tmp_path), "--list", "9" * 30, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--list" in p.stderr


def test_load_trace_errors_are_trace_format_errors(tmp_path: Path) -> None:
    from kvbm.replay import load_trace

    t = tmp_path / "t.jsonl"
    t.write_text('{"hash_ids": [' + "1" * 4000 + "]}\n")  # under Python's digit limit: out of range
    with pytest.raises(TraceFormatError, match="outside 0..2\\*\\*63-1"):
        load_trace(t)


def test_config_and_hashing_agree_on_the_largest_block_size() -> None:
    import kvbm.config
    import kvbm.hashing

    assert kvbm.config.MAX_BLOCK_SIZE == kvbm.hashing.MAX_BLOCK_SIZE
    with pytest.raises(ConfigError, match="block_size"):
        KvbmConfig(block_size=kvbm.hashing.MAX_BLOCK_SIZE + 1)
