"""Static reports: one self-contained HTML file each (thumbnails as data URIs, no scripts or
styles from elsewhere), to archive or mail around. Thumbnails are cached in ``STORE/thumbs``."""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from ..index.duplicates import DEFAULT_THRESHOLD, DuplicateGroup, find_duplicates
from ..store.read import Store, open_store
from .projection import MAP_METHODS, MapMethod, project_2d
from .thumbs import data_uri

MAP_THUMBS = 1500  # thumbnails embedded in a map report (~6 KB each): a 10 MB file at most
_PLACEHOLDER = "data:image/gif;base64,R0lGODlhAQABAAAAACw="  # 1x1 blank, for gone files

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#f6f6f6}
.group{display:flex;gap:12px;padding:10px;margin:10px 0;background:#fff;border:1px solid #ddd;
border-radius:6px;overflow-x:auto}.card{width:170px;font-size:11px;word-break:break-all;
padding:4px;border:2px solid transparent;border-radius:4px}.card.keep{border-color:#2a2}
.card img{width:160px;height:160px;object-fit:contain;background:#e8e8e8;display:block}
.muted{color:#666}#tip{position:fixed;width:160px;height:160px;object-fit:contain;
background:#fff;border:1px solid #999;pointer-events:none;display:none}
canvas{background:#fff;border:1px solid #ddd;max-width:100%}
"""


def _page(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>'
        f"{html.escape(title)}</title><style>{_STYLE}</style></head><body>{body}{tail}"
        "</body></html>\n"
    )


def _write(out: str | os.PathLike[str], text: str) -> Path:
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # never half a report under the final name
    return path


def _thumb(st: Store, row: int) -> str:
    uri = data_uri(st.path, int(st.ids[row]), st.hashes[row], st.abspath(row))
    return uri or _PLACEHOLDER


def _date(mtime_ns: int | None) -> str:
    if mtime_ns is None:
        return "?"
    return dt.datetime.fromtimestamp(mtime_ns / 1e9, dt.timezone.utc).strftime("%Y-%m-%d")


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def duplicates_report(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    keep: str = "best",
) -> Path:
    """Write the duplicate groups of a store as one HTML file: each group side by side with
    resolution, file size, date and the suggested keeper. Nothing is deleted or moved.

    Returns:
        The path written.
    """
    st = open_store(store, vectors=False)
    groups: list[DuplicateGroup] = find_duplicates(st, threshold, keep=keep)
    rows = st.rows_of_ids([m.id for g in groups for m in g.members]).tolist()
    row_iter = iter(rows)
    blocks = []
    for n, g in enumerate(groups, 1):
        cards = []
        for m in g.members:
            row = next(row_iter)
            uri = _thumb(st, row) if row >= 0 else _PLACEHOLDER
            what = "identical file" if m.exact else f"similarity {m.score:.3f}"
            cards.append(
                f'<div class="card{" keep" if m.keep else ""}"><img src="{uri}" alt="">'
                f"<b>{'keep' if m.keep else 'remove?'}</b> {m.width}&times;{m.height} &middot; "
                f"{_size(m.size)} &middot; {_date(m.mtime_ns)}<br>{what}<br>"
                f'<span class="muted">{html.escape(m.path or "")}</span></div>'
            )
        blocks.append(f'<h3>Group {n}</h3><div class="group">{"".join(cards)}</div>')
    images = sum(len(g.members) for g in groups)
    title = f"Duplicates in {st.path}"
    body = (
        f"<h1>{html.escape(title)}</h1><p class='muted'>{len(groups)} groups, {images} images, "
        f"{images - len(groups)} redundant copies at cosine similarity &ge; {threshold}; "
        f"suggested keepers are framed (rule: {html.escape(keep)}). Nothing was deleted.</p>"
        + "".join(blocks)
    )
    return _write(out, _page(title, body))


_MAP_SCRIPT = """
const D=JSON.parse(document.getElementById('data').textContent);
const c=document.getElementById('map'),x=c.getContext('2d'),tip=document.getElementById('tip');
const X=i=>8+D.x[i]*(c.width-16),Y=i=>8+D.y[i]*(c.height-16);
x.fillStyle='rgba(30,90,170,.55)';for(let i=0;i<D.x.length;i++)x.fillRect(X(i)-1.5,Y(i)-1.5,3,3);
x.fillStyle='rgba(200,60,30,.9)';for(const i in D.thumbs)x.fillRect(X(i)-2,Y(i)-2,4,4);
c.addEventListener('mousemove',e=>{const r=c.getBoundingClientRect();
const px=(e.clientX-r.left)*c.width/r.width,py=(e.clientY-r.top)*c.height/r.height;
let b=null,bd=144;for(const i in D.thumbs){const d=(X(i)-px)**2+(Y(i)-py)**2;if(d<bd){bd=d;b=i}}
if(b===null){tip.style.display='none';c.title='';return}
tip.src=D.thumbs[b];tip.style.left=(e.clientX+14)+'px';tip.style.top=(e.clientY+14)+'px';
tip.style.display='block';c.title=D.paths[b]});
c.addEventListener('mouseleave',()=>{tip.style.display='none'});
"""


def map_report(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    method: MapMethod = "auto",
    thumbs: int = MAP_THUMBS,
) -> Path:
    """Write a 2-D map of the collection (UMAP when installed, else PCA) as one HTML file;
    hovering a red point shows its embedded thumbnail (at most ``thumbs`` of them, spread
    evenly over the store).

    Returns:
        The path written.
    """
    if method not in MAP_METHODS:
        raise InvalidArgumentError(f"method must be one of {', '.join(MAP_METHODS)}")
    if thumbs < 0:
        raise InvalidArgumentError(f"thumbs must be >= 0, got {thumbs}")
    st = open_store(store)
    xy, used = project_2d(st.vectors, method)
    n = len(st)
    pick: list[int] = (
        np.unique(np.linspace(0, n - 1, min(thumbs, n)).round().astype(int)).tolist() if n else []
    )
    data: dict[str, Any] = {
        "x": np.round(xy[:, 0], 4).tolist(),
        "y": np.round(xy[:, 1], 4).tolist(),
        "thumbs": {i: _thumb(st, i) for i in pick},
        "paths": {i: st.abspath(i) for i in pick},
    }
    payload = json.dumps(data).replace("<", "\\u003c")  # cannot close the script element
    title = f"Map of {st.path}"
    body = (
        f"<h1>{html.escape(title)}</h1><p class='muted'>{n} images, {used.upper()} of "
        f"{st.metadata.get('model')} vectors; similar images lie close together. Hover a red "
        f"point ({len(pick)} with thumbnails) to see it.</p>"
        '<canvas id="map" width="1000" height="700"></canvas><img id="tip" alt="">'
        f'<script type="application/json" id="data">{payload}</script>'
    )
    return _write(out, _page(title, body, _MAP_SCRIPT))
