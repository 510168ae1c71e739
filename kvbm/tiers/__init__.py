"""Storage tiers implemented in Python on top of the native core: the disk tier's catalog and the
remote tiers (Redis, a ``kvbm serve`` store server; see :mod:`kvbm.tiers.remote` for their interface)."""

from kvbm.tiers.disk import DiskCatalog, DiskHandle, DiskTier
from kvbm.tiers.remote import RemoteTier, open_remote_tier

__all__ = ["DiskCatalog", "DiskHandle", "DiskTier", "RemoteTier", "open_remote_tier"]
