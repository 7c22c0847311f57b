"""``embedkit serve``'s page in a real headless Chromium (Playwright for Python, the OS's
``chromium``): gallery thumbnails, similar images, upload search, duplicate review and export,
the map, and no console errors. A missing browser FAILS these tests: install it with
``apt-get install -y chromium`` (or point EMBEDKIT_CHROMIUM at a Chromium binary)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY, make_photo

from embedkit import create_app
from embedkit.extraction.run import extract

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _chromium() -> str:
    given = os.environ.get("EMBEDKIT_CHROMIUM")
    found = given or next((p for n in CHROMIUM_NAMES if (p := shutil.which(n))), None)
    if not found:
        pytest.fail(
            "no Chromium for the browser tests: `apt-get install -y chromium`, or set "
            "EMBEDKIT_CHROMIUM to a Chromium binary (`playwright install` needs its CDN)"
        )
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """uvicorn in a thread on 127.0.0.1 and a free port."""

    def __init__(self, app: object) -> None:
        import uvicorn

        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    photos = root / "photos"
    for i in range(8):
        make_photo(photos / f"p{i}.jpg", i)
    shutil.copy(photos / "p0.jpg", photos / "p0_copy.jpg")
    shutil.copy(photos / "p3.jpg", photos / "p3_copy.jpg")
    extract([str(photos)], root / "s.store", model=TINY, random_init=True, workers=0)
    return root / "s.store"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, store: Path) -> Iterator[object]:  # type: ignore[no-untyped-def]
    with _Server(create_app(store)) as url:
        context = browser.new_context(accept_downloads=True)
        pg = context.new_page()
        errors: list[str] = []
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.errors = errors  # type: ignore[attr-defined]
        pg.base = url  # type: ignore[attr-defined]
        yield pg
        assert errors == [], f"console errors: {errors}"
        context.close()


def _wait_until(pg, expression: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``expression`` in the page until it is true. (Playwright's ``wait_for_function``
    evaluates its predicate with eval(), which the page's Content-Security-Policy forbids, as
    it should: the CSP stays on in these tests.)"""
    deadline = time.monotonic() + timeout
    while not pg.evaluate(f"() => Boolean({expression})"):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.1)


ALL_TILES_LOADED = (
    "document.querySelectorAll('#gallery-grid .tile img').length === 10"
    " && [...document.querySelectorAll('#gallery-grid .tile img')]"
    ".every(i => i.complete && i.naturalWidth > 0)"
)


def _loaded_thumbs(pg, selector: str) -> int:  # type: ignore[no-untyped-def]
    return int(
        pg.eval_on_selector_all(
            selector, "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length"
        )
    )


def test_gallery_loads_thumbnails_and_a_click_shows_similar_images(page) -> None:  # type: ignore[no-untyped-def]
    page.goto(page.base)
    _wait_until(page, ALL_TILES_LOADED)
    assert page.locator("#info").inner_text().startswith("10 images")
    page.locator("#gallery-grid .tile", has_text="p3.jpg").first.click()
    page.wait_for_selector("#similar-hits .card")
    assert page.locator("#similar-query h3").inner_text() == "Similar to p3.jpg"
    scores = page.locator("#similar-hits .score").all_inner_texts()
    assert len(scores) == 10 and scores[0].startswith("#1")
    names = page.locator("#similar-hits .card").all_inner_texts()
    assert any("p3.jpg" in n for n in names[:2]) and any("p3_copy.jpg" in n for n in names[:2])
    assert "1.0000" in scores[0]
    _wait_until(
        page,
        "[...document.querySelectorAll('#similar-hits img')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
    )


def test_upload_search_finds_the_photo(page, store: Path) -> None:  # type: ignore[no-untyped-def]
    page.goto(page.base)
    page.wait_for_selector("#gallery-grid .tile")
    photo = store.parent / "photos" / "p5.jpg"
    page.set_input_files("#upload", str(photo))
    page.wait_for_selector("#similar-hits .card")
    assert "uploaded p5.jpg" in page.locator("#similar-query h3").inner_text()
    first = page.locator("#similar-hits .card").first
    assert "p5.jpg" in first.inner_text()
    assert float(first.locator(".score").inner_text().split()[-1]) >= 0.999


def test_drag_and_drop_search(page, store: Path) -> None:  # type: ignore[no-untyped-def]
    page.goto(page.base)
    page.wait_for_selector("#gallery-grid .tile")
    data = list((store.parent / "photos" / "p6.jpg").read_bytes())
    page.evaluate(
        """bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], 'dropped.jpg', {type: 'image/jpeg'}));
            document.getElementById('drop').dispatchEvent(
                new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        data,
    )
    page.wait_for_selector("#similar-hits .card")
    assert "p6.jpg" in page.locator("#similar-hits .card").first.inner_text()


def test_duplicates_page_records_a_decision_and_exports_it(page, store: Path) -> None:  # type: ignore[no-untyped-def]
    page.goto(page.base + "#/duplicates")
    page.wait_for_selector("#dup-groups .group")
    # random-init vectors make near duplicates of anything; the byte-identical pairs stay
    page.fill("#dup-threshold", "0.999")
    page.click("#dup-load")
    page.wait_for_selector("#dup-summary:has-text('2 groups')")
    groups = page.locator("#dup-groups .group")
    assert groups.count() == 2
    assert _loaded_thumbs(page, "#dup-groups img") == 4
    first = groups.nth(0)
    assert "96×72" in first.inner_text() and "KB" in first.inner_text()
    # the suggested keeper is preselected; pick the other one
    suggested = first.locator(".card.keep").get_attribute("data-key")
    other = first.locator(".card.remove").get_attribute("data-key")
    first.locator(f"input[value='{other}']").check()
    assert first.locator(".card.keep").get_attribute("data-key") == other
    with page.expect_download() as dl:
        page.click("#dup-export-json")
    decisions = json.loads(Path(dl.value.path()).read_text())
    assert len(decisions) == 2
    assert str(decisions[0]["keep"]["id"]) == other  # exact int64, not rounded by JS
    assert [str(m["id"]) for m in decisions[0]["remove"]] == [suggested]
    assert decisions[0]["keep"]["path"].endswith(".jpg")
    with page.expect_download() as dl:
        page.click("#dup-export-csv")
    rows = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
    assert {(r["group"], r["action"], r["id"]) for r in rows if r["group"] == "1"} == {
        ("1", "keep", other),
        ("1", "remove", suggested),
    }
    # the decision survives a reload of the page
    page.reload()
    page.fill("#dup-threshold", "0.999")
    page.click("#dup-load")
    page.wait_for_selector("#dup-summary:has-text('2 groups')")
    kept = page.locator("#dup-groups .group").nth(0).locator(".card.keep")
    assert kept.get_attribute("data-key") == other


def test_map_shows_thumbnails_and_opens_similar_images(page) -> None:  # type: ignore[no-untyped-def]
    page.goto(page.base + "#/map")
    _wait_until(page, "/PCA|UMAP/.test(document.getElementById('map-hint').textContent)")
    box = page.locator("#map-canvas").bounding_box()
    data = page.evaluate("fetch('api/map').then(r => r.json())")
    # where the first point is drawn, in page pixels (the canvas may be scaled by CSS)
    x = box["x"] + (8 + data["x"][0] * (900 - 16)) * box["width"] / 900
    y = box["y"] + (8 + data["y"][0] * (640 - 16)) * box["height"] / 640
    page.mouse.move(x, y)
    page.wait_for_selector("#map-tip:not([hidden])")
    page.mouse.click(x, y)
    page.wait_for_selector("#similar-hits .card")
    assert page.url.split("#/similar/")[1] in data["keys"]


def test_the_page_passes_the_token_along(browser, store: Path) -> None:  # type: ignore[no-untyped-def]
    with _Server(create_app(store, token="tok3n")) as url:
        context = browser.new_context()
        pg = context.new_page()
        errors: list[str] = []
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.goto(url + "?token=tok3n")
        _wait_until(pg, ALL_TILES_LOADED)
        assert errors == []
        pg.goto(url)  # without it: the API refuses and the page says what to do
        pg.wait_for_selector("#error:not([hidden])")
        assert "token" in pg.locator("#error").inner_text()
        context.close()


def _watch(pg) -> list[str]:  # type: ignore[no-untyped-def]
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def test_gallery_of_100k_images_keeps_the_dom_small(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """100,000 rows written through the real writer (8-d vectors, ten real files cycled):
    only the visible tiles exist, and the last image is reachable by scrolling."""
    import numpy as np

    from embedkit.store.read import STATUS_OK
    from embedkit.store.writer import StoreWriter

    n, files = 100_000, 10
    for i in range(files):
        make_photo(tmp_path / "p" / f"{i}.jpg", i)
    meta = {"model": "synthetic", "weights_sha256": "0", "random_init": True}
    meta |= {"preprocess": {}, "dim": 8, "normalize": False}
    with StoreWriter(tmp_path / "big", meta) as w:
        w.add(
            ids=list(range(1, n + 1)),
            roots=[str(tmp_path / "p")] * n,
            paths=[f"{i % files}.jpg" for i in range(n)],
            status=[STATUS_OK] * n,
            width=[96] * n,
            height=[72] * n,
            embedding=np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32),
        )
        w.commit()
    with _Server(create_app(tmp_path / "big")) as url:
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        pg = context.new_page()
        errors = _watch(pg)
        pg.goto(url)
        pg.wait_for_selector("#gallery-grid .tile img")
        assert pg.locator("#info").inner_text().startswith("100000 images")
        tiles = pg.locator("#gallery-grid .tile").count()
        assert 0 < tiles < 200, tiles
        t0 = time.monotonic()
        pg.evaluate(
            "() => { const s = document.getElementById('gallery-scroll');"
            " s.scrollTop = s.scrollHeight; }"
        )
        # the last page is fetched and drawn: image 100000 (id 100000, the 9th file)
        pg.wait_for_selector("#gallery-grid .tile[data-index='99999']", timeout=20_000)
        assert time.monotonic() - t0 < 10
        assert pg.locator("#gallery-grid .tile").count() < 200
        assert pg.locator(".tile[data-index='99999']").get_attribute("data-key") == "100000"
        _wait_until(
            pg,
            "[...document.querySelectorAll('#gallery-grid .tile img')]"
            ".every(i => i.complete && i.naturalWidth > 0)",
        )
        assert errors == []
        context.close()


def test_probe_page_shows_mistakes_first_and_cells_open_their_images(
    browser,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    from embedkit.classification.train import train_store_probe

    for cls, offset in (("cat", 0), ("dog", 100)):
        for i in range(6):
            make_photo(tmp_path / "p" / cls / f"{i}.png", offset + i)
    extract([str(tmp_path / "p")], tmp_path / "s", model=TINY, random_init=True, workers=0)
    probe = train_store_probe(
        tmp_path / "s", missing="drop", group_threshold=1.0, max_epochs=3, device="cpu"
    )
    probe.save(tmp_path / "probe")
    app = create_app(tmp_path / "s", probe=tmp_path / "probe")
    with _Server(app) as url:
        context = browser.new_context()
        pg = context.new_page()
        errors = _watch(pg)
        pg.goto(url + "#/probe")
        pg.wait_for_selector("#probe-confusion td button")
        assert pg.locator("#nav-probe").is_visible()
        assert "12 images" in pg.locator("#probe-summary").inner_text()
        counts = [int(t) for t in pg.locator("#probe-confusion td button").all_inner_texts()]
        assert len(counts) == 4 and sum(counts) == 12
        pg.wait_for_selector("#probe-list .card")
        wrong = pg.locator("#probe-list .card.wrong").count()
        assert wrong == counts[1] + counts[2]
        if wrong:  # misclassified first
            assert "wrong" in (pg.locator("#probe-list .card").first.get_attribute("class") or "")
        pg.locator("#probe-confusion td button").nth(0).click()  # true cat, predicted cat
        pg.wait_for_selector("#probe-list-title:has-text('True cat, predicted cat')")
        assert pg.locator("#probe-list .card").count() == counts[0]
        # the similar view of an image says what the probe predicts for it
        pg.locator("#probe-confusion td button").nth(3).click()  # true dog, predicted dog
        pg.wait_for_selector("#probe-list-title:has-text('True dog, predicted dog')")
        pg.locator("#probe-confusion td button").nth(1).click()  # true cat, predicted dog
        pg.wait_for_selector("#probe-list-title:has-text('True cat, predicted dog')")
        card = pg.locator("#probe-list .card").first
        shown = card.locator(".score").inner_text() if counts[1] else ""
        pg.goto(url + "#/probe")
        pg.wait_for_selector("#probe-list .card")
        first = pg.locator("#probe-list .card").first
        predicted = first.locator(".score").inner_text().split()[0]
        first.click()
        pg.wait_for_selector("#similar-classes .probe-line")
        assert f"Probe: {predicted} " in pg.locator("#similar-classes").inner_text()
        assert counts[1] == 0 or "(true cat)" in shown
        assert errors == []
        context.close()
