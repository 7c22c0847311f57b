"""Near duplicates: embedkit vs imagededup's perceptual hashes, on three collection types.

Usage: PYTHONPATH=/path/to/peers python benchmarks/duplicates.py [--work DIR] [--textiles N]

Data (``benchmarks/dupdata.py``, everything installs from PyPI): photos (scikit-image,
scikit-learn, matplotlib samples; 23 originals, 19 edited), textiles (conformal-clip-data;
default 300 originals, 100 edited) and documents (rendered standard-library docstrings plus
scikit-image's page and text; 120 originals, 40 edited), 12 edits per edited original
(``dupdata.EDITS``). Each collection is its own store/folder: calibration is per collection.

Peers (``pip install --target DIR --no-deps imagededup conformal-clip-data PyWavelets`` and
``DIR`` on PYTHONPATH): imagededup 0.3.3's PHash, DHash and WHash (its CNN needs a download).
Each hash's Hamming threshold is the best F1 on the ``tune`` split (families split by a seeded
shuffle), then reported on ``heldout`` too; embedkit runs at its defaults (nothing tuned per
collection). Pair-level precision/recall/F1: every pair of files in one group.

Each method runs in a child process (time from files to groups, after its imports; peak RSS of
that process, decode workers not included). embedkit runs three times: ``folder``
(``find_file_duplicates``, what ``embedkit duplicates FOLDER`` runs: no store, no model, pixels
and bytes only), ``files to groups`` (extract,
efficientnet_lite0 on CPU, then duplicates, in one process: what a first run costs) and ``store
to groups`` (a fresh process that finds the duplicates of the store the first one wrote: what
every later run costs; it reads the pixel fingerprints extraction kept, decodes no image).
Writes the ``duplicates`` section of benchmarks/RESULTS.md. About 6-7 minutes on the shared
2-core machine, most of it extraction and the peers' start-up; ``--textiles 150`` is quicker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from dupdata import EDITS, build  # noqa: E402

HASHES = ("PHash", "DHash", "WHash")
EK, FO = "embedkit store", "embedkit folder"
HASH_THRESHOLDS = (4, 6, 8, 10, 12, 16)  # imagededup's default is 10


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_embedkit(folder: str, store: str) -> dict:
    i0 = time.perf_counter()
    from embedkit.extraction.run import extract
    from embedkit.index.duplicates import find_duplicates

    t0 = time.perf_counter()
    summary = extract([folder], store)
    t1 = time.perf_counter()
    extract_mb = _peak_mb()
    notes: list[str] = []
    groups = find_duplicates(store, log=notes.append)
    t2 = time.perf_counter()
    evidence: dict[str, int] = {}
    for g in groups:
        for m in g.members:
            evidence[m.evidence] = evidence.get(m.evidence, 0) + 1
    return {
        "groups": [[m.path for m in g.members] for g in groups],
        "seconds": t2 - t0,
        "dup_seconds": t2 - t1,
        "import_seconds": t0 - i0,
        "peak_mb": _peak_mb(),
        "extract_peak_mb": extract_mb,
        "torch": "torch" in sys.modules,  # False: the verified ONNX export ran, torch never loaded
        "split": f"{summary.workers} decode workers, {summary.threads} model threads",
        "notes": [n for n in notes if "background" in n or "fingerprints" in n],
        "evidence": evidence,
    }


def run_store(store: str) -> dict:
    """Duplicates of an extracted store, in a fresh process: what every later run costs."""
    i0 = time.perf_counter()
    from embedkit.index.duplicates import find_duplicates

    t0 = time.perf_counter()
    notes: list[str] = []
    groups = find_duplicates(store, log=notes.append)
    t1 = time.perf_counter()
    return {
        "groups": [[m.path for m in g.members] for g in groups],
        "seconds": t1 - t0,
        "import_seconds": t0 - i0,
        "peak_mb": _peak_mb(),
        "decoded": [n for n in notes if "fingerprints" in n],
    }


def run_folder(folder: str) -> dict:
    """Duplicates of the folder itself (no store, no model: pixels and bytes only)."""
    i0 = time.perf_counter()
    from embedkit.index.file_duplicates import find_file_duplicates

    t0 = time.perf_counter()
    result = find_file_duplicates(folder)
    t1 = time.perf_counter()
    evidence: dict[str, int] = {}
    for g in result.groups:
        for m in g.members:
            evidence[m.evidence] = evidence.get(m.evidence, 0) + 1
    return {
        "groups": [[m.path for m in result.groups[i].members] for i in range(len(result.groups))],
        "seconds": t1 - t0,
        "import_seconds": t0 - i0,
        "peak_mb": _peak_mb(),
        "torch": "torch" in sys.modules or "onnxruntime" in sys.modules,
        "evidence": evidence,
    }


def run_hash(folder: str, method: str) -> dict:
    import imagededup.methods as m

    t0 = time.perf_counter()
    hasher = getattr(m, method)(verbose=False)
    enc = hasher.encode_images(image_dir=folder)
    t1 = time.perf_counter()
    out = {}
    for thr in HASH_THRESHOLDS:
        dup = hasher.find_duplicates(encoding_map=enc, max_distance_threshold=thr)
        out[thr] = {k: v for k, v in dup.items() if v}
    t2 = time.perf_counter()
    # time for one threshold: encoding plus one search (the searches are similar)
    seconds = (t1 - t0) + (t2 - t1) / len(HASH_THRESHOLDS)
    return {"pairs": out, "seconds": seconds, "peak_mb": _peak_mb()}


def whole_process(folder: str, dhash_threshold: int) -> tuple[float, float]:
    """Wall seconds of a whole process, start-up included, as a user waits for it:
    ``embedkit duplicates FOLDER --json`` against a script running imagededup's DHash at its
    best threshold. Each run twice, the faster kept (the first may warm the page cache)."""
    ours = [sys.executable, "-m", "embedkit", "duplicates", folder, "--json"]
    theirs = [
        sys.executable,
        "-c",
        "import sys, imagededup.methods as m; "
        f"m.DHash(verbose=False).find_duplicates(image_dir={folder!r}, "
        f"max_distance_threshold={dhash_threshold})",
    ]
    out = []
    for cmd in (ours, theirs):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            best = min(best, time.perf_counter() - t0)
        out.append(best)
    return out[0], out[1]


def _child(args: list[str]) -> dict:
    """Run one method in a fresh interpreter (own peak RSS)."""
    r = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _pairs_of_groups(groups: list[list[str]]) -> set[tuple[str, str]]:
    out = set()
    for g in groups:
        g = sorted(g)
        out |= {(a, b) for i, a in enumerate(g) for b in g[i + 1 :]}
    return out


def _prf(pred: set, true: set) -> tuple[float, float, float]:
    tp = len(pred & true)
    p = tp / len(pred) if pred else 1.0
    r = tp / len(true) if true else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def evaluate(items: list, pred: set[tuple[str, str]], split: str) -> dict:
    info = {str(i.path): i for i in items if i.split == split}
    pred = {(a, b) for a, b in pred if a in info and b in info}
    files = sorted(info)
    true = {
        (a, b)
        for i, a in enumerate(files)
        for b in files[i + 1 :]
        if info[a].family == info[b].family
    }
    p, r, f = _prf(pred, true)
    orig = {it.family: str(it.path) for it in info.values() if it.edit == "original"}
    recall = {}
    for e in EDITS:
        hits = [
            tuple(sorted((str(it.path), orig[it.family]))) in pred
            for it in info.values()
            if it.edit == e
        ]
        recall[e] = sum(hits) / len(hits) if hits else float("nan")
    return {"p": p, "r": r, "f1": f, "edit_recall": recall}


def dhash_s(res: dict) -> float:
    return next(run["seconds"] for name, (_, run) in res.items() if name.startswith("DHash"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--textiles", type=int, default=300)
    ap.add_argument("--child", nargs="+", default=None)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "embedkit":
            res = run_embedkit(*rest)
        elif kind == "store":
            res = run_store(rest[0])
        elif kind == "folder":
            res = run_folder(rest[0])
        else:
            res = run_hash(rest[0], kind)
        print(json.dumps(res))
        return
    work = a.work or Path(tempfile.mkdtemp(prefix="dupbench-"))
    sizes = {"photos": (40, 19), "textiles": (a.textiles, a.textiles // 3), "documents": (120, 40)}
    rows, edit_rows, notes, time_rows, walls = [], [], [], [], []
    goals: list[str] = []
    for kind, (n, edited) in sizes.items():
        folder = work / kind / "img"
        items = build(folder, kind, n=n, edited=edited)
        load0 = os.getloadavg()[0]
        ek = _child(["embedkit", str(folder), str(work / kind / "store")])
        st = _child(["store", str(work / kind / "store")])
        if sorted(map(sorted, st["groups"])) != sorted(map(sorted, ek["groups"])):
            raise RuntimeError(f"{kind}: store to groups found other groups than files to groups")
        notes.append(f"- {kind} ({len(items)} files): " + "; ".join(ek["notes"]))
        fo = _child(["folder", str(folder)])
        ek_pred = _pairs_of_groups(ek["groups"])
        res = {EK: (ek_pred, ek), FO: (_pairs_of_groups(fo["groups"]), fo)}
        for h in HASHES:
            hr = _child([h, str(folder)])
            best = None
            for thr, dup in hr["pairs"].items():
                pred = {
                    tuple(sorted((str(folder / x), str(folder / y))))
                    for x, ys in dup.items()
                    for y in ys
                }
                f = evaluate(items, pred, "tune")["f1"]
                if best is None or f > best[0]:
                    best = (f, thr, pred)
            assert best is not None
            res[f"{h} <= {best[1]}"] = (best[2], hr)
        held_f1 = {name: evaluate(items, pred, "heldout")["f1"] for name, (pred, _) in res.items()}
        best_hash = max(f for name, f in held_f1.items() if not name.startswith("embedkit"))
        want = 0.95 if kind == "photos" else best_hash + 0.1
        goal = ">= 0.95" if kind == "photos" else "best hash + 0.1"
        dh = dhash_s(res)
        goals.append(
            f"- {kind}, folder (`embedkit duplicates FOLDER`): held-out F1 {held_f1[FO]:.3f} vs "
            f"goal {want:.3f} ({goal}): {'met' if held_f1[FO] >= want else 'NOT met'}; files "
            f"to groups {fo['seconds'] / dh:.2f}x DHash: "
            f"{'met' if fo['seconds'] <= 1.5 * dh else 'NOT met'}"
        )
        goals.append(
            f"- {kind}, store (`extract` then `duplicates STORE`): held-out F1 "
            f"{held_f1[EK]:.3f}: {'met' if held_f1[EK] >= want else 'NOT met'}; "
            f"store to groups {st['seconds'] / dh:.2f}x DHash: "
            f"{'met' if st['seconds'] <= 1.5 * dh else 'NOT met'}; files to groups "
            f"{ek['seconds'] / dh:.1f}x DHash: "
            f"{'met' if ek['seconds'] <= 1.5 * dh else 'NOT met'} (extraction "
            f"{100 * (1 - ek['dup_seconds'] / ek['seconds']):.0f}% of it)"
        )
        for name, (pred, run) in res.items():
            tune, held = evaluate(items, pred, "tune"), evaluate(items, pred, "heldout")
            dup_s = (
                f" ({run['dup_seconds']:.1f} s without extraction)" if "dup_seconds" in run else ""
            )
            rows.append(
                f"| {kind} | {name} | {tune['p']:.3f} / {tune['r']:.3f} / {tune['f1']:.3f} "
                f"| {held['p']:.3f} / {held['r']:.3f} / {held['f1']:.3f} "
                f"| {run['seconds']:.1f}{dup_s} | {run['peak_mb']:.0f} |"
            )
            edit_rows.append(
                f"| {kind} | {name} | "
                + " | ".join(f"{held['edit_recall'][e]:.2f}" for e in EDITS)
                + " |"
            )
            print(rows[-1], flush=True)
        dhash = next(run for name, (_, run) in res.items() if name.startswith("DHash"))
        dhash_thr = int(next(n for n in res if n.startswith("DHash")).split("<=")[1])
        wall = whole_process(str(folder), dhash_thr)
        walls.append(f"| {kind} | {wall[0]:.2f} | {wall[1]:.2f} | {wall[0] / wall[1]:.2f}x |")
        fastest = min(
            run["seconds"] for name, (_, run) in res.items() if not name.startswith("embedkit")
        )
        time_rows.append(
            f"| {kind} | {fo['seconds']:.2f} ({fo['import_seconds']:.1f}) "
            f"| {fo['seconds'] / dhash['seconds']:.2f}x "
            f"| {ek['seconds']:.1f} ({ek['import_seconds']:.1f}) "
            f"| {st['seconds']:.2f} ({st['import_seconds']:.1f}) "
            f"| {dhash['seconds']:.2f} | {st['seconds'] / dhash['seconds']:.2f}x "
            f"| {ek['seconds'] / dhash['seconds']:.1f}x | {st['peak_mb']:.0f} / "
            f"{ek['extract_peak_mb']:.0f} / {dhash['peak_mb']:.0f} "
            f"| {load0:.1f} / {os.getloadavg()[0]:.1f} |"
        )
        print(time_rows[-1], flush=True)
        notes.append(
            f"  folder members by evidence: {fo['evidence']}; model runtime imported: "
            f"{'yes' if fo['torch'] else 'no'}"
        )
        notes.append(
            f"  store members by evidence: {ek['evidence']}; extraction: {ek['split']}, "
            f"torch imported: {'yes' if ek['torch'] else 'no'}; store to groups decoded: "
            f"{'; '.join(st['decoded']) or 'no file'}; fastest hash {fastest:.2f} s"
        )
    body = "\n".join(
        [
            f"Machine: {os.cpu_count()} CPUs (shared). Defaults for embedkit (efficientnet_lite0, "
            "calibrated threshold, pixel checks); each hash at its best threshold on the tune "
            f"split. Textiles subsampled to {a.textiles} originals. Time: files to groups, in a "
            "child process; memory: its peak RSS (embedkit's includes the CNN extraction). "
            "embedkit's pixel-rule constants (verify.py), flat-border and corner rules "
            "(pixelprint.py) and calibration fraction were chosen on the tune split of these "
            "collections; the held-out families were not looked at while choosing them, with "
            "two exceptions made while diagnosing misses of both splits: the relative "
            "flat-border rule (pixelprint.FLAT) answers held-out misses of low-contrast photos "
            "at 60% contrast, and the page-levelling gain (pixelprint.SKEW_GAIN) was raised "
            "from 1.5 to 3 after a held-out photo (a grey moon) was levelled by mistake; the "
            "held-out photos are not an untouched test of those two rules (textiles and "
            "documents are). "
            "'embedkit folder' = `embedkit duplicates FOLDER` (pixels and bytes, no model); "
            "'embedkit store' = `embedkit extract` then `embedkit duplicates STORE`.",
            "",
            "| collection | method | tune P / R / F1 | held-out P / R / F1 | seconds | peak MB |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Time (seconds after the child's imports; the imports in brackets) and memory "
            "(peak RSS in MB of the child process; decode workers not included). 'folder' = "
            "`find_file_duplicates(folder)` (`embedkit duplicates FOLDER`: no store, no model; "
            "reads, hashes and fingerprints every file); 'extract + "
            "duplicates' = extraction + duplicates in one process; 'store to groups' = duplicates "
            "of the extracted store in a fresh process (reads the pixel fingerprints "
            "extraction kept); DHash = imagededup's files to hashes + one search; load "
            "average (1 min) of the 2-core machine before / after the collection:",
            "",
            "| collection | folder (pixels only) | folder / DHash | extract + duplicates "
            "| store to groups | DHash | store / DHash | extract+dup / DHash "
            "| MB folder / store / extract+dup / DHash | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *time_rows,
            "",
            "Whole process, start-up included (seconds of wall time, the faster of two runs): "
            "`python -m embedkit duplicates FOLDER --json` against a script that runs "
            "imagededup's DHash `find_duplicates` on the folder at its best threshold:",
            "",
            "| collection | embedkit duplicates FOLDER | imagededup DHash script | ratio |",
            "|---|---|---|---|",
            *walls,
            "",
            "Goals of issue 15 (F1 at the defaults; time within 1.5x the hashes' on the same "
            "files):",
            "",
            *goals,
            "",
            "From scratch, `embedkit duplicates FOLDER` is the way to meet the hashes' time: "
            "extraction runs a CNN per image (most of 'extract + duplicates' on 2 shared cores); "
            "once a store exists, its duplicates cost less than the hashes.",
            "",
            "Recall per edit (held-out; edited copy grouped with its original):",
            "",
            "| collection | method | " + " | ".join(EDITS) + " |",
            "|---|---|" + "---|" * len(EDITS),
            *edit_rows,
            "",
            "Calibration:",
            "",
            *notes,
        ]
    )
    print(body)
    write_section("duplicates", "Near duplicates vs perceptual hashes", body)


if __name__ == "__main__":
    main()
