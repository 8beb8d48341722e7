"""Feature files: read slidemil/TRIDENT h5 and CLAM `.pt`, write slidemil h5 atomically.

Layouts found under a feature folder, in the order they are tried for a slide id:
``<dir>/<id>.h5`` (slidemil, TRIDENT ``features_<enc>/``, CLAM ``h5_files`` pointed at directly),
``<dir>/h5_files/<id>.h5`` and ``<dir>/pt_files/<id>.pt`` (a CLAM ``feat_dir``), ``<dir>/<id>.pt``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from slidemil import __version__
from slidemil.errors import InputError
from slidemil.utils.ids import match_ids
from slidemil.utils.io import atomic_path, safe_child

_LAYOUTS = ("{id}.h5", "h5_files/{id}.h5", "pt_files/{id}.pt", "{id}.pt")


@dataclass
class FeatureBag:
    """The features of one slide. `coords` are level-0 (x, y) or None (CLAM `.pt`)."""

    features: np.ndarray
    coords: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def find_feature_file(feature_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """The feature file of `slide_id` under `feature_dir` (named after it, or the one `<id>.<suffix>` file:
    `utils.ids`), or None when there is none; ValueError for an unsafe or ambiguous id."""
    root = Path(feature_dir)
    safe_child(root, slide_id)  # refuses ids such as "../x" that would reach outside the folder
    for pattern in _LAYOUTS:
        path = root / pattern.format(id=slide_id)
        if path.is_file():
            return path
    paths, problems = locate_features(root, [slide_id])
    if slide_id in problems:
        raise ValueError(problems[slide_id])
    return paths.get(slide_id)


def feature_files(feature_dir: str | os.PathLike) -> dict[str, Path]:
    """{name without extension: path} of the feature files under `feature_dir`, in every layout (the first
    layout holding a name wins, as in `find_feature_file`)."""
    root, files = Path(feature_dir), {}
    for pattern in _LAYOUTS:
        folder, ext = (root / pattern).parent, Path(pattern).suffix
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name.endswith(ext) and not entry.name.startswith(".") and entry.is_file():
                    files.setdefault(entry.name[: -len(ext)], Path(entry.path))
    return files


def locate_features(feature_dir: str | os.PathLike, slide_ids,
                    files: dict[str, Path] | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """({id: feature file}, {id: why it has none}) for many ids at once, with one listing of the folder
    (`files`, when the caller has it already)."""
    files = feature_files(feature_dir) if files is None else files
    found, problems = match_ids(slide_ids, files)
    return {sid: files[name] for sid, name in found.items()}, problems


def check_compatible(meta: dict, attrs: dict, path: Path) -> None:
    """The features must come from the encoder and dimension the model was trained on (`meta`: a fold's
    model.json); InputError naming the file otherwise."""
    dim = attrs.get("embedding_dim")
    if dim is not None and int(dim) != int(meta["in_dim"]):
        raise InputError(f"{path}: features are {dim}-d but the model was trained on {meta['in_dim']}-d "
                         f"features ({meta.get('encoder', {}).get('encoder', 'unknown encoder')}); "
                         "extract them with the run's encoder")
    want, have = meta.get("encoder", {}).get("encoder"), attrs.get("encoder")
    if want and have and str(want) != str(have):
        raise InputError(f"{path}: features were made by encoder {have!r} but the model expects {want!r}; "
                         "extract them with the run's encoder")


# what must match between feature files for one model to read them alike, beyond the encoder and the
# dimension: (attribute, how it reads, whether two values differ)
_PROVENANCE = (("target_mpp", "a resolution of {} µm/px", lambda a, b: abs(float(a) / float(b) - 1) > 0.1),
               ("patch_size", "{} px patches", lambda a, b: int(a) != int(b)),
               ("encoder_sha256", "encoder weights of sha256 {:.12}", lambda a, b: str(a) != str(b)),
               ("stain_norm", "stain normalisation {}", lambda a, b: str(a) != str(b)))


def unlike_reference(reference: dict, attrs: dict[Path, dict], whose: str) -> list[str]:
    """One line per way feature files differ from `reference` (a run's training features, or most of a
    cohort's files): resolution, patch size, encoder weights, stain normalisation. A model still runs on
    them, on inputs unlike those it learnt from (a 40x cohort extracted without --target-mpp is another
    domain), so each difference is said; an attribute a side lacks (older or foreign files) is not compared."""
    out = []
    for key, reads, differs in _PROVENANCE:
        if reference.get(key) is None:
            continue
        odd = [p for p, a in attrs.items() if a.get(key) is not None and differs(a[key], reference[key])]
        if odd:
            out.append(f"{len(odd)} of {len(attrs)} feature files (e.g. {Path(odd[0]).name}) were made with "
                       f"{reads.format(attrs[odd[0]][key])}, {whose} with {reads.format(reference[key])}; a model "
                       "reads them as inputs unlike the others: extract every slide the same way")
    return out


def most_common_attrs(attrs: dict[Path, dict]) -> dict:
    """Each provenance attribute's most common value over the files (the reference of a cohort)."""
    common = {}
    for key, _, _ in _PROVENANCE:
        values = [str(a[key]) for a in attrs.values() if a.get(key) is not None]
        if values:
            common[key] = max(set(values), key=values.count)
    return common


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_attrs(path: str | os.PathLike) -> dict:
    """Attributes of a feature file (file-level and `coords`-level merged) without reading features."""
    path = Path(path)
    if path.suffix == ".pt":
        return {}
    with h5py.File(path, "r") as fh:
        attrs = {k: _decode(v) for k, v in fh.attrs.items()}
        if "coords" in fh:
            for k, v in fh["coords"].attrs.items():
                attrs.setdefault(k, _decode(v))
        if "features" in fh:
            attrs.setdefault("embedding_dim", int(fh["features"].shape[-1]))
    return attrs


def read_features(path: str | os.PathLike, keep_float16: bool = False) -> FeatureBag:
    """Read one feature file; raises ValueError naming the file when its content is unusable. Features
    come as float32, or as stored when `keep_float16` and the file holds float16 (half the memory)."""
    path = Path(path)
    if path.suffix == ".pt":
        # weights_only: a feature file is data, never code.
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError for code, others for garbage or truncation
            raise ValueError(f"{path}: not a tensor file (refused to unpickle: {type(exc).__name__}); "
                             "re-extract it, or convert it to h5") from None
        if isinstance(tensor, dict) and "features" in tensor:
            tensor = tensor["features"]
        feats = np.asarray(tensor.float().numpy() if torch.is_tensor(tensor) else tensor, np.float32)
        return FeatureBag(_check_2d(feats, path))
    with h5py.File(path, "r") as fh:
        if "features" not in fh:
            raise ValueError(f"{path}: no 'features' dataset (found: {', '.join(fh.keys()) or 'nothing'})")
        stored = fh["features"]
        feats = np.asarray(stored[()], dtype=np.float16 if keep_float16 and stored.dtype == np.float16 else np.float32)
        if feats.ndim == 3 and feats.shape[0] == 1:  # some tools store [1, N, D]
            feats = feats[0]
        coords = None
        if "coords" in fh:
            coords = np.asarray(fh["coords"][()], dtype=np.int64).reshape(-1, 2)
    bag = FeatureBag(_check_2d(feats, path), coords, read_attrs(path))
    if coords is not None and len(coords) != len(bag.features):
        raise ValueError(f"{path}: {len(coords)} coords but {len(bag.features)} feature rows")
    return bag


def check_feature_file(path: str | os.PathLike, chunk_rows: int = 65536) -> tuple[int | None, str | None]:
    """(embedding dimension, problem or None) of one feature file, read in chunks of rows so that any
    cohort is checked in bounded memory: a 2-D numeric non-empty `features` array, finite values, and
    `coords` of shape [N, 2] matching the rows."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            return read_features(path).dim, None
        with h5py.File(path, "r") as fh:
            if "features" not in fh:
                return None, f"no 'features' dataset (found: {', '.join(fh.keys()) or 'nothing'})"
            if (problem := _outside_storage(fh)) is not None:
                return None, problem
            ds = fh["features"]
            shape = ds.shape[1:] if len(ds.shape) == 3 and ds.shape[0] == 1 else ds.shape
            if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
                return None, f"features must be a non-empty [N, D] array, got shape {ds.shape}"
            if ds.dtype.kind not in "fiu":
                return None, f"features have dtype {ds.dtype}, not a number type"
            for start in range(0, shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                native = np.asarray(ds[0, rows] if len(ds.shape) == 3 else ds[rows])
                if not np.isfinite(native).all():
                    row = start + int(np.argwhere(~np.isfinite(native))[0, 0])
                    return int(shape[1]), f"features contain NaN or infinite values (first at row {row})"
                beyond = np.abs(native) > np.finfo(np.float32).max     # float64 values float32 cannot hold
                if beyond.any():
                    row = start + int(np.argwhere(beyond)[0, 0])
                    return int(shape[1]), (f"features exceed float32's range (|x| > 3.4e38, first at row {row}); "
                                           f"rescale them")
            if "coords" in fh:
                coords = fh["coords"]
                cshape = coords.shape
                if len(cshape) != 2 or cshape[1] != 2:
                    return int(shape[1]), f"coords must be [N, 2], got shape {cshape}"
                if cshape[0] != shape[0]:
                    return int(shape[1]), f"{cshape[0]} coords but {shape[0]} feature rows"
                if coords.dtype.kind not in "iuf":
                    return int(shape[1]), f"coords have dtype {coords.dtype}, not numbers (pixel x, y)"
                for start in range(0, cshape[0], chunk_rows):
                    block = np.asarray(coords[start:start + chunk_rows])
                    if block.dtype.kind == "f" and not np.isfinite(block).all():
                        row = start + int(np.argwhere(~np.isfinite(block))[0, 0])
                        return int(shape[1]), f"coords contain NaN or infinite values (first at row {row})"
            return int(shape[1]), None
    except ValueError as exc:
        return None, str(exc).removeprefix(f"{path}: ")
    except Exception as exc:  # truncated or foreign files raise many kinds
        return None, f"unreadable ({type(exc).__name__}: {exc})"


def _outside_storage(fh: h5py.File) -> str | None:
    """Datasets whose bytes live outside the file are refused: HDF5 external storage and virtual datasets can
    map any file on the machine (/etc/passwd, another patient's features) into `features`, and an external
    link points into another file."""
    for name in ("features", "coords"):
        if name not in fh:
            continue
        link = fh.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            return f"{name!r} is a link to {link.filename}; copy the data into the file itself"
        ds = fh[name]
        if isinstance(ds, h5py.Dataset) and ds.external:
            return f"{name!r} keeps its values in external file(s) {', '.join(str(e[0]) for e in ds.external)}; refused"
        if isinstance(ds, h5py.Dataset) and ds.is_virtual:
            return f"{name!r} is a virtual dataset mapping other files; refused (copy the data into the file)"
    return None


def _check_2d(feats: np.ndarray, path: Path, rows: int = 4096) -> np.ndarray:
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"{path}: features must be a non-empty [N, D] array, got shape {feats.shape}")
    # a block of rows at a time: a mask of the whole bag would be N x D bytes (40 MB at 40k x 1024)
    if not all(np.isfinite(feats[i:i + rows]).all() for i in range(0, len(feats), rows)):
        raise ValueError(f"{path}: features contain NaN or infinite values")
    return feats


def write_features(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray | None,
    attrs: dict | None = None,
    dtype: str = "float32",
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a slidemil feature h5 atomically, chunked so that one chunk is about 1 MiB.

    `extra` adds datasets beside `features` and `coords` (e.g. known `instance_labels` of synthetic data).
    """
    path = Path(path)
    features = np.asarray(features, dtype=np.dtype(dtype))
    n, d = features.shape
    rows = max(1, min(n, (1 << 20) // max(1, d * features.itemsize)))
    meta = {"slidemil_version": __version__, "embedding_dim": int(d)}
    meta.update(attrs or {})
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("features", data=features, chunks=(rows, d))
            if coords is not None:
                cds = fh.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
                for k, v in meta.items():
                    if v is not None:
                        cds.attrs[k] = v
            for k, v in meta.items():
                if v is not None:
                    fh.attrs[k] = v
            for k, v in (extra or {}).items():
                fh.create_dataset(k, data=v)
    return path
