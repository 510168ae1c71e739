"""Remote tiers by URL scheme: which class opens ``redis://``, ``kvbm://``, ... URLs.

Design note — a registry of names, not of imports.
    The registry maps a URL scheme to ``"module:Class"`` and imports the module only when a URL of
    that scheme is opened (as vLLM's ``kv_offload`` factory does), so this module sits in the
    lowest layer with :mod:`kvbm.errors` and :mod:`kvbm.config`: the configuration validates a
    scheme here without importing any tier, and :mod:`kvbm.tiers.remote` opens one without
    importing its own subclasses (see the import-linter contract in ``pyproject.toml``). Adding
    a remote tier is one module implementing :class:`kvbm.tiers.remote.RemoteTier` and one line:
    an entry below, or ``register_remote_tier("myscheme", "mypkg.mytier:MyTier")`` from a plugin.
"""

from __future__ import annotations

import importlib
import threading

from kvbm.errors import ConfigError

_lock = threading.Lock()
_REMOTE: dict[str, str] = {}


def register_remote_tier(scheme: str, target: str, *, replace: bool = False) -> None:
    """Make URLs ``scheme://...`` open ``target`` (``"package.module:ClassName"``).

    The class is imported on first use and called as
    ``Class(url, block_bytes=..., namespace=..., timeout_s=..., **kwargs)`` (plus ``token=`` when
    its ``accepts_token`` attribute is true). Raises ConfigError for a malformed scheme or target,
    or a scheme registered already (unless ``replace``).
    """
    s = scheme.lower() if isinstance(scheme, str) else scheme
    if not isinstance(s, str) or not s or not all(c.isalnum() or c in "+-." for c in s) or not s[0].isalpha():
        raise ConfigError(f"remote tier scheme: expected a URL scheme such as 'redis', got {scheme!r}")
    mod, _, attr = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not mod or not attr:
        raise ConfigError(f"remote tier {scheme!r}: target must be 'package.module:ClassName', got {target!r}")
    with _lock:
        if s in _REMOTE and not replace and _REMOTE[s] != target:
            raise ConfigError(f"remote tier scheme {s!r} is registered already ({_REMOTE[s]})")
        _REMOTE[s] = target


def remote_schemes() -> tuple[str, ...]:
    """The registered URL schemes, in registration order."""
    with _lock:
        return tuple(_REMOTE)


def url_scheme(url: object) -> str:
    """The lower-case scheme of ``url``; ConfigError naming ``remote_url`` when it has none or
    an unregistered one (nothing is imported)."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"remote_url: expected a URL such as redis://127.0.0.1:6379/0, got {url!r}")
    scheme = url.split("://", 1)[0].lower()
    known = remote_schemes()
    if scheme not in known:
        raise ConfigError(
            f"remote_url: unknown scheme {scheme!r} in {url!r}; expected one of {', '.join(s + '://' for s in known)}"
        )
    return scheme


def remote_tier_class(url: str) -> type:
    """The class registered for ``url``'s scheme (imported now). ConfigError when unknown."""
    scheme = url_scheme(url)
    with _lock:
        target = _REMOTE[scheme]
    mod, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"remote_url: the tier for {scheme}:// ({target}) cannot be loaded: {e}") from None


for _s in ("redis", "rediss", "unix", "valkey", "valkeys", "redis+cluster", "rediss+cluster"):
    register_remote_tier(_s, "kvbm.tiers.redis_tier:RedisTier")
register_remote_tier("kvbm", "kvbm.tiers.serve_client:ServeClientTier")
