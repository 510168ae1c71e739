"""A hostile ``kvbm serve`` stand-in for client tests: it speaks just enough of the protocol to
read requests, and answers them with whatever bytes a test scripts (issue 12, finding 4)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from kvbm.serve_protocol import FRAME, HELLO_OK, OP_HELLO, PROTOCOL_VERSION, ST_OK

Reply = Callable[[int, bytes], bytes | None]
"""(op, request body) -> raw reply bytes (None: close the connection)."""


def frame(op: int, status: int, body: bytes, blen: int | None = None) -> bytes:
    return FRAME.pack(op, status, 0, len(body) if blen is None else blen) + body


def hello_ok(max_batch: int = 64, max_block_bytes: int = 1 << 20, features: int = 0, put_window: int = 64,
             version: int = PROTOCOL_VERSION) -> bytes:
    return frame(OP_HELLO, ST_OK, HELLO_OK.pack(version, max_batch, max_block_bytes, features, put_window))


def _recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        k = s.recv(min(n - len(buf), 1 << 20))
        if not k:
            raise ConnectionError("closed")
        buf += k
    return bytes(buf)


class HostileServer:
    """Accepts connections on 127.0.0.1; answers HELLO with ``hello`` and requests with ``reply``.

    ``close_after_reply`` closes each connection after its first request's reply (so a client
    waiting for bytes that never come sees EOF at once instead of its timeout).
    """

    def __init__(self, hello: bytes | None = None, reply: Reply | None = None, close_after_reply: bool = False):
        self.hello = hello_ok() if hello is None else hello
        self.reply = reply or (lambda op, body: None)
        self.close_after_reply = close_after_reply
        self.requests: list[int] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"kvbm://127.0.0.1:{self._sock.getsockname()[1]}"

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except OSError:  # shutdown by close()
                return
            self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError), c:
            c.settimeout(0.05 if self.close_after_reply else 10)  # fuzz: a client that waits gets EOF soon
            _op, _st, _r, blen = FRAME.unpack(_recv(c, FRAME.size))
            _recv(c, blen)
            c.sendall(self.hello)
            while not self._stop.is_set():
                op, _st, _r, blen = FRAME.unpack(_recv(c, FRAME.size))
                body = _recv(c, min(blen, 1 << 24))
                self.requests.append(op)
                out = self.reply(op, body)
                if out is None:
                    return
                c.sendall(out)
                if self.close_after_reply:
                    return

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
