"""``kvbm router``: a KV-aware, cost-model router in front of several vLLM instances.

Parts: :mod:`~kvbm.router.index` (block key -> instances and tiers, fed by KV events),
:mod:`~kvbm.router.cost` (expected TTFT per instance), :mod:`~kvbm.router.events` (the ZeroMQ
subscriber with replay), :mod:`~kvbm.router.server` and :mod:`~kvbm.router.app` (the HTTP proxy),
:mod:`~kvbm.router.relay` (upstream calls, the plain placement loop), :mod:`~kvbm.router.pd`
(prefill/decode disaggregation), :mod:`~kvbm.router.config` (instances from the command line or
YAML). Needs the ``router`` extra (``pip install 'kvblockmgr[router]'``: aiohttp, pyzmq, msgspec);
vLLM is not needed.
"""
