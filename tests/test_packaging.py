"""The package installs on its own: every third-party import is a declared dependency, and a built wheel runs
without the source tree."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = project["dependencies"]
    return {re.split(r"[<>=!~\[ ;]", n, maxsplit=1)[0].lower().replace("_", "-") for n in names}


def _imports() -> set[str]:
    mods = set()
    for f in (REPO / "dcmfg").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "dcmfg"}


def test_every_third_party_import_is_a_declared_dependency():
    dists = packages_distributions()
    declared = _declared()
    missing = {}
    for module in sorted(_imports()):
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert owners, f"dcmfg imports {module!r}, which no installed distribution provides"
        if not owners & declared:
            missing[module] = sorted(owners)
    assert not missing, f"imported but not declared in pyproject.toml dependencies: {missing}"


def test_requirements_pin_every_declared_dependency():
    pins = {line.split("==")[0].strip().lower() for line in (REPO / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.lstrip().startswith("#")}
    assert _declared() <= pins, f"declared but not pinned in requirements.txt: {sorted(_declared() - pins)}"


@pytest.mark.slow
def test_a_built_wheel_runs_without_the_source_tree(tmp_path, mirflickr_root):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip"]
    done = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(wheels.glob("dcmfg-*.whl"))
    done = subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # the wheel's copy comes first on the path; run from a folder that holds no source tree
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import dcmfg; print(dcmfg.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    script = target / "bin" / "dcmfg"
    run = [sys.executable, str(script)]
    done = subprocess.run(run + ["--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "usage: dcmfg" in done.stdout, done.stderr[-2000:]
    done = subprocess.run(run + ["data", "info", str(mirflickr_root)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mirflickr25k" in done.stdout and "items        730" in done.stdout
