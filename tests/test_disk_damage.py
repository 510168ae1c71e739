"""The disk-tier damage campaign (issue 12): damaged copies of a real tier directory, each opened,
read, written, inspected and reopened in its own process (tests/disk_damage.py); a signal counts as
a crash. Both layouts: BlockManager's disk tier and the vLLM connector's (sharded, two ranks)."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import disk_damage  # noqa: E402

TRIALS_PER_KIND = 4


@pytest.mark.parametrize("layout", ["tier", "connector"])
def test_damage_campaign(tmp_path: Path, layout: str) -> None:
    out = disk_damage.campaign(str(tmp_path), layout, TRIALS_PER_KIND)
    stats: dict[str, Counter] = out["stats"]
    total: Counter = sum(stats.values(), Counter())
    width = max(map(len, stats))
    print(f"\ndisk damage campaign, layout {layout}: {total['trials']} trials over {len(stats)} kinds")
    for kind, c in stats.items():
        print(f"  {kind:<{width}}  trials {c['trials']:>2}  crashes {c['crashes']}  wrong {c['wrong']}  "
              f"foreign {c['foreign']}  inspect_missed {c['inspect_missed']}  hits {c['hits']:>3}  "
              f"rebuilt {c['rebuilt']}  kvbm_errors {c['kvbm_errors']}  refused {c['refused']}")
    details = "\n".join(out["foreign"][:5])
    assert len(stats) >= 10 and total["trials"] >= 60  # x2 layouts: >= 120 trials
    assert all(c["trials"] == TRIALS_PER_KIND for c in stats.values())
    assert total["crashes"] == 0, details
    assert total["wrong"] == 0
    assert total["foreign"] == 0, details
    assert total["inspect_missed"] == 0  # a flipped catalog key is reported bad, never "ok"
    # Every unusable or missing catalog was moved aside and rebuilt from the slab record headers, and
    # nothing was lost doing it (the slabs are intact in these kinds).
    for kind in ("catalog_truncate", "catalog_garbage", "catalog_old_format", "catalog_deleted"):
        assert stats[kind]["rebuilt"] == TRIALS_PER_KIND, kind
        assert stats[kind]["hits"] == TRIALS_PER_KIND * disk_damage.NBLOCKS, kind
