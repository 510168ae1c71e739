"""kvbm's log records inside vLLM: through vLLM's own logging setup.

vLLM configures only its ``vllm`` logger (handler, level ``VLLM_LOGGING_LEVEL``, its formatter with
timestamp and source; the process prefix such as ``(EngineCore pid=...)`` is added to the stream)
and leaves the root logger alone. kvbm logs under ``kvbm.*``: without this module its INFO lines
are dropped (the root logger's WARNING level) and its warnings print bare through Python's
last-resort handler.

:func:`attach_to_vllm_logging` gives the ``kvbm`` logger one handler that hands each record to the
``vllm`` logger's *current* handlers at emit time (vLLM may re-run its ``dictConfig`` in a spawned
process after kvbm was imported, replacing its handler objects), at vLLM's level. It does nothing
when the application configured the ``kvbm`` logger itself (it has handlers) or when vLLM's
logging is off (``VLLM_CONFIGURE_LOGGING=0``: ``vllm`` has no handlers, records propagate to
whatever the application set up).
"""

from __future__ import annotations

import logging


class _VllmHandler(logging.Handler):
    """Forwards records to the handlers of the ``vllm`` logger."""

    def emit(self, record: logging.LogRecord) -> None:
        for h in logging.getLogger("vllm").handlers:
            if record.levelno >= h.level:
                h.handle(record)


def attach_to_vllm_logging() -> bool:
    """Route the ``kvbm`` logger's records through vLLM's handlers (idempotent).

    Returns True when kvbm now logs through vLLM, False when it was left alone (see the module
    docstring).
    """
    kv = logging.getLogger("kvbm")
    if any(isinstance(h, _VllmHandler) for h in kv.handlers):
        return True
    if kv.handlers:
        return False
    vl = logging.getLogger("vllm")
    if not vl.handlers:
        return False
    kv.addHandler(_VllmHandler())
    if kv.level == logging.NOTSET:
        kv.setLevel(vl.getEffectiveLevel())
    kv.propagate = False
    return True
