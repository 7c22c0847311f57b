"""The package's layering, checked on the source: the library never imports the CLI or rich,
nor the package ``__init__`` (which would import everything lazily re-exported), and decoding
does not reach into the store writer."""

from __future__ import annotations

import ast
from pathlib import Path

import embedkit

PKG = Path(embedkit.__file__).parent


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by ``path`` (relative imports resolved)."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    package = parts if path.name == "__init__.py" else parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            if node.module is None:  # from .. import name: maybe a submodule
                out += [f"{mod}.{a.name}" for a in node.names]
    return out


def _library_modules() -> list[Path]:
    # __main__.py is ``python -m embedkit``: the CLI's entry point, not library code.
    return [
        p
        for p in PKG.rglob("*.py")
        if "cli" not in p.relative_to(PKG).parts and p.name != "__main__.py"
    ]


def test_library_never_imports_cli_or_rich() -> None:
    bad = {
        str(p.relative_to(PKG)): m
        for p in _library_modules()
        for m in _imports(p)
        if m.startswith(("embedkit.cli", "rich")) or m in ("rich", "typer")
    }
    assert bad == {}


def test_library_modules_do_not_import_the_package_init() -> None:
    bad = {
        str(p.relative_to(PKG)): m
        for p in _library_modules()
        if p.name != "__init__.py"
        for m in _imports(p)
        if m == "embedkit"
    }
    assert bad == {}


def test_decoding_does_not_reach_into_the_store() -> None:
    for name in ("pool.py", "local.py", "cores.py"):
        mods = _imports(PKG / "extraction" / name)
        assert not [m for m in mods if m.startswith("embedkit.store")], name


def test_the_version_has_one_source() -> None:
    from embedkit import _version

    assert embedkit.__version__ == _version.__version__
    pyproject = (PKG.parent / "pyproject.toml").read_text()
    assert (
        'dynamic = ["version"]' in pyproject
        and "\nversion =" not in pyproject.split("[project]")[1].split("\n[")[0]
    )
