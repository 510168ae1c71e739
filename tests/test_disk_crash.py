"""Crash consistency of the disk tier: kill -9 a writer at random points, reopen, and check that
every listed block reads back byte-exact, none is served wrong, and the tier keeps working.

CI runs 20 trials; KVBM_SLOW_TESTS=1 runs 300 more (test_crash_many)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from kvbm.tiers.disk import DiskTier

SLOT = 16384
SLOTS = 48

# The writer stores, loads, removes and (the tier being small) evicts as fast as it can until
# killed. Block contents are a pure function of the key, so the checker can tell any served
# byte from the right one.
WRITER = textwrap.dedent(
    """
    import random, sys
    import numpy as np
    from kvbm.tiers.disk import DiskTier
    d, base, durability, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    SLOT, SLOTS = {slot}, {slots}
    def content(key):
        n = 1 + (key * 2654435761) % SLOT
        return np.random.default_rng(key).integers(0, 256, n, dtype=np.uint8)
    rnd = random.Random(seed)
    t = DiskTier(d, slot_bytes=SLOT, capacity_bytes=SLOT * SLOTS, durability=durability, io_threads=3)
    print("ready", flush=True)
    k = base
    while True:
        n = rnd.randint(1, 8)
        keys = list(range(k, k + n))
        k += n
        if rnd.random() < 0.5:
            t.put(keys, [content(x) for x in keys])
        else:
            h = t.put_async(keys, [content(x) for x in keys])
            if rnd.random() < 0.5:
                h.wait()
        have = t.keys()
        if have and rnd.random() < 0.5:
            pick = [int.from_bytes(b, "big") for b in rnd.sample(have, min(len(have), 4))]
            outs = [np.empty(len(content(x)), np.uint8) for x in pick]
            for x, ok, o in zip(pick, t.get(pick, outs), outs):
                assert not ok or np.array_equal(o, content(x)), "served wrong bytes"
        if have and rnd.random() < 0.1:
            t.remove([rnd.choice(have)])
    """
).replace("{slot}", str(SLOT)).replace("{slots}", str(SLOTS))


def content(key: int) -> np.ndarray:
    n = 1 + (key * 2654435761) % SLOT
    return np.random.default_rng(key).integers(0, 256, n, dtype=np.uint8)


def crash_trials(d: Path, trials: int, seed: int) -> dict[str, int]:
    rnd = random.Random(seed)
    totals = {"blocks_checked": 0, "killed_mid_run": 0}
    for trial in range(trials):
        durability = rnd.choice(["none", "none", "batch", "always"])
        p = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(d), str((seed * 10_000 + trial + 1) * 1_000_000), durability,
             str(rnd.randrange(1 << 30))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",  # the installed kvbm
        )  # fmt: skip
        line = p.stdout.readline()
        assert line.strip() == "ready", p.stderr.read()
        time.sleep(rnd.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        err = p.stderr.read()
        assert p.returncode == -signal.SIGKILL, f"writer died on its own ({p.returncode}): {err}"
        assert "served wrong bytes" not in err
        totals["killed_mid_run"] += 1

        with DiskTier(d, slot_bytes=SLOT, capacity_bytes=SLOT * SLOTS, durability="none") as t:
            st = t.stats()
            assert st["dropped_at_open"] == 0, f"trial {trial}: incomplete records after kill -9"
            keys = [int.from_bytes(b, "big") for b in t]
            outs = [np.empty(t.length_of(k), np.uint8) for k in keys]
            res = t.get(keys, outs)
            for k, ok, o in zip(keys, res, outs, strict=True):
                assert ok, f"trial {trial}: listed block {k} did not load: {t.stats()}"
                assert np.array_equal(o, content(k)), f"trial {trial}: block {k} served wrong"
            assert t.stats()["checksum_failures"] == 0
            totals["blocks_checked"] += len(keys)
            # the tier keeps working after the crash
            fresh = [10**15 + trial * 10 + i for i in range(3)]
            assert t.put(fresh, [content(k) for k in fresh]) == [True] * 3
            for k in fresh:
                o = np.empty(len(content(k)), np.uint8)
                assert t.get([k], [o]) == [True] and np.array_equal(o, content(k))
            t.remove(fresh)
    return totals


def test_crash_kill9_20_trials(tmp_path: Path) -> None:
    totals = crash_trials(tmp_path, 20, seed=1)
    assert totals["killed_mid_run"] == 20
    assert totals["blocks_checked"] > 0


@pytest.mark.slow
def test_crash_many(tmp_path: Path) -> None:
    totals = crash_trials(tmp_path, 300, seed=2)
    assert totals["killed_mid_run"] == 300
