"""The router's subscriber: one thread reading every instance's KV-event streams into the index.

Each stream (vLLM's, and the connector's own when configured) is a ZeroMQ SUB socket plus,
optionally, a DEALER to its replay endpoint. The subscriber tracks the next expected ``seq`` per
stream: on a gap it asks the replay endpoint for the missed batches (applied in order, duplicates
skipped); a ``seq`` below the expected one means the publisher restarted, so the blocks that
stream reported are forgotten first. At start every stream with a replay endpoint is replayed
from 0, so a restarted router rebuilds its index from what the publishers still buffer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvbm.events import decode_batch
from kvbm.router.index import CPU, DISK, GPU, REMOTE

logger = logging.getLogger("kvbm.router")


@dataclass
class Stream:
    slot: int
    endpoint: str
    replay: str | None
    clears: tuple[int, ...]
    next_seq: int = -1  # -1: nothing seen yet
    batches: int = 0
    replayed: int = 0
    gaps: int = 0
    restarts: int = 0
    sub: Any = None
    dealer: Any = None


def vllm_stream(slot: int, endpoint: str, replay: str | None) -> Stream:
    """vLLM's stream: AllBlocksCleared there is a reset of its GPU prefix cache."""
    return Stream(slot, endpoint, replay, (GPU,))


def kvbm_stream(slot: int, endpoint: str, replay: str | None) -> Stream:
    return Stream(slot, endpoint, replay, (CPU, DISK, REMOTE))


class Subscriber:
    """Reads batches from every stream and hands them to ``apply(slot, events, clears)``.

    ``apply`` and ``clear`` run on the subscriber thread; the caller makes them safe against its
    own readers (the router holds one lock around the index).
    """

    def __init__(self, streams: list[Stream], apply: Callable[[int, list[Any], tuple[int, ...]], None],
                 clear: Callable[[int, tuple[int, ...]], None], replay_timeout_s: float = 2.0) -> None:
        import zmq

        self._zmq = zmq
        self.streams = streams
        self._apply = apply
        self._clear = clear
        self._timeout_ms = int(replay_timeout_s * 1000)
        self._ctx = zmq.Context.instance()
        self._poller = zmq.Poller()
        self._by_sock: dict[Any, Stream] = {}
        for st in streams:
            st.sub = self._ctx.socket(zmq.SUB)
            st.sub.setsockopt(zmq.SUBSCRIBE, b"")
            st.sub.setsockopt(zmq.RCVHWM, 1_000_000)
            st.sub.connect(st.endpoint)
            self._poller.register(st.sub, zmq.POLLIN)
            self._by_sock[st.sub] = st
        self.decode_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvbm-router-events", daemon=True)

    def start(self) -> Subscriber:
        self._thread.start()
        return self

    def _run(self) -> None:
        for st in self.streams:
            if st.replay:
                self._replay(st, 0)
        while not self._stop.is_set():
            try:
                ready = dict(self._poller.poll(100))
            except self._zmq.ZMQError:
                break
            for sock in ready:
                st = self._by_sock[sock]
                while True:
                    try:
                        frames = sock.recv_multipart(self._zmq.NOBLOCK)
                    except self._zmq.Again:
                        break
                    if len(frames) == 3:
                        self._on_batch(st, int.from_bytes(frames[1], "big", signed=True), frames[2], live=True)

    def _on_batch(self, st: Stream, seq: int, payload: bytes, live: bool) -> None:
        if st.next_seq >= 0 and seq < st.next_seq:
            if not live:
                return  # a replayed batch already applied
            # A live seq going backwards: the publisher restarted; what it reported is stale.
            st.restarts += 1
            self._clear(st.slot, st.clears)
            st.next_seq = -1
        if live and st.replay and st.next_seq >= 0 and seq > st.next_seq:
            st.gaps += 1
            self._replay(st, st.next_seq)
            if seq < st.next_seq:
                return
        try:
            batch = decode_batch(payload)
        except Exception as e:  # noqa: BLE001 - a malformed batch is counted and skipped
            self.decode_errors += 1
            logger.warning("kvbm router: stream %s: %s", st.endpoint, e)
        else:
            self._apply(st.slot, batch.events, st.clears)
        st.batches += 1
        st.next_seq = seq + 1

    def _replay(self, st: Stream, start: int) -> None:
        zmq = self._zmq
        if st.dealer is None:
            st.dealer = self._ctx.socket(zmq.DEALER)
            st.dealer.setsockopt(zmq.LINGER, 0)
            st.dealer.connect(st.replay)
        st.dealer.send_multipart([b"", start.to_bytes(8, "big")])
        while st.dealer.poll(self._timeout_ms):
            frames = st.dealer.recv_multipart()
            if len(frames) != 4:
                continue
            seq = int.from_bytes(frames[2], "big", signed=True)
            if seq < 0:
                return
            st.replayed += 1
            self._on_batch(st, seq, frames[3], live=False)
        # No answer: the replay endpoint is gone; reconnect next time.
        st.dealer.close(linger=0)
        st.dealer = None

    def stats(self) -> list[dict[str, Any]]:
        return [{"slot": s.slot, "endpoint": s.endpoint, "batches": s.batches, "replayed": s.replayed,
                 "gaps": s.gaps, "restarts": s.restarts, "next_seq": s.next_seq} for s in self.streams]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for st in self.streams:
            for s in (st.sub, st.dealer):
                if s is not None:
                    s.close(linger=0)
