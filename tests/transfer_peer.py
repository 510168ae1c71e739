"""A transfer-engine peer process for tests and benchmarks (run as a script).

It registers one buffer (host memory filled from --seed, or with --cuda a GPU buffer via torch;
with --split as two regions, its halves, which then share one CUDA allocation),
serves its metadata on 127.0.0.1, prints ``PORT <n>`` and then answers notifications:
``digest <offset> <length> <tag>`` prints ``DIGEST <tag> <sha256 hex>`` of that buffer range,
``quit`` exits. It also exits when its stdin closes (its parent went away).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="peer")
    ap.add_argument("--transports", default="tcp")
    ap.add_argument("--net-devices", default="lo")
    ap.add_argument("--error-handling", type=int, default=1)
    ap.add_argument("--progress", default="thread")
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--split", action="store_true")
    args = ap.parse_args()

    from kvbm.transfer import TransferEngine

    eng = TransferEngine(args.name, transports=args.transports, net_devices=args.net_devices,
                         error_handling=bool(args.error_handling), progress=args.progress)
    init = np.random.default_rng(args.seed).integers(0, 256, args.size, dtype=np.uint8)
    if args.cuda:
        import torch

        buf = torch.from_numpy(init).cuda()
        half = buf.numel() // 2 if args.split else buf.numel()
        for off in range(0, buf.numel(), half):
            eng.register(buf.data_ptr() + off, min(half, buf.numel() - off), memory="cuda")

        def view(off: int, ln: int) -> bytes:
            torch.cuda.synchronize()
            return buf[off : off + ln].cpu().numpy().tobytes()
    else:
        buf = init
        eng.register(buf)

        def view(off: int, ln: int) -> bytes:
            return buf[off : off + ln].tobytes()

    _, port = eng.listen("127.0.0.1", 0)
    print(f"PORT {port}", flush=True)

    def watch_stdin() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    while True:
        if not eng.wait_notification(0.2):
            continue
        for n in eng.notifications():
            parts = n.message.decode().split()
            if parts[0] == "quit":
                eng.close()
                return
            if parts[0] == "digest":
                off, ln, tag = int(parts[1]), int(parts[2]), parts[3]
                print(f"DIGEST {tag} {hashlib.sha256(view(off, ln)).hexdigest()}", flush=True)


if __name__ == "__main__":
    main()
