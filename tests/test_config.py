"""KvbmConfig from Python, YAML and the environment."""

from __future__ import annotations

import pytest

from kvbm import KvbmConfig
from kvbm.config import parse_size
from kvbm.errors import ConfigError


def test_sizes() -> None:
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("512 MB") == 512_000_000
    assert parse_size(123) == 123
    with pytest.raises(ConfigError, match="host_capacity_bytes"):
        parse_size("lots", "host_capacity_bytes")


def test_from_env_and_yaml(tmp_path) -> None:
    cfg = KvbmConfig.from_env(
        {"KVBM_HOST_CAPACITY_BYTES": "2GiB", "KVBM_HOST_PINNED": "false", "KVBM_CUDA": "ON", "KVBM_BLOCK_SIZE": "32"}
    )
    assert cfg.host_capacity_bytes == 2 << 30 and cfg.host_pinned is False and cfg.block_size == 32
    p = tmp_path / "kvbm.yaml"
    p.write_text("block_size: 64\nhost_capacity_bytes: 1GiB\neviction_policy: lru\n")
    cfg = KvbmConfig.from_yaml(p)
    assert cfg.block_size == 64 and cfg.host_capacity_bytes == 1 << 30
    cfg = KvbmConfig.from_env({"KVBM_CONFIG": str(p), "KVBM_BLOCK_SIZE": "8"})
    assert cfg.block_size == 8 and cfg.host_capacity_bytes == 1 << 30


def test_errors_name_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'host_capcity_bytes'"):
        KvbmConfig.from_dict({"host_capcity_bytes": 1})
    with pytest.raises(ConfigError, match="block_size: expected an integer"):
        KvbmConfig.from_env({"KVBM_BLOCK_SIZE": "sixteen"})
    with pytest.raises(ConfigError, match="disk_write_policy"):
        KvbmConfig(disk_write_policy="sometimes")
    with pytest.raises(ConfigError, match="cannot read config file"):
        KvbmConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("block_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        KvbmConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="expected true/false"):
        KvbmConfig(checksums="maybe")  # type: ignore[arg-type]


def test_to_dict_round_trip() -> None:
    cfg = KvbmConfig(block_bytes=4096)
    assert KvbmConfig.from_dict(cfg.to_dict()) == cfg
