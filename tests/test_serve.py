"""``embedkit serve``'s JSON API against the real app (Starlette's TestClient over httpx), and
``embedkit report``: stores made with the tiny random-init model."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY, make_photo
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from embedkit import create_app, find_duplicates, search, store_info
from embedkit.cli import app as cli_app
from embedkit.extraction.run import extract
from embedkit.serve.app import serve_store
from embedkit.serve.guard import is_loopback, resolve_token


def _local(app: object) -> TestClient:
    """A client that asks as a browser on this machine does (Host: 127.0.0.1:8000)."""
    return TestClient(app, base_url="http://127.0.0.1:8000")  # type: ignore[arg-type]


def _exif_rotated(path: Path) -> Path:
    """A 80x40 landscape JPEG whose EXIF orientation 6 says: show it rotated, 40x80."""
    img = Image.new("RGB", (80, 40), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, 20, 40))  # a blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, exif=exif.tobytes())
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    photos = root / "photos"
    for i in range(5):
        make_photo(photos / "cats" / f"cat{i}.jpg", i)
    for i in range(5):
        make_photo(photos / "dogs" / f"dog{i}.png", 100 + i)
    shutil.copy(photos / "cats" / "cat0.jpg", photos / "dogs" / "copy_of_cat0.jpg")
    _exif_rotated(photos / "rotated.jpg")
    extract([str(photos)], root / "s.store", model=TINY, random_init=True, workers=0)
    return root


@pytest.fixture(scope="module")
def client(served: Path) -> TestClient:
    return _local(create_app(served / "s.store"))


def _id_of(client: TestClient, name: str) -> int:
    for item in client.get("/api/images", params={"limit": 1000}).json():
        if item["path"].endswith(os.sep + name):
            return int(item["id"])
    raise AssertionError(f"{name} not listed")


def test_info_is_the_store_summary(client: TestClient, served: Path) -> None:
    r = client.get("/api/info")
    assert r.status_code == 200
    assert r.json() == json.loads(json.dumps(store_info(served / "s.store")))


def test_images_are_paged_in_a_stable_order(client: TestClient) -> None:
    whole = client.get("/api/images", params={"limit": 1000})
    assert whole.headers["X-Total-Count"] == "12"
    items = whole.json()
    assert len(items) == 12 and len({i["id"] for i in items}) == 12
    assert set(items[0]) >= {"id", "path", "width", "height"}
    assert all(i["key"] == str(i["id"]) for i in items)  # exact ids for JavaScript
    pages = [client.get("/api/images", params={"offset": o, "limit": 5}).json() for o in (0, 5, 10)]
    assert [i for p in pages for i in p] == items
    assert client.get("/api/images", params={"limit": 1000}).json() == items  # stable
    rotated = next(i for i in items if i["path"].endswith("rotated.jpg"))
    assert (rotated["width"], rotated["height"]) == (40, 80)


def test_search_by_id_is_what_embedkit_search_returns(client: TestClient, served: Path) -> None:
    # the server keeps the index open per store version instead of calling search() per
    # request; every stored id and a k past the store's size must still give the same hits
    ids = [i["id"] for i in client.get("/api/images", params={"limit": 1000}).json()]
    for k in (1, 4, 50):
        expected = search(served / "s.store", ids, k=k)
        for query, result in zip(ids, expected, strict=True):
            r = client.get("/api/search", params={"id": str(query), "k": k})
            assert r.status_code == 200
            got = [{f: h[f] for f in ("rank", "id", "path", "score")} for h in r.json()]
            assert got == [h.__dict__ for h in result.hits], (query, k)
            if k > 1:  # itself, or after its byte-identical twin (a tie at 1.0)
                assert query in [h["id"] for h in got[:2]]
    assert len(client.get("/api/search", params={"id": str(ids[0]), "k": 50}).json()) == 12


def test_upload_finds_the_stored_copy(client: TestClient, served: Path) -> None:
    stored = served / "photos" / "dogs" / "dog2.png"
    r = client.post(
        "/api/search", files={"file": ("mine.png", stored.read_bytes())}, data={"k": "3"}
    )
    assert r.status_code == 200, r.text
    hits = r.json()
    assert len(hits) == 3 and hits[0]["id"] == _id_of(client, "dog2.png")
    # 1.0 once extraction and queries share one decode path (it is 1.0 for a PNG already)
    assert hits[0]["score"] >= 0.999
    (expected,) = search(served / "s.store", [stored], k=3)
    assert [h["id"] for h in hits] == [h.id for h in expected.hits]


def test_uploads_never_reach_the_store(client: TestClient, served: Path) -> None:
    before = sorted(p.name for p in (served / "s.store" / "parts").iterdir())
    version = client.get("/api/config").json()["version"]
    buf = io.BytesIO()
    Image.new("RGB", (50, 50), (1, 2, 3)).save(buf, "PNG")
    assert client.post("/api/search", files={"file": ("x.png", buf.getvalue())}).status_code == 200
    assert sorted(p.name for p in (served / "s.store" / "parts").iterdir()) == before
    assert client.get("/api/config").json()["version"] == version


def test_bad_uploads_are_4xx_with_a_fix(served: Path, client: TestClient) -> None:
    r = client.post("/api/search", files={"file": ("x.jpg", b"\xff\xd8\xff garbage")})
    assert r.status_code == 400 and "cannot read the uploaded image" in r.json()["error"]
    r = client.post("/api/search", data={"k": "3"})  # no file field
    assert r.status_code == 400 and "file" in r.json()["error"]
    png = (served / "photos" / "dogs" / "dog0.png").read_bytes()
    small = _local(create_app(served / "s.store", max_upload_bytes=len(png) - 1))
    r = small.post("/api/search", files={"file": ("big.png", png)})
    assert r.status_code == 413 and "smaller" in r.json()["error"]
    # a huge declared body is refused before anything is read or spooled to disk
    tiny = _local(create_app(served / "s.store", max_upload_bytes=1000))
    r = tiny.post(
        "/api/search",
        content=b"x" * 200_000,
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 413 and "smaller" in r.json()["error"]
    # a decompression bomb: tiny file, huge declared size; the extraction pixel cap refuses it
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")
    r = client.post("/api/search", files={"file": ("bomb.png", bomb.getvalue())})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    "raw",
    [
        "..",
        "..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "%2e%2e",
        "1%2F..%2F2",
        "-1",
        "1.5",
        "abc",
        "99999999999999999999",
        "%00",
        "１２",  # full-width digits: str.isdigit() says yes, ids are ASCII
    ],
)
def test_no_path_from_the_request_reaches_the_file_system(client: TestClient, raw: str) -> None:
    for tail in ("file", "thumb"):
        r = client.get(f"/api/images/{raw}/{tail}")
        assert r.status_code in (400, 404), (raw, r.status_code)
        assert "error" in r.json()


def test_only_live_rows_are_served(client: TestClient, served: Path, tmp_path: Path) -> None:
    # a symlink named like an id, where a careless server would look: nothing serves it
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    for where in (served / "s.store", served / "s.store" / "thumbs", served / "photos"):
        where.mkdir(exist_ok=True)
        link = where / "1234"
        link.unlink(missing_ok=True)
        link.symlink_to(secret)
    try:
        for tail in ("file", "thumb", ""):
            r = client.get(f"/api/images/1234/{tail}".rstrip("/"))
            assert r.status_code == 404 and "no image 1234" in r.json()["error"]
    finally:
        for where in (served / "s.store", served / "s.store" / "thumbs", served / "photos"):
            (where / "1234").unlink()
    cat = _id_of(client, "cat1.jpg")
    r = client.get(f"/api/images/{cat}/file")
    assert r.status_code == 200
    assert r.content == (served / "photos" / "cats" / "cat1.jpg").read_bytes()
    assert r.headers["content-type"] == "image/jpeg"


def test_thumbnails_are_oriented_and_generated_once(client: TestClient, served: Path) -> None:
    rid = _id_of(client, "rotated.jpg")
    r = client.get(f"/api/images/{rid}/thumb")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.size[0] < thumb.size[1]  # upright: EXIF orientation applied
    assert thumb.getpixel((thumb.size[0] // 2, 2))[2] > 150  # the blue band is now on top
    (cached,) = (served / "s.store" / "thumbs").glob(f"{rid:016x}-*.jpg")
    marker = io.BytesIO()
    Image.new("RGB", (3, 3), (0, 255, 0)).save(marker, "JPEG")
    cached.write_bytes(marker.getvalue())  # a second request must come from the cache
    assert client.get(f"/api/images/{rid}/thumb").content == marker.getvalue()
    cached.unlink()


def test_a_file_gone_from_disk_is_a_404_that_says_so(tmp_path: Path) -> None:
    for i in range(3):
        make_photo(tmp_path / "p" / f"{i}.jpg", i)
    extract([str(tmp_path / "p")], tmp_path / "s", model=TINY, random_init=True, workers=0)
    c = _local(create_app(tmp_path / "s"))
    gone = _id_of(c, "1.jpg")
    (tmp_path / "p" / "1.jpg").unlink()
    for tail in ("file", "thumb"):
        r = c.get(f"/api/images/{gone}/{tail}")
        assert r.status_code == 404, (tail, r.text)
        assert "gone from disk" in r.json()["error"]
    assert "embedkit prune" in c.get(f"/api/images/{gone}/file").json()["error"]
    # a file replaced since extraction is not served as if it were the stored one
    (tmp_path / "p" / "2.jpg").write_bytes(b"something else entirely")
    r = c.get(f"/api/images/{_id_of(c, '2.jpg')}/file")
    assert r.status_code == 409 and "changed since extraction" in r.json()["error"]


def test_extract_while_serving_is_picked_up(tmp_path: Path) -> None:
    for i in range(3):
        make_photo(tmp_path / "p" / f"{i}.jpg", i)
    extract([str(tmp_path / "p")], tmp_path / "s", model=TINY, random_init=True, workers=0)
    c = _local(create_app(tmp_path / "s"))
    assert c.get("/api/images").headers["X-Total-Count"] == "3"
    make_photo(tmp_path / "p" / "new.jpg", 42)
    extract([str(tmp_path / "p")], tmp_path / "s", model=TINY, random_init=True, workers=0)
    assert c.get("/api/images").headers["X-Total-Count"] == "4"
    new = _id_of(c, "new.jpg")
    hits = c.get("/api/search", params={"id": str(new), "k": 2}).json()
    assert hits[0]["id"] == new
    assert c.get("/api/info").json()["rows"] == 4


def test_duplicates_are_what_embedkit_duplicates_json_gives(
    client: TestClient, served: Path
) -> None:
    r = client.get("/api/duplicates", params={"threshold": 0.95})
    assert r.status_code == 200
    got = [[{k: v for k, v in m.items() if k != "key"} for m in g] for g in r.json()]
    expected = [[m.to_dict() for m in g.members] for g in find_duplicates(served / "s.store", 0.95)]
    assert got == json.loads(json.dumps(expected))
    pair = {_id_of(client, "cat0.jpg"), _id_of(client, "copy_of_cat0.jpg")}
    assert any({m["id"] for m in g} >= pair for g in got)
    assert all(sum(m["keep"] for m in g) == 1 for g in got)


def test_classify_without_a_head_says_why(client: TestClient) -> None:
    r = client.get("/api/classify", params={"id": str(_id_of(client, "cat0.jpg"))})
    assert r.status_code == 409 and "randomly initialised" in r.json()["error"]


def test_map_places_every_image(client: TestClient) -> None:
    body = client.get("/api/map").json()
    assert body["method"] in ("pca", "umap") and len(body["keys"]) == 12
    assert all(0.0 <= v <= 1.0 for v in body["x"] + body["y"])
    assert len(set(zip(body["x"], body["y"], strict=True))) > 1


@pytest.mark.parametrize(
    "url",
    [
        "/api/images?offset=-1",
        "/api/images?limit=0",
        "/api/images?limit=abc",
        "/api/search",
        "/api/search?id=1&k=0",
        "/api/search?id=1&k=x",
        "/api/search?id=..%2Fetc",
        "/api/search?id=12345",
        "/api/duplicates?threshold=2",
        "/api/duplicates?threshold=nan",
        "/api/classify",
        "/api/probe",
        "/api/probe/predictions",
        "/api/nothing",
    ],
)
def test_bad_requests_are_4xx_json_never_500(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
    body = r.json()
    assert isinstance(body["error"], str) and len(body["error"]) > 10


def test_token_is_checked_on_every_api_call(served: Path) -> None:
    c = _local(create_app(served / "s.store", token="s3cret"))
    assert c.get("/api/info").status_code == 401
    assert c.get("/api/info", headers={"X-Embedkit-Token": "wrong"}).status_code == 401
    assert c.get("/api/info", headers={"X-Embedkit-Token": "s3cret"}).status_code == 200
    assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/api/info?token=s3cret").status_code == 200
    key = c.get("/api/images?token=s3cret").json()[0]["key"]
    assert c.get(f"/api/images/{key}/thumb").status_code == 401
    assert c.get(f"/api/images/{key}/thumb?token=s3cret").status_code == 200
    assert c.get("/").status_code == 200  # the page holds no data; it passes ?token= along
    assert "token" in (Path(__file__).parents[1] / "embedkit/serve/static/app.js").read_text()


def test_other_hosts_need_a_token() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert resolve_token("127.0.0.1", None) is None
    generated = resolve_token("0.0.0.0", None)
    assert generated and len(generated) >= 24 and generated != resolve_token("0.0.0.0", None)
    assert resolve_token("0.0.0.0", "mine") == "mine"
    from embedkit.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="token"):
        serve_store("unused", host="0.0.0.0")


def test_page_and_static_files_are_served_offline(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "<title>embedkit</title>" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    for name in ("app.js", "style.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200
        assert "http://" not in asset.text and "https://" not in asset.text  # no CDN
    assert client.get("/static/..%2Fapp.py").status_code == 404
    assert client.get("/openapi.json").json()["paths"]["/api/search"]


def test_probe_predictions_and_confusion(served: Path, tmp_path: Path) -> None:
    from embedkit.classification.train import train_store_probe

    probe = train_store_probe(
        served / "s.store", missing="drop", group_threshold=1.0, max_epochs=5, device="cpu"
    )
    probe.save(tmp_path / "probe")
    c = _local(create_app(served / "s.store", probe=tmp_path / "probe"))
    assert c.get("/api/config").json()["probe"] is True
    summary = c.get("/api/probe").json()
    assert summary["classes"] == ["cats", "dogs"]
    matrix = summary["confusion"]
    assert sum(map(sum, matrix)) == summary["labelled"] == 11  # rotated.jpg has no folder
    rows = c.get("/api/probe/predictions", params={"limit": 100}).json()
    assert len(rows) == 12
    ranks = [{False: 0, None: 1, True: 2}[r["correct"]] for r in rows]
    assert ranks == sorted(ranks)  # misclassified first
    wrong = sum(r["correct"] is False for r in rows)
    assert wrong == summary["labelled"] - matrix[0][0] - matrix[1][1]
    cell = c.get("/api/probe/predictions", params={"true": "cats", "predicted": "dogs"}).json()
    assert len(cell) == matrix[0][1]
    assert all(r["label"] == "cats" and r["predicted"] == "dogs" for r in cell)
    one = c.get("/api/probe/predictions", params={"id": str(rows[-1]["id"])}).json()
    assert one == [rows[-1]]
    assert c.get("/api/probe/predictions", params={"id": "../x"}).status_code == 400
    by_id = {r["id"]: r["predicted"] for r in rows}
    for p in probe.classify(store=served / "s.store", top_k=1):
        assert by_id[p.id] == p.top[0].label


def test_a_probe_from_another_model_is_refused_at_start(served: Path, tmp_path: Path) -> None:
    from embedkit.classification.train import train_store_probe
    from embedkit.errors import ProbeError

    photos = shutil.copytree(served / "photos", tmp_path / "p")
    extract([str(photos)], tmp_path / "o", model="test_resnet", random_init=True, workers=0)
    train_store_probe(
        tmp_path / "o", missing="drop", group_threshold=1.0, max_epochs=2, device="cpu"
    ).save(tmp_path / "probe")
    with pytest.raises(ProbeError, match="another model"):
        create_app(served / "s.store", probe=tmp_path / "probe")


def test_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli_app, ["serve", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.output


def test_report_duplicates_is_one_self_contained_file(served: Path, tmp_path: Path) -> None:
    out = tmp_path / "dups.html"
    r = CliRunner().invoke(
        cli_app, ["report", "duplicates", str(served / "s.store"), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "copy_of_cat0.jpg" in text and "cat0.jpg" in text
    assert text.count("data:image/jpeg;base64,") >= 2
    assert "http://" not in text and "https://" not in text and 'src="/' not in text
    assert "keep" in text and "96&times;72" in text


def test_report_map_is_one_self_contained_file(served: Path, tmp_path: Path) -> None:
    out = tmp_path / "map.html"
    r = CliRunner().invoke(
        cli_app, ["report", "map", str(served / "s.store"), "-o", str(out), "--map", "pca"]
    )
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "12 images, PCA" in text
    payload = text.split('id="data">')[1].split("</script>")[0]
    data = json.loads(payload)
    assert len(data["x"]) == 12 and len(data["thumbs"]) == 12
    assert all(v.startswith("data:image/jpeg;base64,") for v in data["thumbs"].values())
    assert "http://" not in text and "https://" not in text


def test_serve_help_teaches() -> None:
    r = CliRunner().invoke(cli_app, ["serve", "--help"], terminal_width=200)
    assert r.exit_code == 0
    for word in ("--host", "--port", "--token", "--probe", "127.0.0.1", "/docs"):
        assert word in r.output, word


def test_uploaded_copy_of_a_large_jpeg_finds_itself(tmp_path: Path) -> None:
    # 2400x1600: extraction may decode a JPEG this size at reduced scale (draft) while an
    # upload goes through the query path; until the two share one decode path the copy scores
    # 0.99998 rather than 1.0 with this model (measured), hence >= 0.999
    for i in range(4):
        make_photo(tmp_path / "p" / f"{i}.jpg", i, size=(2400, 1600))
    extract([str(tmp_path / "p")], tmp_path / "s", model=TINY, random_init=True, workers=0)
    c = _local(create_app(tmp_path / "s"))
    data = (tmp_path / "p" / "2.jpg").read_bytes()
    hits = c.post("/api/search", files={"file": ("copy.jpg", data)}, data={"k": "2"}).json()
    assert hits[0]["id"] == _id_of(c, "2.jpg")
    assert hits[0]["score"] >= 0.999 and hits[1]["score"] < hits[0]["score"]


def test_embedkit_serve_runs_and_prints_a_token_url_off_loopback(served: Path) -> None:
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "embedkit", "serve", str(served / "s.store")]
    proc = subprocess.Popen(
        [*cmd, "--host", "0.0.0.0", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"http://0.0.0.0:{port}/?token=" in line, line
        token = line.split("?token=")[1].split()[0]
        url = f"http://127.0.0.1:{port}/api/info"
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(url, timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        assert r.status_code == 401
        assert httpx.get(url, params={"token": token}).json()["rows"] == 12
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
def test_classify_and_upload_with_real_weights(tmp_path: Path) -> None:
    from embedkit import classify

    for i in range(3):
        make_photo(tmp_path / "p" / f"{i}.jpg", i, size=(640, 480))
    extract([str(tmp_path / "p")], tmp_path / "s", workers=0)  # efficientnet_lite0, offline
    c = _local(create_app(tmp_path / "s"))
    assert c.get("/api/config").json()["head"] is True
    target = _id_of(c, "1.jpg")
    r = c.get("/api/classify", params={"id": str(target), "k": 3})
    assert r.status_code == 200
    (expected,) = [p for p in classify(store=tmp_path / "s", top_k=3) if p.id == target]
    assert r.json() == json.loads(json.dumps(expected.to_dict()))
    data = (tmp_path / "p" / "1.jpg").read_bytes()
    hits = c.post("/api/search", files={"file": ("u.jpg", data)}, data={"k": "1"}).json()
    assert hits[0]["id"] == target and hits[0]["score"] >= 0.999


def test_pca_map_separates_clusters_and_is_deterministic() -> None:
    import numpy as np

    from embedkit.serve.projection import project_2d

    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.1, (50, 32)) + 3.0
    b = rng.normal(0, 0.1, (50, 32)) - 3.0
    x = np.vstack([a, b]).astype(np.float32)
    xy, used = project_2d(x, "pca")
    assert used == "pca" and xy.shape == (100, 2)
    assert xy.min() == 0.0 and xy.max() == 1.0
    assert abs(xy[:50, 0].mean() - xy[50:, 0].mean()) > 0.8  # the first axis splits them
    again, _ = project_2d(x[::-1].copy(), "pca")
    np.testing.assert_allclose(again[::-1], xy, atol=1e-5)  # same data, same map
    assert project_2d(np.zeros((0, 4), np.float32))[0].shape == (0, 2)


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:8000", 200),
        ("localhost:8000", 200),
        ("[::1]:8000", 200),
        ("attacker.example", 403),  # DNS rebinding: their name, our address
        ("attacker.example:8000", 403),
        ("127.0.0.1.attacker.example", 403),
        ("192.168.1.10:8000", 403),
    ],
)
def test_without_a_token_only_loopback_names_are_answered(
    client: TestClient, host: str, status: int
) -> None:
    for url in ("/api/info", "/"):
        r = client.get(url, headers={"host": host})
        assert r.status_code == status, (host, url)
    if status == 403:
        assert "--token" in client.get("/api/info", headers={"host": host}).json()["error"]


def test_with_a_token_any_host_name_is_answered(served: Path) -> None:
    c = TestClient(create_app(served / "s.store", token="t0k"), base_url="http://photos.lan")
    assert c.get("/api/info", params={"token": "t0k"}).status_code == 200


def test_a_slow_view_does_not_block_the_others(served: Path) -> None:
    import threading

    from embedkit.serve.state import LiveStore

    snap = LiveStore(served / "s.store").current()
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        assert release.wait(10)
        return "slow"

    t = threading.Thread(target=snap.cached, args=("slow", slow))
    t.start()
    assert started.wait(10)
    assert snap.cached("fast", lambda: "fast") == "fast"  # while "slow" is computing
    release.set()
    t.join(10)
    assert snap.cached("slow", lambda: "again") == "slow"  # computed once


def test_api_docs_work_offline(client: TestClient) -> None:
    """/docs uses the Swagger UI assets installed with the package, not a CDN."""
    r = client.get("/docs")
    assert r.status_code == 200 and "SwaggerUIBundle" in r.text
    assert "cdn" not in r.text.lower() and "https://" not in r.text.split("<body>")[-1]
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "embedkit"
    # Swagger UI 4 renders OpenAPI 3.0 only: the page reads a copy labelled 3.0.3
    assert "/docs-openapi.json" in r.text
    assert client.get("/docs-openapi.json").json()["openapi"] == "3.0.3"
