"""Storage tiers implemented in Python on top of the native core (the disk tier's catalog)."""

from kvbm.tiers.disk import DiskCatalog, DiskHandle, DiskTier

__all__ = ["DiskCatalog", "DiskHandle", "DiskTier"]
