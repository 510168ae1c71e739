"""The disk tier of the vLLM connector: one verified file per block and rank.

Layout: ``<disk_path>/<rank namespace digest>/<hh>/<hash>.kvb``; each file is a header
(magic, block hash, namespace, payload length, CRC32C of the payload) followed by the rank's
bytes of the block. Files are written to a temporary name, flushed and renamed, so a file with
the final name is complete (data first, then the name acts as the catalog commit); a reader
re-verifies hash, namespace, length and checksum, and a mismatch is a load error (the block is
recomputed by vLLM), never served.

The scheduler rebuilds its disk index at start-up by listing the files (names and sizes only,
no reads): a block counts as present when every rank has its file.
"""

from __future__ import annotations

import contextlib
import os
import queue
import struct
import threading
from collections.abc import Callable

import numpy as np

from kvbm._native import crc32c
from kvbm.errors import ChecksumError, StorageIOError

MAGIC = b"KVBMBLK1"
_HEADER = struct.Struct("<8s16s16sQI4x")
HEADER_BYTES = _HEADER.size


def rank_dir(disk_path: str, rank_namespace: bytes) -> str:
    """A rank's directory: named by the digest of the namespace the rank stores under."""
    return os.path.join(disk_path, rank_namespace.hex())


def block_path(rdir: str, h: bytes) -> str:
    hx = h.hex()
    return os.path.join(rdir, hx[:2], hx + ".kvb")


def scan(disk_path: str, rank_namespaces: list[bytes], payload_bytes: int) -> list[bytes]:
    """Hashes whose files exist, with the right size, for every rank; oldest first."""
    per_rank: list[dict[bytes, float]] = []
    want = HEADER_BYTES + payload_bytes
    for ns in rank_namespaces:
        found: dict[bytes, float] = {}
        rdir = rank_dir(disk_path, ns)
        if os.path.isdir(rdir):
            for sub in os.scandir(rdir):
                if not sub.is_dir():
                    continue
                for f in os.scandir(sub.path):
                    if not f.name.endswith(".kvb"):
                        continue
                    try:
                        st = f.stat()
                        h = bytes.fromhex(f.name[:-4])
                    except (OSError, ValueError):
                        continue
                    if st.st_size == want and len(h) == 16:
                        found[h] = st.st_mtime
        per_rank.append(found)
    common = set(per_rank[0]).intersection(*per_rank[1:]) if per_rank else set()
    return sorted(common, key=lambda h: per_rank[0][h])


def write_block(path: str, h: bytes, namespace: bytes, payload: np.ndarray) -> None:
    """Write one block file atomically (temp file + rename). Raises StorageIOError."""
    mv = memoryview(payload).cast("B")
    header = _HEADER.pack(MAGIC, h, namespace, len(mv), crc32c(mv))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(mv)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageIOError(f"writing block file {path}: {e}") from e


def read_block(path: str, h: bytes, namespace: bytes, out: np.ndarray, verify: bool = True) -> None:
    """Read one block file into ``out`` (uint8, exactly the payload size), verifying it.

    Raises:
        StorageIOError: the file is missing or unreadable.
        ChecksumError: header, length or checksum do not match (the bytes must not be used).
    """
    try:
        with open(path, "rb", buffering=0) as f:
            head = f.read(HEADER_BYTES)
            if len(head) != HEADER_BYTES:
                raise ChecksumError(f"{path}: truncated header")
            magic, fh, fns, length, crc = _HEADER.unpack(head)
            if magic != MAGIC or fh != h or fns != namespace:
                raise ChecksumError(f"{path}: header does not match block {h.hex()[:16]} / namespace")
            if length != out.nbytes:
                raise ChecksumError(f"{path}: payload is {length} bytes, expected {out.nbytes}")
            mv = memoryview(out).cast("B")
            got = f.readinto(mv)
            if got != length:
                raise ChecksumError(f"{path}: truncated payload ({got} of {length} bytes)")
    except FileNotFoundError as e:
        raise StorageIOError(f"block file {path} is missing") from e
    except OSError as e:
        raise StorageIOError(f"reading block file {path}: {e}") from e
    if verify and crc32c(mv) != crc:
        raise ChecksumError(f"{path}: checksum mismatch for block {h.hex()[:16]}")


class DiskWriter:
    """A background thread that writes host slots through to disk and deletes evicted files.

    Operations run in submission order. ``drain()`` returns ``(written, failed)`` hashes since
    the last call; ``flush()`` waits until everything submitted so far is done.
    """

    def __init__(self, rdir: str, namespace: bytes, read_slot: Callable[[int], np.ndarray]) -> None:
        self.rdir = rdir
        self.namespace = namespace
        self._read_slot = read_slot
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._written: list[bytes] = []
        self._failed: list[bytes] = []
        self._thread = threading.Thread(target=self._run, name="kvbm-disk-writer", daemon=True)
        self._thread.start()

    def write(self, h: bytes, slot: int) -> None:
        self._q.put(("w", h, slot))

    def write_buffer(self, h: bytes, payload: np.ndarray) -> None:
        """Write ``payload`` (owned by the writer from now on) as block ``h``."""
        self._q.put(("b", h, payload))

    def delete(self, h: bytes) -> None:
        self._q.put(("d", h, 0))

    def drain(self) -> tuple[list[bytes], list[bytes]]:
        with self._lock:
            w, f = self._written, self._failed
            self._written, self._failed = [], []
        return w, f

    def flush(self) -> None:
        self._q.join()

    def _run(self) -> None:
        while True:
            op, h, slot = self._q.get()
            try:
                path = block_path(self.rdir, h)
                if op in ("w", "b"):
                    try:
                        data = self._read_slot(slot) if op == "w" else slot
                        write_block(path, h, self.namespace, data)
                        ok = True
                    except StorageIOError:
                        ok = False
                    with self._lock:
                        (self._written if ok else self._failed).append(h)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            finally:
                self._q.task_done()
