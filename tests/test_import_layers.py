"""The import layers of kvbm (``[tool.importlinter]`` in pyproject.toml), checked by import-linter."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Below the top two layers of the contract, modules take at most the compiled extension, the
# version and submodules from the root package: grimp cannot tell ``from kvbm import _native`` from
# a facade import such as ``from kvbm import BlockManager`` (so the contract ignores ``-> kvbm``).
ROOT_NAMES_BELOW_TOP = {"_native", "_version"}


def _lower_layer_modules() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import pytest

        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11) or tomli")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    layers = next(c for c in cfg["tool"]["importlinter"]["contracts"] if c["type"] == "layers")["layers"]
    mods = []
    for layer in layers[2:]:
        for m in layer.replace("|", ":").split(":"):
            mods.append(m.strip().strip("()"))
    return mods


def test_lint_imports_keeps_every_contract():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    assert os.path.exists(exe), "import-linter is not installed (it is in the 'test' extra: pip install -e .[test])"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "broken" in r.stdout and " 0 broken" in r.stdout, r.stdout[-3000:]


def test_modules_below_the_top_layers_take_only_the_extension_from_the_root_package():
    bad = []
    for mod in _lower_layer_modules():
        base = ROOT / Path(*mod.split("."))
        paths = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
        for path in paths:
            if not path.exists():
                continue
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
                if isinstance(node, ast.ImportFrom) and node.module == "kvbm" and node.level == 0:
                    names = {a.name for a in node.names if not (ROOT / "kvbm" / a.name).is_dir()
                             and not (ROOT / "kvbm" / f"{a.name}.py").exists()} - ROOT_NAMES_BELOW_TOP
                    if names:
                        bad.append(f"{rel}:{node.lineno} from kvbm import {', '.join(sorted(names))}")
                elif isinstance(node, ast.Import) and any(a.name == "kvbm" for a in node.names):
                    bad.append(f"{rel}:{node.lineno} import kvbm")
    assert not bad, "lower-layer modules import the kvbm facade (a cycle through kvbm/__init__):\n" + "\n".join(bad)


def test_the_contract_catches_an_import_against_the_layers(tmp_path):
    """Not vacuous: config importing a tier (the old cycle's first edge) breaks the contract."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    shutil.copytree(ROOT / "kvbm", tmp_path / "kvbm", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    cfg = tmp_path / "kvbm" / "config.py"
    cfg.write_text(cfg.read_text(encoding="utf-8") + "\nfrom kvbm.tiers.remote import RemoteTier  # noqa\n",
                   encoding="utf-8")
    # the copy first; import-linter itself may live on the caller's path (the GPU machine's /tmp/site)
    path = [str(tmp_path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                              if p and Path(p).resolve() != ROOT]
    r = subprocess.run([exe, "--no-cache"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "kvbm.config is not allowed to import kvbm.tiers" in r.stdout, r.stdout[-3000:]
