"""Slot lifetime under concurrency: a host slot is reused only after every copy out of it ended.

Several threads store, evict, load and prefetch through one BlockManager with a disk tier or a
remote write-behind tier (a real in-process ``kvbm serve`` and a real redis-server); afterwards
every block the slower tier holds is read back (after a restart for disk) and compared with a
content oracle: a block's bytes are derived from its hash, so a block persisted with another
block's bytes (the wrong-KV race of issue 11) is caught even though its checksum is valid.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from kvbm import BlockManager, KvbmConfig
from kvbm.errors import BlockNotFoundError, CapacityError
from kvbm.serve import ServeConfig, StoreServer

BB = 4096
HOST_SLOTS = 96
BLOCKS = 10_200  # over all threads
THREADS = 3
CHAIN = 6


def content(h: bytes) -> np.ndarray:
    """The oracle: block ``h``'s bytes (the hash repeated; distinct hashes give distinct blocks)."""
    return np.tile(np.frombuffer(h, np.uint8), BB // 16)


def contents(keys: list[bytes]) -> np.ndarray:
    return np.stack([content(k) for k in keys]) if keys else np.empty((0, BB), np.uint8)


def wrong_rows(keys: list[bytes], rows: np.ndarray) -> list[bytes]:
    """Keys whose row differs from the oracle."""
    bad = np.flatnonzero((rows != contents(keys)).any(axis=1))
    return [keys[i] for i in bad]


@contextmanager
def tight_switching() -> Iterator[None]:
    """Switch Python threads every 10 us so interleavings a loaded server sees happen here too."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_threads(work: Callable[[int, random.Random], None]) -> None:
    errors: list[BaseException] = []

    def body(t: int) -> None:
        try:
            work(t, random.Random(1000 + t))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    ts = [threading.Thread(target=body, args=(t,)) for t in range(THREADS)]
    with tight_switching():
        for th in ts:
            th.start()
        for th in ts:
            th.join(120)
    assert not any(th.is_alive() for th in ts), "a worker thread hung"
    if errors:
        raise errors[0]


def churn(m: BlockManager, keys_of: list[list[bytes]], wrong_loads: list[bytes], prefetch: bool) -> None:
    """Each thread stores its chains, evicts, loads and (optionally) prefetches its older blocks."""

    def work(t: int, rnd: random.Random) -> None:
        mine = keys_of[t]
        for c in range(0, len(mine), CHAIN):
            chain = mine[c : c + CHAIN]
            try:
                m.store(chain, contents(chain))
            except CapacityError:
                continue  # everything pinned by the other threads' loads this instant
            if rnd.random() < 0.5:
                m.evict(rnd.randint(1, 2 * CHAIN))
            if prefetch and c >= 4 * CHAIN and rnd.random() < 0.3:
                s = rnd.randrange(0, c - CHAIN)
                m.prefetch(mine[s : s + CHAIN])
            if c >= CHAIN and rnd.random() < 0.2:
                s = rnd.randrange(0, c)
                ks = mine[s : s + 2]
                out = np.empty((len(ks), BB), np.uint8)
                try:
                    m.load(ks, out)
                except (BlockNotFoundError, CapacityError):
                    continue  # evicted everywhere meanwhile, or no room this instant: not wrong KV
                wrong_loads.extend(wrong_rows(ks, out))

    run_threads(work)


def new_keys() -> list[list[bytes]]:
    per = BLOCKS // THREADS
    return [[os.urandom(16) for _ in range(per)] for _ in range(THREADS)]


def test_evict_store_load_prefetch_threads_disk_tier_byte_exact_after_restart(tmp_path):
    cfg = KvbmConfig(
        block_bytes=BB,
        host_capacity_bytes=HOST_SLOTS * BB,
        disk_path=str(tmp_path),
        disk_capacity_bytes=(BLOCKS + 1024) * BB,
        disk_io_threads=2,
        disk_o_direct=False,
        eviction_policy="lru",
    )
    keys_of = new_keys()
    wrong_loads: list[bytes] = []
    with BlockManager(cfg) as m:
        churn(m, keys_of, wrong_loads, prefetch=False)
        m.disk.flush()
    with BlockManager(cfg) as m:  # restart: the disk tier's catalog is all that is left
        listed = m.disk.keys()
        wrong: list[bytes] = []
        step = HOST_SLOTS // 2
        for i in range(0, len(listed), step):
            ks = listed[i : i + step]
            out = np.empty((len(ks), BB), np.uint8)
            m.load(ks, out)
            wrong += wrong_rows(ks, out)
    assert len(listed) >= BLOCKS // 2, f"only {len(listed)} blocks reached disk"
    assert (len(wrong), len(wrong_loads)) == (0, 0), (
        f"{len(wrong)} of {len(listed)} blocks on disk hold another block's bytes; "
        f"{len(wrong_loads)} blocks loaded during the run did"
    )


@pytest.fixture
def serve_url() -> Iterator[str]:
    with StoreServer(ServeConfig(capacity_bytes=(BLOCKS + 2048) * BB, max_block_bytes=BB, token="tok")) as srv:
        yield srv.url


@pytest.fixture
def redis_url() -> Iterator[str]:
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'kvblockmgr[redis]')")
    from redis_server import RedisServer

    srv = RedisServer()
    try:
        srv.start()
    except RuntimeError as e:
        srv.close()
        pytest.skip(str(e))
    yield srv.url
    srv.close()


@pytest.mark.parametrize(
    ("server", "policy"),
    [("kvbm-serve", "write_behind"), ("redis", "write_behind"), ("kvbm-serve", "write_through")],
)
def test_evict_store_load_prefetch_threads_remote_tier_byte_exact(server, policy, request):
    url = request.getfixturevalue("serve_url" if server == "kvbm-serve" else "redis_url")
    cfg = KvbmConfig(
        block_bytes=BB,
        host_capacity_bytes=HOST_SLOTS * BB,
        remote_url=url,
        remote_token="tok",
        remote_write_policy=policy,
        eviction_policy="lru",
    )
    keys_of = new_keys()
    wrong_loads: list[bytes] = []
    with BlockManager(cfg) as m:
        churn(m, keys_of, wrong_loads, prefetch=True)
        m.flush_remote(60)
    everything = [k for ks in keys_of for k in ks]
    with BlockManager(cfg) as m:  # a fresh client: only what the server holds
        out = np.empty((len(everything), BB), np.uint8)
        got = m.remote.get(everything, out)
        held = [k for k, g in zip(everything, got, strict=True) if g]
        wrong = wrong_rows(held, out[np.asarray(got, bool)])
    assert len(held) >= BLOCKS // 2, f"only {len(held)} blocks reached the server"
    assert (len(wrong), len(wrong_loads)) == (0, 0), (
        f"{len(wrong)} of {len(held)} blocks on the server hold another block's bytes; "
        f"{len(wrong_loads)} blocks loaded during the run did"
    )
