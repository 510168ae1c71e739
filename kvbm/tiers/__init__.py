"""Python-side tiers of kvbm: the remote tiers (Redis, a ``kvbm serve`` store server).

See :mod:`kvbm.tiers.remote` for the interface every remote tier implements.
"""

from __future__ import annotations

from kvbm.tiers.remote import RemoteTier, open_remote_tier

__all__ = ["RemoteTier", "open_remote_tier"]
