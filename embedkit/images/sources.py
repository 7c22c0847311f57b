"""Finding the image files to decode.

``find_images`` turns folders, single files and list files into ``FoundFile`` records plus
``ScanFailure`` records (reason from ``images.FAILURE_REASONS``) for what could not be
scanned. Which suffixes count as images is ``images.IMAGE_SUFFIXES``, shared with the decoder.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .decode import IMAGE_SUFFIXES, _describe

_LIST_SUFFIXES = frozenset({".txt", ".csv"})

# Camera RAW suffixes: Pillow has no decoder for them (convert to JPEG/TIFF first).
RAW_SUFFIXES = frozenset(
    {".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".raf", ".orf",
     ".rw2", ".pef", ".srw", ".x3f", ".raw", ".3fr", ".erf", ".kdc", ".mrw", ".rwl", ".iiq"}
)  # fmt: skip
# Image formats that need a Pillow plugin or build option this install lacks.
_PLUGIN_SUFFIXES = {".heic": "heic", ".heif": "heic", ".avif": "avif"}

# Why a file in a walked folder was not taken: kind -> how the warning names it.
SKIP_KINDS = {
    "hidden": "hidden (name starts with '.')",
    "raw": "camera RAW (no decoder)",
    "heic": "HEIC/HEIF (pip install pillow-heif)",
    "avif": "AVIF (Pillow built without libavif)",
    "other": "unknown suffix",
    "store": "embedkit store folder (its thumbnails are not photos)",
}
# What an embedkit store's manifest.json says it is (``store.read.FORMAT_NAME``; not imported:
# this module stays free of pyarrow). A store inside a walked folder is skipped whole.
_STORE_FORMAT = b'"embedkit-store"'


def is_store_dir(path: str) -> bool:
    """Whether ``path`` is an embedkit store (its manifest names the store format)."""
    try:
        with open(os.path.join(path, "manifest.json"), "rb") as f:
            return _STORE_FORMAT in f.read(4096)
    except OSError:
        return False


def skip_kind(name: str) -> str:
    """Why a file named ``name`` is not an image to decode (a key of ``SKIP_KINDS``)."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix in RAW_SUFFIXES:
        return "raw"
    if suffix in _PLUGIN_SUFFIXES:
        return _PLUGIN_SUFFIXES[suffix]
    return "hidden" if name.startswith(".") else "other"


_NOT_A_FILE = "not a regular file (a pipe, device or socket)"


@dataclass(frozen=True)
class FoundFile:
    """One image file to decode.

    Attributes:
        root: absolute source root (the folder given, or the parent of a named file).
        path: posix path relative to ``root``, exact Unicode as on disk.
        abspath: absolute path of the file.
    """

    root: str
    path: str
    abspath: str


@dataclass(frozen=True)
class ScanFailure:
    """A file or folder that could not be scanned; ``reason`` is in ``images.FAILURE_REASONS``."""

    root: str
    path: str
    reason: str
    detail: str


def find_images(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    skipped: Counter[str] | None = None,
) -> tuple[list[FoundFile], list[ScanFailure]]:
    """Expand folders, image files and list files into the image files to decode.

    A folder is walked recursively (following symlinked folders, recording loops); hidden
    files and folders (name starting with ``.``) and files whose lowercased suffix is not in
    ``IMAGE_SUFFIXES`` are ignored. A ``.txt`` list file
    holds one path per line (blank lines and ``#`` comments ignored); a ``.csv`` list file
    uses its ``path`` column, or its first column when the header has none. Relative list
    entries are resolved against the list file's folder. The same absolute path is returned
    once, at its first occurrence.

    Args:
        sources: folders, image files and list files; a single path is accepted too.
        skipped: when given, counts the files of walked folders that were not taken, by
            ``skip_kind`` (hidden files and folders, camera RAW, HEIC/AVIF without a plugin,
            other suffixes).

    Returns:
        The files found (in source order, each source sorted by path) and the failures.

    Raises:
        InvalidArgumentError: a source does not exist.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    found: list[FoundFile] = []
    failures: list[ScanFailure] = []
    skipped = skipped if skipped is not None else Counter()
    for source in sources:
        path = os.path.abspath(os.fsdecode(source))
        if not os.path.exists(path):
            raise InvalidArgumentError(
                f"source {os.fsdecode(source)!r} does not exist; pass an existing folder, "
                "image file, or .txt/.csv list file"
            )
        suffix = os.path.splitext(path)[1].lower()
        if os.path.isdir(path):
            _walk(path, found, failures, skipped)
        elif suffix in _LIST_SUFFIXES:
            for entry in _read_list(path):
                _add_entry(os.path.join(os.path.dirname(path), entry), found, failures, skipped)
        else:
            _add_entry(path, found, failures, skipped)

    seen: set[str] = set()
    unique: list[FoundFile] = []
    for f in found:
        key = os.path.normpath(f.abspath)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, list(dict.fromkeys(failures))


def _add_entry(
    path: str, found: list[FoundFile], failures: list[ScanFailure], skipped: Counter[str]
) -> None:
    """One explicitly named path: an image file, or a folder named inside a list file."""
    path = os.path.abspath(path)
    root, name = os.path.split(path)
    if os.path.isdir(path):
        _walk(path, found, failures, skipped)
        return
    if not os.path.lexists(path):
        failures.append(ScanFailure(root, name, "not_found", "no such file"))
        return
    if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
        failures.append(
            ScanFailure(
                root,
                name,
                "unsupported_format",
                f"suffix not in {', '.join(sorted(IMAGE_SUFFIXES))}",
            )
        )
        return
    failure = _stat_failure(path, root, name)
    if failure is not None:
        failures.append(failure)
    else:
        found.append(FoundFile(root=root, path=name, abspath=path))


def _stat_failure(abspath: str, root: str, rel: str) -> ScanFailure | None:
    """Why a (possibly symlinked) file cannot be used, or None when it is a regular file.

    A named pipe would block the decoder forever and a device like /dev/zero never ends, so
    anything but a regular file is refused here, before any worker opens it.
    """
    try:
        st = os.stat(abspath)
    except FileNotFoundError:
        return ScanFailure(root, rel, "not_found", "broken symlink")
    except PermissionError as e:
        return ScanFailure(root, rel, "permission_denied", _describe(e))
    except OSError as e:
        reason = "symlink_loop" if e.errno == errno.ELOOP else "not_found"
        return ScanFailure(root, rel, reason, _describe(e))
    if not stat.S_ISREG(st.st_mode):
        return ScanFailure(root, rel, "not_a_file", _NOT_A_FILE)
    return None


def _walk(
    root: str, found: list[FoundFile], failures: list[ScanFailure], skipped: Counter[str]
) -> None:
    """Recursive scan of one folder source; ``path`` values are relative to ``root``."""
    results: list[FoundFile] = []
    problems: list[ScanFailure] = []
    # (st_dev, st_ino) of every folder scanned, so a symlink back up the tree (or a second
    # link to a folder already scanned) is visited once; os.walk(followlinks=True) loops forever.
    visited: dict[tuple[int, int], str] = {}

    # An explicit stack rather than recursion: folder depth is the user's, not ours to cap.
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [(root, "", frozenset())]
    while stack:
        dirpath, rel, ancestors = stack.pop()
        try:
            st = os.stat(dirpath)
        except OSError as e:
            problems.append(ScanFailure(root, rel or ".", "unreadable_dir", _describe(e)))
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited:
            if key in ancestors:
                problems.append(
                    ScanFailure(root, rel, "symlink_loop", f"links back to {visited[key] or '.'!r}")
                )
            # Otherwise an alias of a folder already scanned: its files are already listed.
            continue
        visited[key] = rel
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append(ScanFailure(root, rel or ".", "unreadable_dir", _describe(e)))
            continue
        subdirs: list[tuple[str, str, frozenset[tuple[int, int]]]] = []
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name.startswith("."):
                # Hidden files and folders of a walked tree are not the user's photos: macOS
                # writes ._IMG_1.jpg (AppleDouble metadata, not a JPEG) beside every photo on a
                # non-Apple disk, and .thumbnails/.Trash-1000/.git hold copies or caches. Each is
                # counted once; a hidden file named explicitly (or in a list file) is taken.
                skipped["hidden"] += 1
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False  # a looping or unreadable link; judged below by its suffix
            if is_dir:
                if is_store_dir(entry.path):
                    # a store kept beside the photos (`extract ~/Pictures --store
                    # ~/Pictures/pics.store`): `serve` caches thumbnails in it
                    skipped["store"] += 1
                else:
                    subdirs.append((entry.path, child, ancestors | {key}))
                continue
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
                skipped[skip_kind(entry.name)] += 1
                continue
            if entry.is_symlink():
                failure = _stat_failure(entry.path, root, child)
            elif entry.is_file(follow_symlinks=False):  # from the directory listing: no stat
                failure = None
            else:
                failure = ScanFailure(root, child, "not_a_file", _NOT_A_FILE)
            if failure is not None:
                problems.append(failure)
            else:
                results.append(FoundFile(root=root, path=child, abspath=entry.path))
        stack.extend(reversed(subdirs))  # depth-first in name order: the first alias wins

    results.sort(key=lambda f: f.path)
    found.extend(results)
    failures.extend(sorted(problems, key=lambda f: f.path))


def _read_list(path: str) -> list[str]:
    """Entries of a ``.txt`` or ``.csv`` list file, in file order."""
    try:
        # utf-8-sig: spreadsheet programs put a BOM in front of the first path.
        with open(path, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(
            f"cannot read list file {path!r} ({_describe(e)}); pass a readable UTF-8 file"
        ) from e
    if path.lower().endswith(".csv"):
        rows = [row for row in csv.reader(io.StringIO(text)) if row]
        column = 0
        if rows:
            header = [cell.strip().lower() for cell in rows[0]]
            if "path" in header:
                column = header.index("path")
                rows = rows[1:]
        entries = [row[column].strip() for row in rows if len(row) > column]
    else:
        # strip(): editors leave trailing blanks and CRLF line ends; a file name that truly
        # ends in a blank is rarer than either.
        entries = [line.strip() for line in text.splitlines()]
        entries = [e for e in entries if not e.startswith("#")]
    return [e for e in entries if e]
