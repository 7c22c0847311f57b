"""The public API: every name in ``embedkit.__all__`` is what it says, whatever was imported
first (a submodule named like a public function used to replace it: ``embedkit.classify``
became a module once any probe API had been touched)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHECK = r"""
import importlib, pkgutil, sys, types
import embedkit

order = sys.argv[1]
names = list(embedkit.__all__)
if order == "reversed":
    names.reverse()

def touch_names():
    for n in names:
        getattr(embedkit, n)

def import_all_modules():
    for m in pkgutil.walk_packages(embedkit.__path__, "embedkit."):
        if m.name.endswith("__main__"):
            continue
        importlib.import_module(m.name)

if order == "modules-first":
    import_all_modules()
    touch_names()
else:
    touch_names()
    import_all_modules()
bad = []
for n in embedkit.__all__:
    v = getattr(embedkit, n)
    if isinstance(v, types.ModuleType):
        bad.append(f"{n} is a module")
    elif n != "__version__":
        src = importlib.import_module(f"embedkit.{embedkit._EXPORTS[n]}")
        if getattr(src, n) is not v:
            bad.append(f"{n} is not {src.__name__}.{n}")
print("\n".join(bad) or "ok")
"""


@pytest.mark.parametrize("order", ["names-first", "reversed", "modules-first"])
def test_public_names_are_never_shadowed_by_submodules(order: str) -> None:
    r = subprocess.run(
        [sys.executable, "-c", _CHECK, order], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok", r.stdout


def test_every_public_name_is_exported_and_listed() -> None:
    import embedkit

    assert set(embedkit._EXPORTS) | {"__version__"} == set(embedkit.__all__)
    assert len(embedkit.__all__) == len(set(embedkit.__all__))
