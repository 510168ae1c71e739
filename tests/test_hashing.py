"""Block hashing: SHA-256 and fast128 against references, the chain spec, inputs and errors."""

from __future__ import annotations

import array
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import kvbm
from kvbm import _native
from kvbm.errors import ConfigError, InvalidArgumentError, UnsupportedError
from kvbm.hashing import Namespace, block_hashes_array

DOCS = Path(__file__).resolve().parents[1] / "docs" / "hashing.md"

# ---------------------------------------------------------------------------------------------
# Pure-Python reference, written from docs/hashing.md (slow and plain on purpose).

M64 = (1 << 64) - 1
K0, K1, K2, K3 = 0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1


def _fmix(z: int) -> int:
    z ^= z >> 33
    z = (z * 0xFF51AFD7ED558CCD) & M64
    z ^= z >> 33
    z = (z * 0xC4CEB9FE1A85EC53) & M64
    z ^= z >> 33
    return z


def ref_fast128(msg: bytes) -> bytes:
    n = len(msg)
    lanes = (n + 15) // 16
    padded = msg + bytes(16 * lanes - n)
    a, b = K0 ^ n, K1
    for i in range(lanes):
        x, y = struct.unpack_from("<QQ", padded, 16 * i)
        p = (x ^ ((K2 + i * K3) & M64)) * (y ^ ((K3 + i * K2) & M64))
        a = (a + ((p & M64) ^ y)) & M64
        b = (b + ((p >> 64) ^ x)) & M64
    a = _fmix(a)
    b = _fmix(b ^ a)
    a = _fmix((a + b) & M64)
    b = _fmix(b ^ a)
    return struct.pack("<QQ", a, b)


def ref_h16(algorithm: str, data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:16] if algorithm == "sha256" else ref_fast128(data)


def ref_namespace_encoding(model_id, dtype, kv_layout, block_size, tp_rank=0, tp_size=1, revision="",
                           hash_algorithm="sha256") -> bytes:
    def field(s: str) -> bytes:
        raw = s.encode("utf-8")
        return struct.pack("<I", len(raw)) + raw

    return (field("kvbm-namespace-v1") + field(model_id) + field(revision) + field(dtype) + field(kv_layout)
            + struct.pack("<III", block_size, tp_rank, tp_size) + field(hash_algorithm))


def ref_block_hashes(tokens, block_size, ns_digest, algorithm="sha256", extra=None, parent=None):
    n = len(tokens) // block_size
    extras = [extra] * n if extra is None or isinstance(extra, bytes) else list(extra)
    prev = parent if parent is not None else bytes(16)
    out = []
    for i in range(n):
        block = [int(t) for t in tokens[i * block_size:(i + 1) * block_size]]
        msg = struct.pack(f"<{block_size}I", *block)
        if extras[i] is None:
            msg += ns_digest + prev + b"\x00"
        else:
            msg += ref_h16(algorithm, bytes(extras[i])) + ns_digest + prev + b"\x01"
        prev = ref_h16(algorithm, msg)
        out.append(prev)
    return out


# ---------------------------------------------------------------------------------------------

N1 = Namespace("meta-llama/Llama-3.1-8B-Instruct", "bfloat16", "NHD", 16)
N2 = Namespace("meta-llama/Llama-3.1-8B-Instruct", "bfloat16", "NHD", 16, tp_rank=1, tp_size=2,
               revision="main", hash_algorithm="fast128")

VECTORS_NS = {
    "N1": (N1, "f13a8bc2a346b0892f55774cefd6a07d"),
    "N2": (N2, "b2ae47647d1528ca805203a89ff3394e"),
}
VECTORS_FAST128 = [
    (b"", "6b44d80d91406015271c6989105315e1"),
    (b"abc", "bc54d5f79b2409755e438a8cf65c4389"),
    (bytes(range(100)), "d1c91a088dfa3fcba37e6ba93afc0cfa"),
]
T40 = list(range(40))
VECTORS_BLOCKS = {
    "V1": (T40, N1, None, None, ["983af0417f58288c35ca70edeebd23ce", "9a4c99d0fc219bad9e116c333049ae0a"]),
    "V2": (T40, N2, None, None, ["6ad9539582adbed6518973b0514ae157", "6c3629963914e5eb7e5b2c941aa70f36"]),
    "V3": (T40, N1, b"lora:adapter-a", None,
           ["be75b2182597c300296116bb4765c6f4", "db41b12e14e79a32e6378c035ed1f347"]),
    "V4": (T40, N1, [None, b"mm:0123"], None,
           ["983af0417f58288c35ca70edeebd23ce", "4d3eecfd147f68d2604a9cd6d432c993"]),
    "V5": (list(range(100, 116)), N1, None, bytes(range(16)), ["0aa682c3ac77f0db08ce85611510a688"]),
    "V6": (T40, N2, [b"", None], None, ["41d9189d046e8838dbc552be32830410", "d4afa5e9492d195162319555075cfad4"]),
}


# ---- SHA-256 ---------------------------------------------------------------------------------

def _sha_impls():
    impls = ["auto", "portable"]
    if _native.sha256_impl() == "sha-ni":
        impls.append("sha-ni")
    return impls


@pytest.mark.parametrize("impl", _sha_impls())
def test_sha256_matches_hashlib_on_many_lengths(impl):
    rng = random.Random(1)
    lengths = list(range(260)) + [rng.randrange(0, 200_000) for _ in range(40)] + [1 << 20]
    for n in lengths:
        data = rng.randbytes(n)
        assert _native.sha256(data, impl) == hashlib.sha256(data).digest(), (impl, n)


def test_sha256_impl_reporting_and_errors():
    assert _native.sha256_impl() in ("sha-ni", "portable")
    with pytest.raises(InvalidArgumentError, match="impl='nope'"):
        _native.sha256(b"x", "nope")
    if _native.sha256_impl() == "portable":
        with pytest.raises(UnsupportedError):
            _native.sha256(b"x", "sha-ni")
    with pytest.raises(InvalidArgumentError, match="bytes-like"):
        _native.sha256("text")


def test_sha256_accepts_buffers():
    arr = np.arange(1000, dtype=np.int32)
    assert _native.sha256(arr) == hashlib.sha256(arr.tobytes()).digest()
    assert _native.sha256(memoryview(b"abc")) == hashlib.sha256(b"abc").digest()
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        _native.sha256(arr[::2])


# ---- fast128 ---------------------------------------------------------------------------------

def test_fast128_matches_python_reference():
    rng = random.Random(2)
    for n in list(range(200)) + [rng.randrange(0, 5000) for _ in range(30)]:
        data = rng.randbytes(n)
        assert _native.fast128(data) == ref_fast128(data), n


@pytest.mark.parametrize("data,hexdigest", VECTORS_FAST128)
def test_fast128_vectors(data, hexdigest):
    assert _native.fast128(data).hex() == hexdigest
    assert ref_fast128(data).hex() == hexdigest


def test_fast128_avalanche_and_no_trivial_collisions():
    # Flipping any one input bit of a 97-byte block message should flip about half of the
    # 128 output bits; a weak mix shows up as a low minimum or a skewed mean.
    rng = random.Random(3)
    msg = bytearray(rng.randbytes(97))
    base = int.from_bytes(_native.fast128(bytes(msg)), "little")
    flips = []
    for bit in range(97 * 8):
        msg[bit // 8] ^= 1 << (bit % 8)
        flips.append((base ^ int.from_bytes(_native.fast128(bytes(msg)), "little")).bit_count())
        msg[bit // 8] ^= 1 << (bit % 8)
    mean = sum(flips) / len(flips)
    assert 60 <= mean <= 68, mean
    assert min(flips) >= 35, min(flips)
    # Zero-padding and length: messages differing only by trailing zeros must differ.
    assert len({_native.fast128(bytes(n)) for n in range(64)}) == 64
    # Distinct sparse inputs (one token set in a block) give distinct digests.
    seen = set()
    for pos in range(16):
        for val in range(1, 200):
            toks = [0] * 16
            toks[pos] = val
            seen.add(_native.fast128(struct.pack("<16I", *toks)))
    assert len(seen) == 16 * 199


# ---- Namespace -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VECTORS_NS))
def test_namespace_vectors(name):
    ns, hexdigest = VECTORS_NS[name]
    enc = ref_namespace_encoding(ns.model_id, ns.dtype, ns.kv_layout, ns.block_size, ns.tp_rank, ns.tp_size,
                                 ns.revision, ns.hash_algorithm)
    assert ns.encoding == enc
    assert ns.digest == hashlib.sha256(enc).digest()[:16]
    assert ns.digest.hex() == hexdigest


def test_namespace_fields_all_matter():
    base = {"model_id": "m", "dtype": "bf16", "kv_layout": "NHD", "block_size": 16, "tp_rank": 0, "tp_size": 2,
                "revision": "r", "hash_algorithm": "sha256"}
    variants = [{"model_id": "m2"}, {"dtype": "fp16"}, {"kv_layout": "HND"}, {"block_size": 32},
                {"tp_rank": 1}, {"tp_size": 4}, {"revision": "r2"}, {"hash_algorithm": "fast128"}]
    digests = {Namespace(**base).digest}
    for v in variants:
        digests.add(Namespace(**{**base, **v}).digest)
    assert len(digests) == len(variants) + 1
    # Length prefixes: moving a character between adjacent fields changes the digest.
    assert Namespace("ab", "c", "L", 16).digest != Namespace("a", "bc", "L", 16).digest
    assert Namespace("m", "d", "L", 16) == Namespace("m", "d", "L", 16)
    assert hash(Namespace("m", "d", "L", 16)) == hash(Namespace("m", "d", "L", 16))


@pytest.mark.parametrize("kwargs,match", [
    ({"block_size": 0}, "block_size = 0"),
    ({"block_size": -4}, "block_size = -4"),
    ({"block_size": True}, "block_size must be an int"),
    ({"block_size": 16.0}, "block_size must be an int"),
    ({"tp_rank": 2, "tp_size": 2}, "tp_rank = 2"),
    ({"tp_rank": -1}, "tp_rank = -1"),
    ({"tp_size": 0}, "tp_size = 0"),
    ({"hash_algorithm": "md5"}, "hash_algorithm = 'md5'"),
    ({"model_id": ""}, "model_id must not be empty"),
    ({"model_id": 3}, "model_id must be a str"),
    ({"dtype": ""}, "dtype must not be empty"),
    ({"kv_layout": None}, "kv_layout must be a str"),
    ({"revision": "\ud800"}, "revision is not valid Unicode"),
])
def test_namespace_validation(kwargs, match):
    args = {"model_id": "m", "dtype": "bf16", "kv_layout": "NHD", "block_size": 16}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=re.escape(match)):
        Namespace(**args)
    assert issubclass(ConfigError, InvalidArgumentError)


def test_namespace_is_frozen():
    with pytest.raises(AttributeError):
        N1.block_size = 32  # type: ignore[misc]


# ---- chained block hashes ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VECTORS_BLOCKS))
def test_block_hash_vectors(name):
    tokens, ns, extra, parent, expected = VECTORS_BLOCKS[name]
    got = kvbm.block_hashes(tokens, 16, ns, extra, parent=parent)
    assert [h.hex() for h in got] == expected
    ref = ref_block_hashes(tokens, 16, ns.digest, ns.hash_algorithm, extra, parent)
    assert [h.hex() for h in ref] == expected


def test_docs_carry_the_same_vectors():
    text = DOCS.read_text()
    for _, hexdigest in VECTORS_NS.values():
        assert hexdigest in text
    for _, hexdigest in VECTORS_FAST128:
        assert hexdigest in text
    for name, (*_, expected) in VECTORS_BLOCKS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        for hexdigest in expected:
            assert hexdigest in row, (name, hexdigest)
    assert N1.encoding.hex() in text and N2.encoding.hex() in text


@pytest.mark.parametrize("algorithm", ["sha256", "fast128"])
@pytest.mark.parametrize("block_size", [1, 3, 16, 17, 28, 64])
def test_block_hashes_match_reference_random(algorithm, block_size):
    rng = random.Random(block_size * 7 + len(algorithm))
    ns = Namespace("m", "bf16", "NHD", block_size, hash_algorithm=algorithm)
    nblocks = rng.randrange(1, 12)
    tokens = [rng.randrange(1 << 32) for _ in range(nblocks * block_size + rng.randrange(block_size))]
    per_block = [rng.choice([None, b"", rng.randbytes(rng.randrange(1, 80))]) for _ in range(nblocks)]
    for extra in (None, b"salt", per_block):
        for parent in (None, rng.randbytes(16)):
            want = ref_block_hashes(tokens, block_size, ns.digest, algorithm, extra, parent)
            assert kvbm.block_hashes(tokens, block_size, ns, extra, parent=parent) == want
            for dt in (np.uint32, np.int64, np.uint64):
                arr = block_hashes_array(np.array(tokens, dtype=dt), block_size, ns, extra, parent=parent)
                assert arr.dtype == np.uint8 and arr.shape == (nblocks, 16)
                assert [bytes(r) for r in arr] == want


@pytest.mark.parametrize("impl", _sha_impls())
@pytest.mark.parametrize("block_size", [1, 8, 15, 16, 28, 32, 64, 100])
def test_sha256_chain_pipeline_every_shape(impl, block_size):
    # Block sizes chosen so the message has 0, 1 or several token-only chunks and a dependent
    # tail of one or two chunks; per-block extras switch the message length back and forth.
    rng = random.Random(block_size)
    nblocks = 9
    tokens = [rng.randrange(1 << 32) for _ in range(nblocks * block_size)]
    ns = Namespace("m", "bf16", "NHD", block_size)
    extras = [None, b"x", None, None, rng.randbytes(100), b"", None, b"y", None]
    for extra in (None, b"salt", extras):
        want = ref_block_hashes(tokens, block_size, ns.digest, "sha256", extra, None)
        got = _native.block_hashes(tokens, block_size, ns.digest, "sha256", extra, None, impl)
        assert [bytes(r) for r in got] == want


def test_chain_properties():
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 1 << 32, size=16 * 50 + 7, dtype=np.uint64)
    full = kvbm.block_hashes(tokens, 16, N1)
    assert len(full) == 50 and len(set(full)) == 50
    # A prefix hashes to the prefix of the hashes; the partial tail is not hashed.
    assert kvbm.block_hashes(tokens[: 16 * 20 + 3], 16, N1) == full[:20]
    # Continuing from a parent gives the rest of the chain.
    assert kvbm.block_hashes(tokens[16 * 20:], 16, N1, parent=full[19]) == full[20:]
    # Changing one token changes its block and every later one, never an earlier one.
    changed = tokens.copy()
    changed[16 * 30 + 5] ^= 1
    other = kvbm.block_hashes(changed, 16, N1)
    assert other[:30] == full[:30]
    assert all(a != b for a, b in zip(other[30:], full[30:]))
    # Namespaces separate: another TP rank or algorithm gives disjoint hashes.
    rank1 = Namespace(N1.model_id, N1.dtype, N1.kv_layout, 16, tp_rank=1, tp_size=2)
    assert not set(kvbm.block_hashes(tokens, 16, rank1)) & set(full)
    fast = Namespace(N1.model_id, N1.dtype, N1.kv_layout, 16, hash_algorithm="fast128")
    assert not set(kvbm.block_hashes(tokens, 16, fast)) & set(full)
    # A raw 16-byte digest means sha256 with that namespace.
    assert kvbm.block_hashes(tokens, 16, N1.digest) == full
    # b"" is an extra key, None is none.
    assert kvbm.block_hashes(tokens, 16, N1, b"") != full
    assert kvbm.block_hashes(tokens, 16, N1, [None] * 50) == full


def test_empty_and_short_inputs():
    assert kvbm.block_hashes([], 16, N1) == []
    assert kvbm.block_hashes(list(range(15)), 16, N1) == []
    assert block_hashes_array(np.zeros(0, np.int64), 16, N1).shape == (0, 16)
    assert kvbm.block_hashes(list(range(15)), 16, N1, []) == []


def test_all_input_types_agree():
    rng = np.random.default_rng(5)
    base = rng.integers(0, 30000, size=16 * 9 + 5)
    want = kvbm.block_hashes(base.tolist(), 16, N1)
    assert want == ref_block_hashes(base.tolist(), 16, N1.digest)
    inputs = [tuple(base.tolist())]
    for dt in (np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64):
        inputs.append(base.astype(dt))
        inputs.append(base.astype(np.dtype(dt).newbyteorder(">")))  # big-endian
    wide = np.zeros(base.size * 3, dtype=np.int64)
    wide[::3] = base
    inputs.append(wide[::3])  # strided view
    inputs.append(base[::-1].copy()[::-1])  # negative stride
    for code in ("i", "I", "l", "L", "q", "Q", "H"):
        inputs.append(array.array(code, base.tolist()))
    inputs.append([np.int64(t) for t in base])  # numpy scalars in a list
    for obj in inputs:
        assert kvbm.block_hashes(obj, 16, N1) == want, type(obj)
    small = np.arange(16 * 3, dtype=np.uint8)
    assert kvbm.block_hashes(small, 16, N1) == kvbm.block_hashes(list(range(48)), 16, N1)
    assert kvbm.block_hashes(range(48), 16, N1) == kvbm.block_hashes(list(range(48)), 16, N1)
    # The full uint32 range is allowed.
    top = [0xFFFFFFFF] * 16
    assert kvbm.block_hashes(top, 16, N1) == ref_block_hashes(top, 16, N1.digest)
    assert kvbm.block_hashes(np.array(top, np.uint32), 16, N1) == kvbm.block_hashes(top, 16, N1)


@pytest.mark.parametrize("tokens,match", [
    (list(range(20)) + [-1], "token_ids[20] = -1 is out of range"),
    ([5, 1 << 32], "token_ids[1] = 4294967296 is out of range"),
    ([5, 1 << 70], "token_ids[1] = 1180591620717411303424 is out of range"),
    (np.array([3, -7], np.int32), "token_ids[1] = -7 is out of range"),
    (np.array([3, 4, 1 << 40], np.int64), "token_ids[2] = 1099511627776 is out of range"),
    (np.array([1 << 63], np.uint64), "token_ids[0] = 9223372036854775808 is out of range"),
    (array.array("b", [1, -2]), "token_ids[1] = -2 is out of range"),
    ([1, True], "token_ids[1] is a bool"),
    ([1, 2.0], "token_ids[1] is float"),
    ([1, "3"], "token_ids[1] is str"),
    (np.array([1.0, 2.0]), "non-integer element format"),
    (np.array([True, False]), "dtype bool"),
    (np.zeros((2, 16), np.int32), "must be 1-D, got an array with ndim=2"),
    (np.int32(5), "token_ids must be"),
    (np.array(5, np.int32), "must be 1-D, got an array with ndim=0"),
    (b"\x01\x02", "token_ids must be a sequence of ints or a 1-D integer array, got bytes"),
    ("abc", "got str"),
    (None, "got NoneType"),
    (np.array([1, 2], dtype=object), "non-integer element format"),
])
def test_bad_tokens_raise(tokens, match):
    with pytest.raises(InvalidArgumentError, match=re.escape(match)):
        kvbm.block_hashes(tokens, 1, N1.digest)


@pytest.mark.parametrize("make", [list, lambda t: np.array(t, np.int64), lambda t: np.array(t, np.int32),
                                  lambda t: np.array(t, np.int64)[::1].repeat(2)[::2]])
def test_bad_token_anywhere_names_the_first_index(make):
    # Block tokens are checked while hashing, the tail up front: either way the error names the
    # first bad index of the whole input.
    good = list(range(16 * 4 + 5))
    for bad_at in ([3], [66], [20, 66], [66, 67], [63]):
        toks = list(good)
        for i in bad_at:
            toks[i] = -5
        with pytest.raises(InvalidArgumentError, match=re.escape(f"token_ids[{bad_at[0]}] = -5")):
            kvbm.block_hashes(make(toks), 16, N1)
        with pytest.raises(InvalidArgumentError, match=re.escape(f"token_ids[{bad_at[0]}] = -5")):
            block_hashes_array(make(toks), 16, N2)


def test_bad_arguments_raise():
    toks = list(range(48))
    with pytest.raises(InvalidArgumentError, match=re.escape("block_size = 0 must be > 0")):
        kvbm.block_hashes(toks, 0, N1.digest)
    with pytest.raises(InvalidArgumentError, match=re.escape("block_size = -16 must be > 0")):
        kvbm.block_hashes(toks, -16, N1.digest)
    with pytest.raises(InvalidArgumentError, match="block_size must be an int"):
        kvbm.block_hashes(toks, True, N1.digest)
    with pytest.raises(InvalidArgumentError, match="differs from namespace.block_size = 16"):
        kvbm.block_hashes(toks, 8, N1)
    with pytest.raises(InvalidArgumentError, match="exactly 16 bytes, got 15"):
        kvbm.block_hashes(toks, 16, bytes(15))
    with pytest.raises(InvalidArgumentError, match="kvbm.Namespace or its 16-byte digest"):
        kvbm.block_hashes(toks, 16, "ns")
    with pytest.raises(InvalidArgumentError, match=re.escape("parent must be exactly 16 bytes, got 32")):
        kvbm.block_hashes(toks, 16, N1, parent=bytes(32))
    with pytest.raises(InvalidArgumentError, match="parent must be bytes-like"):
        kvbm.block_hashes(toks, 16, N1, parent=12)
    with pytest.raises(InvalidArgumentError, match="extra has 2 entries but token_ids has 3 full blocks"):
        kvbm.block_hashes(toks, 16, N1, [b"a", b"b"])
    with pytest.raises(InvalidArgumentError, match=re.escape("extra[1] must be bytes or None, got str")):
        kvbm.block_hashes(toks, 16, N1, [b"a", "b", None])
    with pytest.raises(InvalidArgumentError, match="extra must be None, bytes, or a sequence"):
        kvbm.block_hashes(toks, 16, N1, 5)
    with pytest.raises(InvalidArgumentError, match="extra must be None, bytes, or a sequence"):
        kvbm.block_hashes(toks, 16, N1, "salt")
    with pytest.raises(InvalidArgumentError, match="block_size = 16777217 is out of range"):
        kvbm.block_hashes(toks, (1 << 24) + 1, N1.digest)
    with pytest.raises(InvalidArgumentError, match="hash algorithm 'md5' is unknown"):
        _native.block_hashes(toks, 16, N1.digest, "md5")


def test_threads_hash_concurrently_and_correctly():
    rng = np.random.default_rng(6)
    jobs = [rng.integers(0, 1 << 32, size=16 * 500, dtype=np.uint32) for _ in range(4)]
    want = [block_hashes_array(j, 16, N1) for j in jobs]
    got: dict[int, list[np.ndarray]] = {}

    def work(i: int) -> None:
        got[i] = [block_hashes_array(jobs[i], 16, N1) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert all(np.array_equal(g, want[i]) for g in got[i])


def test_gil_is_released_while_hashing():
    # One long native call (portable SHA-256, ~8M tokens: on the order of 100+ ms) in a thread;
    # if it held the GIL the main thread would stall for the whole call. The longest stall of
    # the main loop must stay well below the call's duration.
    toks = np.random.default_rng(8).integers(0, 1 << 32, size=8 << 20, dtype=np.uint32)
    done = threading.Event()
    elapsed = []

    def work() -> None:
        t0 = time.perf_counter()
        _native.block_hashes(toks, 16, N1.digest, "sha256", None, None, "portable")
        elapsed.append(time.perf_counter() - t0)
        done.set()

    t = threading.Thread(target=work)
    last = time.perf_counter()
    max_gap = 0.0
    t.start()
    while not done.is_set():
        now = time.perf_counter()
        max_gap = max(max_gap, now - last)
        last = now
    t.join()
    assert elapsed[0] > 0.05, "the call was too short to tell"
    assert max_gap < 0.5 * elapsed[0], (max_gap, elapsed[0])


_CHILD = r"""
import json, sys
import numpy as np
import kvbm
from kvbm.hashing import block_hashes_array
ns = kvbm.Namespace("org/model", "float16", "NHD", 16, tp_rank=1, tp_size=4, revision="abc")
fast = kvbm.Namespace("org/model", "float16", "NHD", 16, hash_algorithm="fast128")
toks = list(range(1000, 1000 + 16 * 12 + 3))
print(json.dumps({
    "ns": ns.digest.hex(),
    "sha": [h.hex() for h in kvbm.block_hashes(toks, 16, ns, b"salt")],
    "fast": [h.hex() for h in kvbm.block_hashes(toks, 16, fast, [None, b"x"] * 6)],
    "arr": block_hashes_array(np.array(toks, np.int64), 16, ns).tobytes().hex(),
    "seed": sys.flags.hash_randomization,
}))
"""


def test_deterministic_across_processes_with_different_hash_seeds():
    outs = []
    for seed in ("0", "12345", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                             timeout=120, check=True)
        outs.append(json.loads(res.stdout))
    for o in outs[1:]:
        assert {k: v for k, v in o.items() if k != "seed"} == {k: v for k, v in outs[0].items() if k != "seed"}
    toks = list(range(1000, 1000 + 16 * 12 + 3))
    ns = Namespace("org/model", "float16", "NHD", 16, tp_rank=1, tp_size=4, revision="abc")
    assert outs[0]["sha"] == [h.hex() for h in ref_block_hashes(toks, 16, ns.digest, "sha256", b"salt")]


# ---- token ranges read in place (start/stop) -----------------------------------------------------


@pytest.mark.parametrize("kind", ["list", "tuple", "int32", "int64", "strided", "range"])
def test_token_range_equals_hashing_the_slice(kind: str) -> None:
    toks = list(range(7, 7 + 16 * 9 + 5))
    ns = Namespace(model_id="m", dtype="bf16", kv_layout="x", block_size=16).digest
    src: object = {
        "list": toks, "tuple": tuple(toks), "int32": np.array(toks, np.int32), "int64": np.array(toks, np.int64),
        "strided": np.repeat(np.array(toks, np.int64), 2)[::2], "range": range(7, 7 + len(toks)),
    }[kind]
    parent = bytes(range(16))
    for lo, hi in [(0, None), (16, 80), (32, len(toks)), (48, 48), (16, 90)]:
        want = _native.block_hashes(toks[lo:hi], 16, ns, "sha256", None, parent)
        got = _native.block_hashes(src, 16, ns, "sha256", None, parent, start=lo, stop=hi)
        assert got.shape == want.shape and (got == want).all(), (kind, lo, hi)


def test_token_range_errors_name_the_absolute_index() -> None:
    ns = bytes(16)
    toks = list(range(100))
    with pytest.raises(InvalidArgumentError, match=r"token range \[16, 200\) is not within the 100"):
        _native.block_hashes(toks, 16, ns, start=16, stop=200)
    with pytest.raises(InvalidArgumentError, match=r"token range \[-1, "):
        _native.block_hashes(toks, 16, ns, start=-1)
    with pytest.raises(InvalidArgumentError, match=r"stop = -3"):
        _native.block_hashes(toks, 16, ns, stop=-3)
    bad = toks[:40] + [-1] + toks[41:]
    for src in (bad, np.array(bad, np.int64)):
        with pytest.raises(InvalidArgumentError, match=r"token_ids\[40\] = -1 is out of range"):
            _native.block_hashes(src, 16, ns, start=32, stop=64)
    with pytest.raises(InvalidArgumentError, match=r"token_ids\[41\] is str"):
        _native.block_hashes(toks[:41] + ["x"] + toks[42:], 16, ns, start=32, stop=64)
