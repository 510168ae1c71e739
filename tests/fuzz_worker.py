"""Hypothesis fuzz cases run in a child process (see tests/test_fuzz.py).

``python tests/fuzz_worker.py AREA EXAMPLES CASE_LOG`` runs ``EXAMPLES`` hypothesis cases of one
area. Before each case its description is written (and flushed) to ``CASE_LOG``, so when a case
kills the process (a segfault: faulthandler prints the stack) the parent names the case from
the file's last line. A case passes when it returns or raises a ``kvbm.KvbmError``; any other
exception is printed with the case and the process exits 1. On success the last stdout line is
``FUZZ <area> cases=<n> kvbm_errors=<k>``.

Areas: ``api`` (BlockManager methods with arguments of random types and values), ``api_disk``
(the same with a disk tier), ``config`` (``KvbmConfig.from_dict``), ``yaml``
(``KvbmConfig.from_yaml`` on random and deeply nested documents, bytes not always UTF-8),
``env`` (``KvbmConfig.from_env``), ``hashing`` (``block_hashes`` and the hash normaliser),
``trace`` (``kvbm.replay.load_trace``, what ``kvbm replay`` reads, on random JSONL).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import tempfile
import traceback
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import kvbm
from kvbm import BlockManager, KvbmConfig, Pointer
from kvbm.errors import ClosedError, KvbmError
from kvbm.hashing import hash_key, normalize_hashes

BB = 256
SLOTS = 16

faulthandler.enable()


class Log:
    def __init__(self, path: str) -> None:
        self.f = open(path, "w", buffering=1)  # noqa: SIM115 - kept open for the whole run
        self.cases = 0
        self.kvbm_errors = 0

    def case(self, text: str) -> None:
        self.cases += 1
        self.f.write(text.replace("\n", "\\n")[:4000] + "\n")
        self.f.flush()


LOG: Log


def run_case(desc: str, fn: Any, *args: Any, **kw: Any) -> Any:
    LOG.case(desc)
    try:
        return fn(*args, **kw)
    except KvbmError:
        LOG.kvbm_errors += 1
        return None
    except Exception:  # a foreign exception: the finding this suite exists for
        print(f"NON-KVBM EXCEPTION in case: {desc}", flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)


# ---- values of every kind -----------------------------------------------------------------------
good_hash = st.binary(min_size=16, max_size=16)
ints = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([-1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 2**128 - 1, 2**128, 2**130, -(2**70)]),
)
scalars = st.one_of(
    st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.binary(max_size=40), st.just(object()), st.just(len), st.just(Ellipsis), st.complex_numbers(max_magnitude=2),
)
dtypes = st.sampled_from([np.uint8, np.int8, np.uint16, np.float32, np.float64, np.int64, np.bool_, object])


@st.composite
def arrays(draw: Any) -> np.ndarray:
    dt = draw(dtypes)
    shape = draw(st.sampled_from([(0,), (16,), (3,), (2, 16), (3, 16), (1, 15), (2, 8, 2), (4, BB), (2, BB), (BB,),
                                  (2 * BB,), (3, BB // 4)]))
    a = np.zeros(shape, dt) if dt is not object else np.array([None] * int(np.prod(shape)), object).reshape(shape)
    kind = draw(st.sampled_from(["plain", "strided", "readonly", "fortran"]))
    if kind == "strided" and a.ndim >= 1 and a.shape[0] > 1:
        a = a[::2]
    elif kind == "readonly":
        a.flags.writeable = False
    elif kind == "fortran" and a.ndim == 2:
        a = np.asfortranarray(a)
    return a


KEEP: list[np.ndarray] = []  # memory behind valid Pointers stays alive for the whole run


@st.composite
def pointers(draw: Any) -> Pointer:
    n = draw(st.sampled_from([0, 1, BB, 2 * BB, 3 * BB, 4 * BB]))
    buf = np.zeros(max(n, 1), np.uint8)
    KEEP.append(buf)
    return Pointer(buf.ctypes.data, n, readonly=draw(st.booleans()))


buffers = st.one_of(arrays(), pointers(), st.binary(max_size=3 * BB).map(bytearray), st.binary(max_size=2 * BB),
                    st.binary(max_size=2 * BB).map(lambda b: memoryview(bytearray(b))))
anything = st.one_of(scalars, arrays(), buffers, st.lists(st.one_of(scalars, good_hash), max_size=4),
                     st.tuples(ints, ints), st.dictionaries(st.text(max_size=3), ints, max_size=2))
hash_lists = st.one_of(
    st.lists(good_hash, min_size=0, max_size=5),
    st.lists(st.one_of(good_hash, scalars, st.binary(max_size=20)), max_size=4),
    st.integers(0, 5).map(lambda n: np.frombuffer(os.urandom(16 * n), np.uint8).reshape(n, 16).copy()),
    arrays(), scalars,
)
data_args = st.one_of(
    st.integers(1, 4).map(lambda n: np.ones((n, BB), np.uint8)), buffers,
    st.lists(st.one_of(buffers, scalars), max_size=4), scalars,
)
tiers = st.one_of(st.sampled_from([0, 1, 2, 3, kvbm.Tier.HOST, "host", "disk", "HOST", "nvme"]), scalars)

METHODS = {
    "lookup": lambda: st.tuples(hash_lists),
    "lookup_into": lambda: st.tuples(hash_lists, st.one_of(arrays(), scalars, st.just(np.zeros(8, np.uint8)))),
    "contains": lambda: st.tuples(st.one_of(good_hash, scalars, arrays())),
    "store": lambda: st.tuples(hash_lists, data_args),
    "load": lambda: st.tuples(hash_lists, data_args),
    "prepare_store": lambda: st.tuples(hash_lists),
    "complete_store": lambda: st.tuples(hash_lists, st.one_of(st.none(), anything), st.one_of(st.none(), anything)),
    "prepare_load": lambda: st.tuples(hash_lists),
    "complete_load": lambda: st.tuples(hash_lists),
    "touch": lambda: st.tuples(hash_lists),
    "evict": lambda: st.tuples(st.one_of(ints, scalars)),
    "remove": lambda: st.tuples(hash_lists),
    "promote": lambda: st.tuples(hash_lists),
    "prefetch": lambda: st.tuples(hash_lists),
    "flush_remote": lambda: st.tuples(st.one_of(st.none(), scalars)),
    "offload": lambda: st.tuples(st.one_of(scalars, st.just("layout")), st.one_of(anything, st.lists(ints, max_size=3)),
                                 hash_lists),
    "onboard": lambda: st.tuples(st.one_of(scalars, st.just("layout")), st.one_of(anything, st.lists(ints, max_size=3)),
                                 hash_lists),
    "stats": lambda: st.tuples(),
}
KW = {
    "store": {"parent": st.one_of(st.none(), good_hash, scalars)},
    "prepare_store": {"parent": st.one_of(st.none(), good_hash, scalars), "tier": tiers},
    "complete_store": {"tier": tiers},
    "prepare_load": {"tier": tiers},
    "complete_load": {"tier": tiers},
    "evict": {"tier": tiers},
    "remove": {"tier": tiers, "ignore_missing": st.one_of(st.booleans(), scalars)},
}


@st.composite
def api_calls(draw: Any) -> tuple[str, tuple, dict]:
    name = draw(st.sampled_from(sorted(METHODS) + ["close"]))
    if name == "close":
        return name, (), {}
    args = draw(METHODS[name]())
    kw = {k: draw(v) for k, v in KW.get(name, {}).items() if draw(st.booleans())}
    return name, args, kw


def _layout() -> Any:
    from kvbm.kv_layout import KvLayout

    kv = [np.zeros((4, 1, 4, 16), np.uint16)]  # 4 blocks of 4 tokens x 1 head x 2*8 fp16: 128 bytes/layer
    return KvLayout.from_tensors(kv, kind="vllm", dtype="float16")


def fuzz_api(examples: int, disk: bool) -> None:
    layout = _layout()
    tmp = tempfile.mkdtemp(prefix="kvbm-fuzz-") if disk else None

    def new_manager() -> BlockManager:
        kw: dict[str, Any] = {}
        if disk:
            kw = {"disk_path": tmp, "disk_capacity_bytes": 64 * 4096, "disk_o_direct": False, "disk_io_threads": 1}
        return BlockManager(KvbmConfig(block_bytes=BB, host_capacity_bytes=BB * SLOTS, **kw))

    state = {"m": new_manager(), "closed": False}
    lb = BlockManager(KvbmConfig(block_bytes=layout.block_bytes, host_capacity_bytes=layout.block_bytes * 4))

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(api_calls())
    def case(call: tuple[str, tuple, dict]) -> None:
        name, args, kw = call
        m: BlockManager = state["m"]
        if name in ("offload", "onboard"):
            m = lb
            args = tuple(layout if isinstance(a, str) and a == "layout" else a for a in args)
        if name == "close":
            run_case("close()", m.close)
            state["closed"] = True
            return
        desc = f"{name}(*{args!r:.1500}, **{kw!r:.500})"
        r = run_case(desc, getattr(m, name), *args, **kw)
        if name == "prefetch" and r is not None:
            run_case("prefetch.wait", r.wait, 5)
        if state["closed"] and m is state["m"]:  # a closed manager must refuse, not answer
            LOG.case(f"after close: {desc}")
            try:
                getattr(m, name)(*args, **kw)
            except ClosedError:
                pass
            except KvbmError:
                pass  # argument errors may be reported first only if they are KvbmErrors too
            else:
                print(f"CLOSED MANAGER ANSWERED: {desc}", flush=True)
                os._exit(1)
            state["m"], state["closed"] = new_manager(), False

    case()
    # the managers still work and hold consistent books after all that
    for mm in (state["m"], lb):
        if not state["closed"] or mm is lb:
            mm.index.validate()
    m = state["m"]
    if not state["closed"]:
        keys = [bytes([7, i]) * 8 for i in range(3)]
        data = np.random.default_rng(1).integers(0, 256, (3, BB), dtype=np.uint8)
        m.evict(SLOTS)
        m.remove(keys, ignore_missing=True)
        m.store(keys, data)
        out = np.zeros_like(data)
        m.load(keys, out)
        assert np.array_equal(out, data), "wrong bytes after the fuzz run"


# ---- configuration ------------------------------------------------------------------------------
FIELDS = KvbmConfig.field_names()
config_values = st.one_of(
    scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2),
    st.sampled_from(["9" * 400, "1" + "0" * 5000, "4GiB", "1.5 MB", "-1", "1e400", "nan", "inf", "0x10", " 12 ",
                     "1" * 64 + "KiB", "true", "write_through", "lru", "redis://127.0.0.1:1/0", "kvbm://x:1",
                     "\udcff", "\x00", "\u2603"]),
    st.sampled_from([10**400, -(10**400), 2**64, float("nan"), float("inf"), 1e300, -0.0]),
)


def fuzz_config(examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=5), ints), config_values, max_size=4))
    def case(d: dict) -> None:
        run_case(f"from_dict({d!r:.2000})", KvbmConfig.from_dict, d)

    case()
    run_case("from_dict(non-mapping)", KvbmConfig.from_dict, [1, 2])


def _nested(depth: int, kind: str) -> str:
    return {"list": "[" * depth + "]" * depth, "map": "{a: " * depth + "1" + "}" * depth,
            "block": "\n" + "".join(" " * i + "a:\n" for i in range(min(depth, 400))), "anchor": "&a [*a]"}[kind]


def fuzz_yaml(examples: int) -> None:
    tmp = tempfile.mkdtemp(prefix="kvbm-fuzz-yaml-")
    path = os.path.join(tmp, "c.yaml")

    docs = st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.tuples(st.sampled_from(FIELDS), config_values).map(lambda kv: f"{kv[0]}: {kv[1]!r}\n".encode(
            "utf-8", "surrogatepass")),
        st.tuples(st.sampled_from([10, 63, 65, 400, 20000]), st.sampled_from(["list", "map", "block", "anchor"])).map(
            lambda dk: ("block_size: " + _nested(*dk) + "\n").encode()),
        st.sampled_from([b"\xff\xfe\x00", b"block_size: \xc3\x28\n", b"!!python/object:os.system ls\n",
                         b"host_capacity_bytes: " + b"9" * 5000 + b"\n", b"- 1\n- 2\n", b"null\n", b"''\n",
                         b"? [a, b]\n: 1\n", b"{1: 2}\n", b"block_size: !!binary AAAA\n"]),
    )

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(docs)
    def case(doc: bytes) -> None:
        with open(path, "wb") as f:
            f.write(doc)
        run_case(f"from_yaml({doc[:1500]!r})", KvbmConfig.from_yaml, path)

    case()
    for p in ("/nonexistent/kvbm.yaml", tmp, "bad\x00path"):
        run_case(f"from_yaml({p!r})", KvbmConfig.from_yaml, p)


def fuzz_env(examples: int) -> None:
    env_values = st.one_of(st.text(max_size=30), st.sampled_from(["9" * 400, "1e400", "nan", "", " ", "-0", "0"]))

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(st.dictionaries(st.sampled_from([f"KVBM_{f.upper()}" for f in FIELDS] + ["KVBM_CONFIG", "KVBM_CUDA"]),
                           env_values, max_size=4))
    def case(env: dict) -> None:
        run_case(f"from_env({env!r:.2000})", KvbmConfig.from_env, env)

    case()


def fuzz_hashing(examples: int) -> None:
    ns = kvbm.Namespace("m", "fp16", "NHD", 4)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(st.one_of(st.lists(ints, max_size=12), arrays(), scalars), st.one_of(st.just(4), ints, scalars),
           st.one_of(st.none(), anything), st.one_of(st.none(), good_hash, scalars), hash_lists)
    def case(tokens: Any, bs: Any, extra: Any, parent: Any, hl: Any) -> None:
        run_case(f"block_hashes({tokens!r:.800}, {bs!r}, extra={extra!r:.300}, parent={parent!r})",
                 kvbm.block_hashes, tokens, bs, ns, extra, parent=parent)
        run_case(f"normalize_hashes({hl!r:.800})", normalize_hashes, hl)
        run_case(f"hash_key({parent!r:.300})", hash_key, parent)

    case()


def fuzz_trace(examples: int) -> None:
    from kvbm.replay import load_trace

    tmp = tempfile.mkdtemp(prefix="kvbm-fuzz-trace-")
    path = os.path.join(tmp, "t.jsonl")
    json_values = st.recursive(
        st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=5)),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=2)),
        max_leaves=8,
    )
    lines = st.one_of(
        st.builds(lambda v: json.dumps({"hash_ids": v}).encode(), json_values),
        st.builds(lambda ids: json.dumps({"hash_ids": ids}).encode(), st.lists(ints, max_size=6)),
        st.binary(max_size=60),
        st.sampled_from([b'{"hash_ids": [' + b"9" * 5000 + b"]}", b'{"hash_ids": ' + b"[" * 50000 + b"]" * 50000 + b"}",
                         b'{"hash_ids": [1e999]}', b'{"hash_ids": [NaN]}', b"\xff\xfe", b"[]", b'"x"']),
    )

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(st.lists(lines, min_size=1, max_size=4))
    def case(ls: list[bytes]) -> None:
        with open(path, "wb") as f:
            f.write(b"\n".join(ls) + b"\n")
        run_case(f"load_trace({ls!r:.2000})", load_trace, path)

    case()


AREAS = {
    "trace": fuzz_trace,
    "api": lambda n: fuzz_api(n, disk=False),
    "api_disk": lambda n: fuzz_api(n, disk=True),
    "config": fuzz_config,
    "yaml": fuzz_yaml,
    "env": fuzz_env,
    "hashing": fuzz_hashing,
}

if __name__ == "__main__":
    area, n, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    LOG = Log(log_path)
    AREAS[area](n)
    print(f"FUZZ {area} cases={LOG.cases} kvbm_errors={LOG.kvbm_errors}", flush=True)
