"""The package version, in one place: ``embedkit.__version__`` re-exports it, pyproject reads it
(``[tool.setuptools.dynamic]``), and library modules import it from here without the package
``__init__``."""

from __future__ import annotations

__version__ = "0.1.0"
