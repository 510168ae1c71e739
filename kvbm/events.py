"""KV events in vLLM's own wire format and transport, without importing vLLM.

Note [KV event wire format]
---------------------------
vLLM (``vllm/distributed/kv_events.py``) publishes KV cache events on a ZeroMQ PUB socket as
three-frame messages ``(topic, seq, payload)``: ``seq`` is an 8-byte big-endian counter starting
at 0, ``payload`` a msgpack ``KVEventBatch`` encoded as the array ``[ts, events,
data_parallel_rank]``; each event is a map tagged by ``"type"``: ``BlockStored`` (``block_hashes``,
``parent_block_hash``, ``token_ids``, ``block_size``, ``lora_id``, ``medium``, ``lora_name``,
``extra_keys`` ...), ``BlockRemoved`` (``block_hashes``, ``medium``) or ``AllBlocksCleared``. A
ROUTER socket (the *replay endpoint*) answers a request ``[b"", start_seq]`` with every buffered
batch from ``start_seq`` on, each as ``[b"", topic, seq, payload]``, then ``[b"", b"", seq=-1,
b""]``. The structs below encode to the same bytes as vLLM's, so vLLM's own consumers, llm-d's
indexer and Dynamo's router read kvbm's events, and kvbm's router reads vLLM's.

kvbm's events are *self-describing*: every ``BlockStored`` carries the block's ``token_ids`` and
``block_size`` (a consumer re-hashes tokens with its own hash and never needs kvbm's hash
function) and a ``medium`` naming the tier: ``"CPU"`` (kvbm's host tier), ``"DISK"``,
``"REMOTE"`` (a shared store: ``kvbm serve``, Redis). Block hashes are kvbm's own chained hashes
(bytes), which tie a ``BlockRemoved`` to its ``BlockStored``.

The connector hands its events to vLLM (``take_events``), which publishes them on vLLM's stream
when vLLM's ``--kv-events-config`` is on; with the connector key ``events_endpoint`` it also
publishes them itself through :class:`KvEventPublisher` (useful when vLLM's events are off, or to
keep kvbm's tiers on a stream of their own).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgspec

logger = logging.getLogger("kvbm.events")

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_DISK = "DISK"
MEDIUM_REMOTE = "REMOTE"
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class _Event(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the event structs (tagged by class name, like vLLM's ``KVCacheEvent``)."""


class BlockStored(_Event, kw_only=True):
    """Blocks now present in ``medium``; ``token_ids`` holds ``len(block_hashes) * block_size`` ids.

    ``lora_id``, ``medium`` and ``lora_name`` are always encoded (vLLM's decoder requires them).
    """

    block_hashes: list[Any]
    parent_block_hash: Any
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(_Event, kw_only=True):
    """Blocks no longer present in ``medium``."""

    block_hashes: list[Any]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(_Event):
    """Every block of the publisher is gone (vLLM: its GPU prefix cache was reset)."""


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One published message: ``[ts, events, data_parallel_rank]``."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(events: Iterable[Any], ts: float | None = None, data_parallel_rank: int | None = None) -> bytes:
    """msgpack bytes of a ``KVEventBatch`` (events may be kvbm's or vLLM's structs)."""
    return _encoder.encode([time.time() if ts is None else ts, list(events), data_parallel_rank])


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode a batch published by vLLM or kvbm (unknown fields and newer event fields are ignored).

    Raises:
        kvbm.errors.InvalidArgumentError: the payload is not a KV event batch.
    """
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        from kvbm.errors import InvalidArgumentError

        raise InvalidArgumentError(f"not a KV event batch: {e}") from None


class KvEventPublisher:
    """ZeroMQ PUB publisher of KV event batches with a replay buffer served on a ROUTER socket.

    ``endpoint`` is bound when it holds ``*`` (``tcp://*:5557``), else connected (vLLM's rule);
    ``replay_endpoint`` is always bound. Publishing only queues the batch: a daemon thread encodes,
    sends and answers replay requests, so the engine's step never waits on a socket. At most
    ``buffer_steps`` batches are kept for replay; when the queue is full a batch is dropped and
    counted (subscribers see the gap in ``seq`` and ask for a replay).

    Raises:
        kvbm.errors.ConfigError: an endpoint cannot be bound or connected (named).
    """

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, *, topic: str = "",
                 buffer_steps: int = 10_000, hwm: int = 100_000, max_queue: int = 100_000,
                 data_parallel_rank: int | None = None) -> None:
        import queue

        import zmq

        from kvbm.errors import ConfigError

        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._replay = None
        try:
            if "*" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
            if replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.bind(replay_endpoint)
        except zmq.ZMQError as e:
            self._close_sockets()
            raise ConfigError(f"KV events endpoint {endpoint!r} / {replay_endpoint!r}: {e}") from None
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self.replay_endpoint = (self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
                                if self._replay is not None else None)
        self._topic = topic.encode()
        self._dp_rank = data_parallel_rank
        self._queue: queue.Queue[tuple[float, list[Any]] | None] = queue.Queue(maxsize=max_queue)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self.dropped = 0
        self.published = 0
        self._running = True
        self._thread = threading.Thread(target=self._run, name="kvbm-events", daemon=True)
        self._thread.start()

    def publish(self, events: Iterable[Any]) -> None:
        """Queue one batch (no-op for an empty one). Never blocks."""
        import queue

        evs = list(events)
        if not evs or not self._running:
            return
        try:
            self._queue.put_nowait((time.time(), evs))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        import queue

        while self._running or not self._queue.empty():
            if self._replay is not None and self._replay.poll(0):
                self._serve_replay()
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                break
            payload = encode_batch(item[1], item[0], self._dp_rank)
            seq = self._seq.to_bytes(8, "big")
            try:
                self._pub.send_multipart((self._topic, seq, payload))
            except self._zmq.ZMQError as e:  # keep the batch for replay; the subscriber sees a gap
                logger.warning("kvbm: KV events: publish failed: %s", e)
            self._buffer.append((self._seq, payload))
            self._seq += 1
            self.published += 1

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            logger.warning("kvbm: KV events: malformed replay request (%d frames)", len(frames))
            return
        ident, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= start_seq:
                self._replay.send_multipart((ident, b"", self._topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((ident, b"", b"", END_SEQ, b""))

    def close(self, timeout: float = 1.0) -> None:
        """Send what is queued (up to ``timeout`` seconds), stop the thread, close the sockets."""
        if not self._running:
            return
        self._running = False
        with contextlib.suppress(Exception):  # a full queue at shutdown: the thread exits on _running
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for s in (self._pub, self._replay):
            if s is not None:
                s.close(linger=0)
