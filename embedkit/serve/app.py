"""The HTTP API and page of ``embedkit serve`` (FastAPI; ``create_app``) and running it
(``serve_store``, on uvicorn); the token, Host check and error shape are ``guard.py``'s.

Every file the server sends is a live row of the store, addressed by its numeric id: no part of
a request is ever joined to a file-system path. Library errors become JSON ``{"error": ...}``
with a 4xx status (``errors.py``); the store is never written (thumbnails and the index that
search maintains aside).
"""

from __future__ import annotations

import logging
import mimetypes
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from .._version import __version__
from ..classification.head import classify
from ..classification.probe import Probe, load_probe
from ..errors import InvalidArgumentError
from ..images.decode import ImageDecodeError, open_rgb
from ..index.duplicates import DEFAULT_THRESHOLD, find_duplicates
from ..index.search import Hit, search
from ..store.info import store_info
from .guard import ApiError, install_guards, is_loopback
from .probe_view import ProbeView, probe_view
from .projection import MAP_METHODS, MapMethod
from .state import LiveStore, Snapshot
from .thumbs import THUMB_SIZE, MissingFileError, thumbnail

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD_BYTES = 50 * 2**20  # a 50 MiB photo is already a 100+ MP camera RAW-sized JPEG
MAX_PAGE = 1000  # images per /api/images page
MAX_K = 1000  # results per search
_MAX_ID = 2**63 - 1

_logger = logging.getLogger("embedkit.serve")


def _parse_id(raw: str) -> int:
    # ids are decimal int64s; anything else (paths, '..', encoded slashes) is refused here,
    # before it could mean anything
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > _MAX_ID:
        raise ApiError(
            400, f"{raw[:40]!r} is not an image id; ids are the numbers /api/images lists"
        )
    return int(raw)


def _hit(h: Hit) -> dict[str, Any]:
    return {"rank": h.rank, "id": h.id, "key": str(h.id), "path": h.path, "score": h.score}


def create_app(
    store: str | os.PathLike[str],
    *,
    token: str | None = None,
    probe: str | os.PathLike[str] | Probe | None = None,
    labels: str | os.PathLike[str] | None = None,
    map_method: MapMethod = "auto",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    device: str = "auto",
) -> FastAPI:
    """The ASGI app serving a store: JSON API under ``/api``, the page at ``/``.

    Args:
        store: the store directory (opened now; reopened when its manifest version changes).
        token: when set, every ``/api`` request must carry it (``X-Embedkit-Token`` header,
            ``Authorization: Bearer``, or ``?token=``).
        probe: a probe directory (``embedkit probe train --out``) or ``Probe`` whose
            predictions the page shows; ``labels`` a ``path,label`` CSV (default: folders).
        map_method: ``auto`` (UMAP when umap-learn is installed), ``umap`` or ``pca``.
        max_upload_bytes: the largest image accepted by ``POST /api/search``.
        device: where uploaded images are embedded (``auto``, ``cpu``, ``cuda``).

    Raises:
        StoreError: the store does not exist or is damaged.
        ProbeError: the probe cannot be loaded.
    """
    if map_method not in MAP_METHODS:
        raise InvalidArgumentError(f"map method must be one of {', '.join(MAP_METHODS)}")
    live = LiveStore(store)
    loaded_probe = load_probe(Path(probe)) if isinstance(probe, (str, os.PathLike)) else probe
    labels_file = Path(labels) if labels is not None else None
    if loaded_probe is not None:  # another model's probe: refuse at start, not per request
        import numpy as np

        loaded_probe.check_features(
            np.zeros((0, loaded_probe.weight.shape[1]), np.float32),
            dict(live.current().store.fingerprint),
        )
    app = FastAPI(
        title="embedkit",
        version=__version__,
        description=f"Browse, search and review the embedkit store {live.path}.",
        # FastAPI's own /docs loads Swagger UI from a CDN: blank on an offline machine. The
        # same assets ship in the swagger-ui-bundle package; /docs serves them from here.
        docs_url=None,
        redoc_url=None,
    )
    install_guards(app, token, max_upload_bytes)
    _offline_docs(app)

    def snap() -> Snapshot:
        return live.current()

    def row_of(s: Snapshot, raw: str) -> int:
        row = s.row(_parse_id(raw))
        if row is None:
            raise ApiError(404, f"no image {raw} in this store (it may have been pruned)")
        return row

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info", summary="The store summary (as `embedkit info --json`)")
    def info() -> dict[str, Any]:
        return snap().cached("info", lambda: store_info(live.path))

    @app.get("/api/config", summary="What this server can show")
    def config() -> dict[str, Any]:
        s = snap()
        return {
            "store": str(live.path),
            "rows": len(s.store),
            "model": s.store.metadata.get("model"),
            "head": (live.path / "head.safetensors").exists()
            and not s.store.metadata.get("random_init"),
            "probe": loaded_probe is not None,
            "version": s.version,
            "max_upload_bytes": max_upload_bytes,
        }

    @app.get("/api/images", summary="Stored images in store order, a page at a time")
    def images(
        response: Response,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> list[dict[str, Any]]:
        s = snap()
        response.headers["X-Total-Count"] = str(len(s.store))
        return [s.image(r) for r in range(offset, min(offset + limit, len(s.store)))]

    @app.get("/api/images/{image_id}", summary="One image: id, path, size and file facts")
    def image(image_id: str) -> dict[str, Any]:
        s = snap()
        row = row_of(s, image_id)
        return {**s.image(row), "size": s.sizes[row], "mtime_ns": s.mtimes[row]}

    @app.get("/api/images/{image_id}/thumb", summary="JPEG thumbnail, EXIF-oriented, cached")
    def thumb(image_id: str) -> Response:
        s = snap()
        row = row_of(s, image_id)
        st = s.store
        data = thumbnail(st.path, int(st.ids[row]), st.hashes[row], st.abspath(row), THUMB_SIZE)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    @app.get("/api/images/{image_id}/file", summary="The original file's bytes")
    def original(image_id: str) -> FileResponse:
        s = snap()
        row = row_of(s, image_id)
        path = s.store.abspath(row)
        try:
            size = os.stat(path).st_size
        except OSError:
            raise MissingFileError(
                f"{path} is gone from disk; `embedkit prune {live.path}` forgets missing files"
            ) from None
        if s.sizes[row] is not None and size != s.sizes[row]:
            # serve only what was extracted: a file replaced since (even by a link to
            # something else) is refused until it is extracted again
            raise ApiError(
                409,
                f"{path} changed since extraction; run `embedkit extract` on its folder again",
            )
        if not os.access(path, os.R_OK):
            raise ApiError(403, f"{path} is not readable by the server (file permissions)")
        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(
            path,
            media_type=media,
            filename=os.path.basename(path),
            content_disposition_type="inline",
        )

    @app.get("/api/search", summary="Images most similar to a stored image")
    def search_by_id(
        id: Annotated[str, Query(description="a stored image id")],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    ) -> list[dict[str, Any]]:
        s = snap()
        return [_hit(h) for h in s.similar(row_of(s, id), k)]

    @app.post("/api/search", summary="Images most similar to an uploaded photo")
    def search_by_upload(
        file: Annotated[UploadFile, File(description="the photo")],
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
    ) -> list[dict[str, Any]]:
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ApiError(
                413, f"the upload is over {max_upload_bytes // 2**20} MiB; send a smaller copy"
            )
        try:
            open_rgb(data)  # extraction's decoder and pixel cap, before any model runs
        except ImageDecodeError as exc:
            raise ApiError(
                400, f"cannot read the uploaded image ({exc}); send a JPEG or PNG"
            ) from None
        s = snap()
        # a private directory (mode 0700), removed afterwards; never inside the store
        with tempfile.TemporaryDirectory(prefix="embedkit-upload-") as tmp:
            query = Path(tmp) / "upload"
            query.write_bytes(data)
            (result,) = search(s.store, [str(query)], k=k, device=device)
        return [_hit(h) for h in result.hits]

    @app.get("/api/duplicates", summary="Duplicate groups (as `embedkit duplicates --json`)")
    def duplicates(
        threshold: Annotated[float, Query(gt=0.0, le=1.0)] = DEFAULT_THRESHOLD,
    ) -> list[list[dict[str, Any]]]:
        s = snap()

        def compute() -> list[list[dict[str, Any]]]:
            groups = find_duplicates(s.store, threshold, log=_logger.info)
            return [[{**m.to_dict(), "key": str(m.id)} for m in g.members] for g in groups]

        return s.cached(("duplicates", threshold), compute)

    @app.get("/api/classify", summary="Top ImageNet classes of a stored image")
    def classify_one(
        id: Annotated[str, Query(description="a stored image id")],
        k: Annotated[int, Query(ge=1, le=20)] = 5,
    ) -> dict[str, Any]:
        s = snap()
        row = row_of(s, id)
        predictions = s.cached(("classify", k), lambda: classify(store=s.store, top_k=k))
        return predictions[row].to_dict()  # in store order, one per ok row

    @app.get("/api/map", summary="2-D map of the collection (UMAP or PCA)")
    def map_() -> dict[str, Any]:
        return snap().map_points(map_method)

    def view(s: Snapshot) -> ProbeView:
        if loaded_probe is None:
            raise ApiError(404, "no probe loaded; start with `embedkit serve STORE --probe DIR`")
        return s.cached("probe", lambda: probe_view(loaded_probe, s.store, labels_file))

    @app.get("/api/probe", summary="The probe's classes and confusion matrix on this store")
    def probe_summary() -> dict[str, Any]:
        return view(snap()).summary()

    @app.get("/api/probe/predictions", summary="Probe predictions, misclassified first")
    def probe_predictions(
        true: Annotated[str | None, Query(description="only images labelled so")] = None,
        predicted: Annotated[str | None, Query(description="only images predicted so")] = None,
        id: Annotated[str | None, Query(description="only this stored image")] = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 200,
    ) -> list[dict[str, Any]]:
        s = snap()
        rows = view(s).predictions(true, predicted)
        if id is not None:
            wanted = int(s.store.ids[row_of(s, id)])
            rows = [r for r in rows if r["id"] == wanted]
        return rows[offset : offset + limit]

    return app


def serve_store(
    store: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    probe: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    map_method: MapMethod = "auto",
    log_level: str = "info",
) -> None:
    """Serve a store on ``host:port`` until interrupted (uvicorn).

    A host other than loopback needs a token; pass one or get a fresh one from
    ``resolve_token`` (the CLI prints the URL with it).

    Raises:
        InvalidArgumentError: a non-loopback host without a token.
    """
    import uvicorn

    if token is None and not is_loopback(host):
        raise InvalidArgumentError(
            f"serving on {host} exposes the collection to the network; pass a token"
        )
    app = create_app(store, token=token, probe=probe, labels=labels, map_method=map_method)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the installed swagger-ui-bundle assets (no CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs-openapi.json", include_in_schema=False)
    def docs_spec() -> JSONResponse:
        # The bundled Swagger UI (4.x) renders OpenAPI 3.0 documents only; FastAPI writes 3.1.
        # The schema we emit uses nothing 3.0 cannot show, so the page gets a copy labelled
        # 3.0.3; /openapi.json stays the real 3.1 document for tools.
        return JSONResponse({**app.openapi(), "openapi": "3.0.3"})

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/docs-openapi.json",
            title="embedkit API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )
