"""kvbm.transfer: move KV blocks between processes with one-sided UCX put/get.

The byte moving is native (``transfer/`` in the source tree, see ``docs/transfer.md``): one call
posts a whole batch of (local address, remote address, length) operations, and completion is a
:class:`TransferHandle`. This module is the control plane around it:

* :class:`TransferEngine` owns a UCP context and worker, registers memory (host, or CUDA device
  pointers) and describes itself as :meth:`TransferEngine.metadata` bytes (worker address plus
  every registered region's address, length and packed remote key).
* Metadata travels over any channel. :meth:`TransferEngine.listen` / :meth:`TransferEngine.connect`
  give a minimal one: a TCP socket that hands the current metadata to whoever connects.
* :class:`Peer` is one connection; it posts puts/gets into the peer's registered regions and
  can send small notifications, which arrive after the data they follow.
* Between processes of one host, GPU memory to GPU memory moves through CUDA IPC instead of UCX:
  a registered ``cuda`` region is exported (its IPC handle travels in the metadata), the peer
  maps it on first use and one kernel copies every chunk of a batch (Note [CUDA IPC path] in
  ``transfer/cuda_ipc.h``). Same handle protocol and notification order; :attr:`Peer.cuda_ipc`
  and :attr:`TransferHandle.cuda_ipc` say which path was taken. ``cuda_ipc=False`` (or
  ``KVBM_TRANSFER_CUDA_IPC=0``) keeps everything on UCX.

UCX is optional: without it (a build with ``KVBM_UCX=OFF``, or no ``libucx`` at run time) creating
an engine raises :class:`~kvbm.errors.UnsupportedError`; ``import kvbm`` never needs UCX.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm import _native
from kvbm.errors import InvalidArgumentError, PeerError, UnsupportedError

__all__ = [
    "MemoryRegion",
    "Notification",
    "Peer",
    "RemoteRegion",
    "TransferEngine",
    "TransferHandle",
    "ucx_available",
]

_MAGIC = b"KVBMX2"  # X2: regions carry a CUDA IPC descriptor (X1, without it, is still read)
_MAGIC_V1 = b"KVBMX1"
_CUDA_IPC_ENV = "KVBM_TRANSFER_CUDA_IPC"
_MAX_METADATA = 1 << 24
_REGION = "<QQBIH"  # addr, length, memory (1 = cuda), rkey bytes, CUDA IPC descriptor bytes
_REGION_V1 = "<QQBI"


def _ucx_lib_dir() -> str:
    """Directory holding libucp.so.0: ``$KVBM_UCX_LIB_DIR`` if set, else the ``libucx`` wheel's lib/,
    else "" (the system loader path)."""
    env = os.environ.get("KVBM_UCX_LIB_DIR")
    if env:
        return env
    try:
        import libucx  # PyPI libucx-cu13 (the `ucx` extra)
    except ImportError:
        return ""
    return os.path.join(os.path.dirname(libucx.__file__), "lib")


def ucx_available() -> tuple[bool, str]:
    """Whether a transfer engine can be created here, and if not, why (for skips and messages)."""
    if not getattr(_native, "ucx_compiled", False):
        return False, "this kvbm build has no transfer engine (built with KVBM_UCX=OFF or without UCX headers)"
    lib = _ucx_lib_dir()
    path = os.path.join(lib, "libucp.so.0") if lib else "libucp.so.0"
    if lib and not os.path.exists(path):
        return False, f"UCX library not found at {path}"
    if not lib:
        import ctypes.util

        if ctypes.util.find_library("ucp") is None:
            return False, "UCX is not installed (pip install 'kvblockmgr[ucx]')"
    return True, ""


@dataclass(frozen=True)
class MemoryRegion:
    """Memory registered with an engine. ``rkey`` is the packed remote key a peer needs; ``ipc``
    the CUDA IPC descriptor peers on this host map (empty when not exported, ``ipc_note`` says why)."""

    id: int
    addr: int
    length: int
    memory: str
    rkey: bytes
    ipc: bytes = field(default=b"", repr=False)
    ipc_note: str = ""


@dataclass(frozen=True)
class RemoteRegion:
    """A region a peer registered, as described by its metadata (``ipc``: its CUDA IPC
    descriptor, empty when the peer did not export it)."""

    addr: int
    length: int
    memory: str
    ipc: bytes = field(default=b"", repr=False)

    @property
    def cuda_ipc(self) -> bool:
        """True when the peer exported this region for CUDA IPC."""
        return bool(self.ipc)


@dataclass(frozen=True)
class Notification:
    """A message a peer sent with :meth:`Peer.notify` or ``put(..., notify=...)``."""

    sender: str
    message: bytes


class TransferHandle:
    """Completion of one batch of transfers (or a flush or notification).

    :meth:`wait` raises :class:`~kvbm.errors.TransferTimeoutError` when the deadline passes (the
    batch stays in flight) and :class:`~kvbm.errors.PeerError` when the peer failed.
    """

    __slots__ = ("_req",)

    def __init__(self, req: Any) -> None:
        self._req = req

    @property
    def done(self) -> bool:
        """True once finished, successfully or not (never raises)."""
        return bool(self._req.done)

    def test(self) -> bool:
        """True when complete, False while in flight; raises the batch's error if it failed."""
        return bool(self._req.test())

    def wait(self, timeout: float | None = None) -> None:
        """Block (without the GIL) until complete; ``timeout`` in seconds, None = no limit."""
        self._req.wait(timeout)

    @property
    def nbytes(self) -> int:
        """Bytes moved by this batch."""
        return int(self._req.bytes)

    @property
    def count(self) -> int:
        """Number of operations in this batch."""
        return int(self._req.count)

    @property
    def error(self) -> str | None:
        """The failure's text once failed, else None."""
        return self._req.error

    @property
    def cuda_ipc(self) -> bool:
        """True when this batch moved through the CUDA IPC path (one kernel), False for UCX."""
        return bool(self._req.cuda_ipc)


def _u64(x: Any, what: str) -> np.ndarray | int:
    if isinstance(x, (int, np.integer)):
        return int(x)
    a = np.asarray(x)
    if a.ndim != 1:
        raise InvalidArgumentError(f"{what}: expected a 1-D array of addresses/lengths, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{what}: expected integers, got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and int(a.min()) < 0:
        raise InvalidArgumentError(f"{what}: negative value {int(a.min())}")
    return np.ascontiguousarray(a, dtype=np.uint64)


class Peer:
    """A connection from a :class:`TransferEngine` to one peer engine.

    Transfers address the peer's memory by its own virtual addresses (see
    :attr:`remote_regions`); every local and remote range must lie inside one registered region.
    """

    def __init__(self, engine: TransferEngine, ep: Any, name: str, regions: list[RemoteRegion]) -> None:
        self._engine = engine
        self._ep = ep
        self.name = name
        self.remote_regions = regions

    def put(self, local: Any, remote: Any, lengths: Any, notify: bytes | None = None) -> TransferHandle:
        """Write ``lengths`` bytes from each local address to the matching remote address.

        ``local``/``remote`` are 1-D integer arrays (or ints) of equal length; ``lengths`` is one
        int or an array of the same length. With ``notify`` (at most 4096 bytes) the peer receives
        a :class:`Notification` once all of the batch's data is in place there. Raises
        :class:`~kvbm.errors.InvalidArgumentError` (nothing posted) for a range outside the
        registered regions and :class:`~kvbm.errors.PeerError` if the peer has failed.
        The batch moves through CUDA IPC (one kernel, :attr:`TransferHandle.cuda_ipc`) when every
        range qualifies (see :attr:`cuda_ipc`), else through UCX; completion, notification order
        and errors are the same on both paths (a CUDA failure is :class:`~kvbm.errors.CudaError`).
        """
        return TransferHandle(
            self._ep.put(_u64(local, "local"), _u64(remote, "remote"), _u64(lengths, "lengths"), notify)
        )

    def get(self, local: Any, remote: Any, lengths: Any, notify: bytes | None = None) -> TransferHandle:
        """Read from the peer's remote addresses into local ones (arguments as :meth:`put`)."""
        return TransferHandle(
            self._ep.get(_u64(local, "local"), _u64(remote, "remote"), _u64(lengths, "lengths"), notify)
        )

    def put_blocks(
        self,
        local_base: int,
        local_blocks: Any,
        remote_base: int,
        remote_blocks: Any,
        block_bytes: int,
        notify: bytes | None = None,
    ) -> TransferHandle:
        """Put whole blocks: block ``local_blocks[i]`` of the local array at ``local_base`` goes to
        block ``remote_blocks[i]`` of the peer's array at ``remote_base`` (blocks of ``block_bytes``)."""
        loc, rem = self._block_addrs(local_base, local_blocks, remote_base, remote_blocks, block_bytes)
        return self.put(loc, rem, block_bytes, notify)

    def get_blocks(
        self,
        local_base: int,
        local_blocks: Any,
        remote_base: int,
        remote_blocks: Any,
        block_bytes: int,
        notify: bytes | None = None,
    ) -> TransferHandle:
        """Get whole blocks (the mirror of :meth:`put_blocks`)."""
        loc, rem = self._block_addrs(local_base, local_blocks, remote_base, remote_blocks, block_bytes)
        return self.get(loc, rem, block_bytes, notify)

    @staticmethod
    def _block_addrs(
        local_base: int, local_blocks: Any, remote_base: int, remote_blocks: Any, block_bytes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if block_bytes <= 0:
            raise InvalidArgumentError(f"block_bytes must be > 0, got {block_bytes}")
        lb = np.asarray(local_blocks, dtype=np.int64).ravel()
        rb = np.asarray(remote_blocks, dtype=np.int64).ravel()
        if lb.shape != rb.shape:
            raise InvalidArgumentError(f"{lb.size} local blocks but {rb.size} remote blocks")
        if lb.size and (lb.min() < 0 or rb.min() < 0):
            raise InvalidArgumentError("block ids must be >= 0")
        loc = np.uint64(local_base) + lb.astype(np.uint64) * np.uint64(block_bytes)
        rem = np.uint64(remote_base) + rb.astype(np.uint64) * np.uint64(block_bytes)
        return loc, rem

    def notify(self, message: bytes) -> TransferHandle:
        """Send a small message (<= 4096 bytes). It is not ordered after transfers still in flight:
        use ``put(..., notify=...)`` for "data is there" messages."""
        return TransferHandle(self._ep.notify(bytes(message)))

    def flush(self) -> TransferHandle:
        """Completes when everything posted so far to this peer is complete at the peer."""
        return TransferHandle(self._ep.flush())

    def check(self) -> None:
        """Raise :class:`~kvbm.errors.PeerError` if the peer failed or this connection is closed."""
        self._ep.check_health()

    @property
    def failed(self) -> bool:
        """True after the peer failed or :meth:`close`."""
        return bool(self._ep.failed)

    @property
    def num_remote_keys(self) -> int:
        """Remote keys still held for this peer (0 once it failed or was closed)."""
        return int(self._ep.num_remote_regions)

    @property
    def cuda_ipc(self) -> bool:
        """True when transfers to this peer can take the CUDA IPC path: this engine runs it and
        the peer exported at least one region from this host that has not failed to map. A batch
        takes it when all its local ranges are in this engine's ``cuda`` regions of one device
        and all its remote ranges in such regions; any other batch goes through UCX."""
        return bool(self._ep.cuda_ipc)

    def cuda_ipc_states(self) -> dict[int, str]:
        """Each remote region's CUDA IPC state by address: ``none`` (not exported), ``other host``,
        ``not mapped`` (mapped on first use), ``mapped``, or ``failed: <why>`` (UCX is used)."""
        return {int(a): str(st) for a, st in self._ep.cuda_ipc_states()}

    def close(self, force: bool = False, timeout: float = 5.0) -> None:
        """Close the connection. Without ``force`` in-flight transfers finish first (up to ``timeout``
        seconds, then they are cancelled); with ``force`` they fail with PeerError at once."""
        self._ep.close(force, timeout)

    def __repr__(self) -> str:
        return f"Peer({self.name!r}, regions={len(self.remote_regions)}, failed={self.failed})"


class TransferEngine:
    """A UCX transfer engine: one UCP context and worker, its registered memory and its peers.

    Args:
        name: this engine's name; peers see it as the sender of notifications.
        transports: UCX transports (``UCX_TLS``), e.g. ``"tcp"`` or ``"sm,tcp"``; None = UCX's
            own default / environment.
        net_devices: ``UCX_NET_DEVICES`` (e.g. ``"lo"``); None = UCX's default / environment.
        error_handling: endpoints detect peer failure (UCX error mode PEER). UCX's shared-memory
            transports need it off; then a dead peer shows only as a wait timing out.
        progress: ``"thread"`` (an engine thread progresses the worker: it spins while transfers
            are in flight and sleeps on the worker's event fd when idle) or ``"caller"`` (only
            :meth:`TransferHandle.wait`, :meth:`progress` and the notification calls progress it:
            a passive peer must then call :meth:`progress` for tcp-emulated puts to land).
        spin_us: with ``progress="thread"``, how long the thread keeps polling after the last
            activity before it sleeps.
        cuda_ipc: the same-host CUDA IPC path (export ``cuda`` regions, map peers' ones, copy
            with one kernel). None = on unless ``KVBM_TRANSFER_CUDA_IPC=0``. Without CUDA or a GPU
            it is off whatever this says (:attr:`cuda_ipc` tells).

    Raises:
        UnsupportedError: no UCX in this build or on this machine.
        ConfigError: UCX rejected the transports/devices.
    """

    def __init__(
        self,
        name: str,
        *,
        transports: str | None = None,
        net_devices: str | None = None,
        error_handling: bool = True,
        progress: str = "thread",
        spin_us: int = 200,
        cuda_ipc: bool | None = None,
    ) -> None:
        ok, why = ucx_available()
        if not ok:
            raise UnsupportedError(why)
        if progress not in ("thread", "caller"):
            raise InvalidArgumentError(f"progress must be 'thread' or 'caller', got {progress!r}")
        if not name or len(name.encode()) > 255:
            raise InvalidArgumentError("name must be 1..255 bytes")
        self.name = name
        self.progress_mode = progress
        if cuda_ipc is None:
            cuda_ipc = os.environ.get(_CUDA_IPC_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        self._native = _native.UcxEngine(
            _ucx_lib_dir(),
            name,
            transports or "",
            net_devices or "",
            error_handling,
            progress == "thread",
            spin_us,
            cuda_ipc=bool(cuda_ipc),
        )
        self._regions: dict[int, MemoryRegion] = {}
        self._peers: list[Peer] = []
        self._server: socket.socket | None = None
        self._server_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- memory ----
    def register(self, buffer: Any, nbytes: int | None = None, memory: str = "host") -> MemoryRegion:
        """Register memory for transfers: a buffer (numpy array, bytearray, ...; kept alive by the
        caller) or an int address with ``nbytes``. ``memory="cuda"`` for a device pointer (an int).
        Raises InvalidArgumentError for a bad range, AlreadyExistsError when it overlaps a
        registered region."""
        if isinstance(buffer, (int, np.integer)):
            if nbytes is None:
                raise InvalidArgumentError("register: an int address needs nbytes")
            addr, length = int(buffer), int(nbytes)
        else:
            if memory != "host":
                raise InvalidArgumentError("register: a Python buffer is host memory; pass a device pointer as an int")
            mv = memoryview(buffer)
            if not mv.c_contiguous:
                raise InvalidArgumentError("register: buffer must be C-contiguous")
            arr = np.frombuffer(mv.cast("B"), dtype=np.uint8)
            addr, length = int(arr.ctypes.data), int(arr.nbytes)
            if nbytes is not None and nbytes != length:
                raise InvalidArgumentError(f"register: buffer has {length} bytes, nbytes says {nbytes}")
        r = self._native.register(addr, length, memory)
        region = MemoryRegion(int(r.id), int(r.addr), int(r.length), str(r.memory), bytes(r.rkey), bytes(r.ipc),
                              str(r.ipc_note))
        with self._lock:
            self._regions[region.id] = region
        return region

    def deregister(self, region: MemoryRegion) -> None:
        """Release a registration. Transfers still in flight over it are the caller's error."""
        self._native.deregister(region.id)
        with self._lock:
            self._regions.pop(region.id, None)

    @property
    def regions(self) -> list[MemoryRegion]:
        """Currently registered regions."""
        with self._lock:
            return list(self._regions.values())

    # ---- metadata / peers ----
    @property
    def address(self) -> bytes:
        """The UCP worker address (opaque bytes)."""
        return bytes(self._native.address)

    @property
    def cuda_ipc(self) -> bool:
        """Whether this engine runs the same-host CUDA IPC path (asked for, CUDA built in, a GPU)."""
        return bool(self._native.cuda_ipc)

    def metadata(self) -> bytes:
        """This engine's name, worker address and registered regions (address, length, memory kind,
        packed remote key, CUDA IPC descriptor), as bytes for a peer's :meth:`add_peer`. Regions
        registered later need a fresh metadata exchange."""
        name = self.name.encode()
        addr = self.address
        out = [_MAGIC, struct.pack("<B", len(name)), name, struct.pack("<I", len(addr)), addr]
        regions = self.regions
        out.append(struct.pack("<I", len(regions)))
        for r in regions:
            out.append(struct.pack(_REGION, r.addr, r.length, 1 if r.memory == "cuda" else 0, len(r.rkey), len(r.ipc)))
            out.append(r.rkey)
            out.append(r.ipc)
        return b"".join(out)

    @staticmethod
    def parse_metadata(data: bytes) -> tuple[str, bytes, list[tuple[RemoteRegion, bytes]]]:
        """Decode :meth:`metadata` bytes; raises InvalidArgumentError when malformed."""
        try:
            mv = memoryview(data)
            magic = bytes(mv[: len(_MAGIC)])
            if magic not in (_MAGIC, _MAGIC_V1):
                raise ValueError("bad magic")
            fmt = _REGION if magic == _MAGIC else _REGION_V1
            o = len(_MAGIC)
            (nl,) = struct.unpack_from("<B", mv, o)
            o += 1
            name = bytes(mv[o : o + nl]).decode()
            o += nl
            (al,) = struct.unpack_from("<I", mv, o)
            o += 4
            addr = bytes(mv[o : o + al])
            o += al
            (nr,) = struct.unpack_from("<I", mv, o)
            o += 4
            regions = []
            for _ in range(nr):
                a, ln, mem, kl, *rest = struct.unpack_from(fmt, mv, o)
                il = rest[0] if rest else 0
                o += struct.calcsize(fmt)
                rkey = bytes(mv[o : o + kl])
                ipc = bytes(mv[o + kl : o + kl + il])
                if len(rkey) != kl or len(ipc) != il:
                    raise ValueError("truncated region")
                o += kl + il
                regions.append((RemoteRegion(a, ln, "cuda" if mem else "host", ipc), rkey))
            if o != len(mv) or len(addr) != al:
                raise ValueError("length mismatch")
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise InvalidArgumentError(f"transfer metadata is malformed ({e}); {len(data)} bytes") from None
        return name, addr, regions

    def add_peer(self, metadata: bytes) -> Peer:
        """Connect to the engine that produced ``metadata`` and import its regions' remote keys and
        CUDA IPC descriptors (mapped on first use, only when the peer runs on this host). Raises
        InvalidArgumentError for malformed metadata."""
        name, addr, regions = self.parse_metadata(metadata)
        ep = self._native.connect(addr, name)
        try:
            for region, rkey in regions:
                ep.add_remote_region(region.addr, region.length, rkey, region.ipc)
        except BaseException:
            ep.close(True, 0.0)  # a region the peer described badly: no half-imported peer
            raise
        peer = Peer(self, ep, name, [r for r, _ in regions])
        with self._lock:
            self._peers = [p for p in self._peers if not p.failed]
            self._peers.append(peer)
        return peer

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve :meth:`metadata` over TCP: each connection receives the current metadata
        (a 4-byte little-endian length, then the bytes). Returns the bound (host, port)."""
        if self._server is not None:
            return self._server.getsockname()[:2]
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(64)
        srv.settimeout(0.2)
        self._server = srv

        def serve() -> None:
            while self._server is srv:
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                with conn:
                    try:
                        md = self.metadata()
                        conn.sendall(struct.pack("<I", len(md)) + md)
                    except OSError:
                        pass

        self._server_thread = threading.Thread(target=serve, name=f"kvbm-transfer-md-{self.name}", daemon=True)
        self._server_thread.start()
        return srv.getsockname()[:2]

    def connect(self, host: str, port: int, timeout: float = 10.0) -> Peer:
        """Fetch a peer's metadata from its :meth:`listen` socket and :meth:`add_peer` it.
        Raises PeerError when the peer cannot be reached."""
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                head = _recv_exact(s, 4)
                (n,) = struct.unpack("<I", head)
                if n > _MAX_METADATA:
                    raise PeerError(f"peer at {host}:{port} sent {n} bytes of metadata (limit {_MAX_METADATA})")
                md = _recv_exact(s, n)
        except OSError as e:
            raise PeerError(f"cannot fetch transfer metadata from {host}:{port}: {e}") from None
        return self.add_peer(md)

    @property
    def peers(self) -> list[Peer]:
        """Peers added and not failed."""
        with self._lock:
            return [p for p in self._peers if not p.failed]

    # ---- notifications / progress ----
    def notifications(self, max: int = 0) -> list[Notification]:
        """Take the notifications received so far (oldest first; ``max`` 0 = all)."""
        return [Notification(s.decode(errors="replace"), m) for s, m in self._native.take_notifications(max)]

    def wait_notification(self, timeout: float | None = None) -> bool:
        """Block until at least one notification is queued (True) or ``timeout`` passes (False)."""
        return bool(self._native.wait_notification(timeout))

    def progress(self) -> int:
        """Progress the worker once (needed only with ``progress="caller"``); returns events handled."""
        return int(self._native.progress())

    @property
    def ucx_version(self) -> str:
        """The loaded UCX library's version string."""
        return str(self._native.ucx_version)

    def close(self) -> None:
        """Stop serving metadata, fail what is in flight, close peers and release all memory
        registrations. Idempotent."""
        srv, self._server = self._server, None
        if srv is not None:
            srv.close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=2)
        self._native.shutdown()
        with self._lock:
            self._regions.clear()
            self._peers.clear()

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise PeerError(f"connection closed after {len(buf)} of {n} bytes of transfer metadata")
        buf += chunk
    return bytes(buf)
