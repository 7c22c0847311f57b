"""embedkit: turn image collections into searchable, classifiable vectors.

The public API is what this module re-exports; everything else is internal.
"""

from __future__ import annotations

__version__ = "0.1.0"
