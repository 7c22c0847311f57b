"""``embedkit serve``: a web gallery and JSON API over a store, and static HTML reports.

``create_app(store)`` is the ASGI app (FastAPI); ``serve_store(store)`` runs it on uvicorn;
``reports`` writes self-contained HTML files. The server never changes a store's rows: it only
writes its own caches (thumbnails) beside them, and the search index the library maintains.
"""

from __future__ import annotations

from .app import create_app, serve_store

__all__ = ["create_app", "serve_store"]
