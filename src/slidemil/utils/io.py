"""Atomic writes and safe output paths.

Every finished output is written to a temporary name in the same folder and renamed into place, so a
crash never leaves a half-written file behind a name that a resume would trust.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slidemil.errors import InputError

# a file name on every OS, a path in the viewer's URLs and a literal in a glob: no separators, '#', '%', '?',
# quotes, '$', '*', brackets, or commas (`--slide-ids a,b` splits on them)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\- ()+=@~]*$")
# A file name may have 255 bytes; an id becomes `.<id><suffix>.tmp-<pid>` while written (suffixes such as
# `_heatmap_fold0.png` or `.geojson`, a pid of up to 7 digits): 200 leaves room for all of them
MAX_ID_BYTES = 200
SAFE_ID_RULE = ("letters, digits, spaces and . _ - ( ) + = @ ~ only, starting with a letter or digit, at most "
                "200 characters (no path separators, '..', commas, '#', '%', '?', quotes, '$', '*' or brackets)")


def is_safe_id(name: str) -> bool:
    """Whether an id can be a file name inside a folder (and a path in a viewer URL): SAFE_ID_RULE, and
    short enough that every file slidemil names after it (and its temporary name) fits the file system."""
    return (bool(name) and bool(_SAFE_ID.match(name)) and ".." not in name
            and len(name.encode("utf-8")) <= MAX_ID_BYTES)


def read_csv_text(path: str | os.PathLike, **kwargs):
    """A CSV as pandas reads it, except that only an empty cell is missing: "NA", "None", "null" and "nan"
    are the text they are (a patient or class of that name), not a missing value. Tab- and semicolon-
    separated tables (a GDC `.tsv`, a CSV saved by Excel in a comma-decimal locale) are read as such; an
    Excel workbook is one line saying to save it as CSV."""
    import pandas as pd

    kwargs.setdefault("sep", delimiter(path))
    return pd.read_csv(path, keep_default_na=False, na_values=[""], **kwargs)


def delimiter(path: str | os.PathLike) -> str:
    """The table's column separator: a tab for `.tsv`/`.tab`, else whichever of ',', tab and ';' the header
    line holds (in that order of preference)."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")) or path.suffix.lower() in (".xlsx", ".xls", ".xlsm"):
        raise InputError(f"{path} is an Excel workbook; save it as CSV (UTF-8) and pass that file")
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    header = head.split(b"\n", 1)[0]
    return next((sep for sep in (",", "\t", ";") if sep.encode() in header), ",")


def safe_child(folder: Path, name: str, suffix: str = "") -> Path:
    """`folder/name+suffix`, refusing ids that would escape `folder` (``..``, ``/``, absolute paths)."""
    if not is_safe_id(name):
        raise ValueError(f"slide id {name!r} cannot be used as a file name: use {SAFE_ID_RULE}.")
    path = Path(folder) / f"{name}{suffix}"
    if path.resolve().parent != Path(folder).resolve():
        raise ValueError(f"slide id {name!r} would write outside {folder}")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def ensure_writable(folder: str | os.PathLike, flag: str = "--out", create: bool = True) -> Path:
    """Prove a file can be written in `folder`, before any work is done; an InputError naming the folder
    otherwise. `create=False` (for a verb that still validates its inputs after this check) leaves the
    disk as it was: the probe goes into the nearest folder that exists, and nothing is made."""
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe_in = next(p for p in (folder, *folder.absolute().parents) if p.exists())
        if not probe_in.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory")
        probe = probe_in / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to {folder} ({exc.strerror or type(exc).__name__}); choose another "
                         f"{flag} or fix its permissions") from None
    return folder


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_text(obj) -> str:
    """`obj` as the JSON slidemil writes (indented; numpy scalars and paths as plain values)."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json_text(obj))


def write_csv(path: str | os.PathLike, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
