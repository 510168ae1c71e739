"""Disk tier vs raw O_DIRECT on the same file system (the code lives in kvbm.bench.disk_tool so
that `kvbm bench` runs it after a plain `pip install`).

Run: python benchmarks/bench_disk.py --dir D --json OUT [--md OUT.md]
"""

import sys

from kvbm.bench.disk_tool import main

if __name__ == "__main__":
    sys.exit(main())
