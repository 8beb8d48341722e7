"""One slide-reader interface over OpenSlide, tifffile and plain images, with physical resolution.

`open_slide(path)` reads tiled TIFF/SVS pyramids with standard codecs through tifffile + imagecodecs
(pixel-identical to OpenSlide on them and 1.5-2x faster per tile: see docs/benchmarks.md), everything
else through OpenSlide (ndpi, mrxs, scn, vms, bif, DICOM, and TIFFs in other codecs), with tifffile as
the fallback for flat TIFF / OME-TIFF that OpenSlide rejects, and Pillow for PNG/JPEG. Every reader
exposes level geometry, `mpp` (microns per level-0 pixel, or None) and `read_region` returning RGB.
`read_at(slide, x, y, size0, out)` reads a level-0 square at the best pyramid level and resizes the
rest of the way, which is how patches at a target mpp are read.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from slidemil.errors import InputError
from slidemil.utils.ids import match_ids

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".dcm", ".svslide",
                  ".ome.tif", ".ome.tiff"} | IMAGE_SUFFIXES


class SlideReadError(InputError):
    """A slide cannot be opened or read; the message names the file."""


class Slide:
    """Common interface. Subclasses set `path`, `level_dimensions`, `level_downsamples`, `mpp`, `backend`."""

    path: Path
    backend: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None

    @property
    def slide_id(self) -> str:
        return slide_id_of(self.path)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The highest-resolution level needed: the coarsest level whose downsample <= `downsample`."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 [height, width, 3]; (x, y) in level-0 pixels, size in `level` pixels."""
        raise NotImplementedError

    def read_image(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """The same region as a PIL image (the fast path when a resize follows)."""
        return Image.fromarray(self.read_region(x, y, level, width, height))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class OpenSlideReader(Slide):
    backend = "openslide"

    def __init__(self, path: Path):
        import openslide

        self.path = path
        self._slide = openslide.OpenSlide(str(path))
        self.level_dimensions = list(self._slide.level_dimensions)
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        mpp = self._slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        # a slide whose level-0 tiles cannot be decoded is found now, not halfway through extraction
        self._slide.read_region((0, 0), self.level_count - 1, (1, 1))

    def read_image(self, x, y, level, width, height):
        region = self._slide.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        if region.getextrema()[3][0] == 255:  # fully opaque: the common case, converted in C
            return region.convert("RGB")
        # transparent pixels (outside the scanned area) become white, as a scanner's background
        white = Image.new("RGBA", region.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, region).convert("RGB")

    def read_region(self, x, y, level, width, height):
        return np.asarray(self.read_image(x, y, level, width, height))

    def close(self):
        self._slide.close()


class TiffReader(Slide):
    """tifffile backend: pyramid from the first series' levels (or a flat image), mpp from OME
    PhysicalSizeX or the resolution tags."""

    backend = "tifffile"
    FAST_CODECS = {1, 5, 7, 8, 32946}  # none, LZW, JPEG, deflate: what imagecodecs decodes like OpenSlide

    def __init__(self, path: Path, strict: bool = False):
        import tifffile

        self.path = path
        self._tif = tifffile.TiffFile(str(path))
        series = self._tif.series[0]
        self._levels = list(series.levels)
        if len(self._levels) == 1:
            self._levels = self._pyramid_from_pages(series)
        shapes = [self._yx(lv) for lv in self._levels]
        self.level_dimensions = [(w, h) for h, w in shapes]
        self.level_downsamples = [shapes[0][1] / w for _, w in shapes]
        self.mpp = self._find_mpp()
        self._cache: dict[int, np.ndarray] = {}
        self._check_complete(path)
        if strict:
            first = self._levels[0].pages[0]
            if not (first.is_tiled and int(first.compression) in self.FAST_CODECS):
                self._tif.close()
                raise ValueError("not a tiled pyramid in a standard codec")

    def _check_complete(self, path: Path) -> None:
        """A truncated file still parses its first directory; its tile data runs past the end."""
        size = path.stat().st_size
        for level in self._levels:
            for page in level.pages:
                if page is None:
                    continue
                ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
                if len(ends) and (ends.max() > size or (np.asarray(page.databytecounts) == 0).any()):
                    raise ValueError("image data runs past the end of the file (truncated?)")

    def _pyramid_from_pages(self, series) -> list:
        """Files that keep their levels as plain top-level pages (no SubIFDs, no recognised layout):
        the tiled pages with level 0's aspect ratio, largest first."""
        h0, w0 = self._yx(series.levels[0])
        levels = [series.levels[0]]
        for other in self._tif.series[1:]:
            page = other.levels[0].pages[0] if other.levels[0].pages else None
            h, w = self._yx(other.levels[0])
            if page is not None and getattr(page, "is_tiled", False) and w < w0 and abs(w / h - w0 / h0) < 0.02:
                levels.append(other.levels[0])
        return sorted(levels, key=lambda lv: -self._yx(lv)[1])

    @staticmethod
    def _yx(level) -> tuple[int, int]:
        axes, shape = level.axes, level.shape
        return shape[axes.index("Y")], shape[axes.index("X")]

    def _find_mpp(self) -> float | None:
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            import re

            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            # OME's default unit is the micrometre; a file in nm (some converters write 250 for 0.25 µm) or
            # mm is converted, not read as µm
            factor = _OME_MICRONS.get(unit.group(1) if unit else "µm")
            if m and factor and 0.05 < float(m.group(1)) * factor < 100:
                return float(m.group(1)) * factor
        page = tif.pages[0]
        desc = page.description or ""
        if "MPP = " in desc:
            return float(desc.split("MPP = ")[1].split("|")[0].split()[0])
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            if num and den and unit in (2, 3):  # inch, centimetre
                per_unit = num / den
                microns = 25400.0 if unit == 2 else 10000.0
                mpp = microns / per_unit
                if 0.05 < mpp < 100:
                    return mpp
        return None

    def _level_array(self, level: int) -> np.ndarray:
        if level not in self._cache:
            arr = self._levels[level].asarray()
            axes = self._levels[level].axes
            if "S" in axes:
                arr = np.moveaxis(arr, axes.index("S"), -1)
            elif arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, -1)
            self._cache[level] = arr[..., :3]
        return self._cache[level]

    def read_region(self, x, y, level, width, height):
        ds = self.level_downsamples[level]
        lx, ly = int(round(x / ds)), int(round(y / ds))
        try:
            store = self._levels[level].pages[0]
            if store.is_tiled:
                return _read_tiled(store, self._tif.filehandle, lx, ly, width, height, self.level_dimensions[level])
        except (AttributeError, IndexError, TypeError):
            pass
        arr = self._level_array(level)
        out = np.full((height, width, 3), 255, np.uint8)
        h, w = arr.shape[:2]
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, w), min(ly + height, h)
        if x1 > x0 and y1 > y0:
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = arr[y0:y1, x0:x1]
        return out

    def close(self):
        self._tif.close()


# micrometres per unit of OME's PhysicalSizeXUnit (the units a slide's pixel size is written in)
_OME_MICRONS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6, "in": 25400.0}


def _read_tiled(page, fh, x, y, width, height, dims) -> np.ndarray:
    """Decode only the tiles of a tiled TIFF page that a region touches."""
    th, tw = page.tilelength, page.tilewidth
    w, h = dims
    out = np.full((height, width, 3), 255, np.uint8)
    tiles_across = (w + tw - 1) // tw
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, w), min(y + height, h)
    if x1 <= x0 or y1 <= y0:
        return out
    decode = page.decode
    for ty in range(y0 // th, (y1 - 1) // th + 1):
        for tx in range(x0 // tw, (x1 - 1) // tw + 1):
            index = ty * tiles_across + tx
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            fh.seek(offset)
            tile, _, _ = decode(fh.read(count), index, jpegtables=page.jpegtables)
            tile = np.asarray(tile).reshape(th, tw, -1)[..., :3]
            gx, gy = tx * tw, ty * th
            sx0, sy0 = max(x0, gx), max(y0, gy)
            sx1, sy1 = min(x1, gx + tw), min(y1, gy + th)
            out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - gy:sy1 - gy, sx0 - gx:sx1 - gx]
    return out


class ImageReader(Slide):
    """PNG/JPEG and other small images: one level, mpp from the file's DPI when it has one."""

    backend = "image"

    def __init__(self, path: Path):
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as im:
            self._img = np.asarray(im.convert("RGB"))
            dpi = im.info.get("dpi")
        self.path = path
        h, w = self._img.shape[:2]
        self.level_dimensions, self.level_downsamples = [(w, h)], [1.0]
        self.mpp = 25400.0 / float(dpi[0]) if dpi and dpi[0] and 100 < dpi[0] < 500000 and dpi[0] != 72 else None

    def read_region(self, x, y, level, width, height):
        out = np.full((height, width, 3), 255, np.uint8)
        h, w = self._img.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._img[y0:y1, x0:x1]
        return out


BACKENDS = {"openslide": OpenSlideReader, "tifffile": TiffReader, "image": ImageReader}
TIFF_FIRST = {".tif", ".tiff", ".svs"}


def open_slide(path: str | os.PathLike, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a slide; `mpp` overrides (or supplies) the level-0 resolution.

    Raises SlideReadError naming the file when no backend can read it.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideReadError(f"{path}: no such slide file")
    if backend != "auto":
        order = [(backend, {})]
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        order = [("image", {})]
    elif path.suffix.lower() in TIFF_FIRST:
        order = [("tifffile", {"strict": True}), ("openslide", {}), ("tifffile", {})]
    else:
        order = [("openslide", {}), ("tifffile", {})]
    errors = []
    for name, kwargs in order:
        try:
            slide = BACKENDS[name](path, **kwargs)
            break
        except Exception as exc:  # each library raises its own types for unreadable files
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    else:
        raise SlideReadError(f"{path}: cannot be read ({'; '.join(errors)}); the file may be truncated or "
                             "in a format none of OpenSlide, tifffile and Pillow understands")
    if mpp is not None:
        slide.mpp = float(mpp)
    return slide


def read_at(slide: Slide, x: int, y: int, size0: int, out_size: int) -> np.ndarray:
    """A level-0 square (x, y, size0) as an RGB array of `out_size`^2: read at the best pyramid level,
    then resized (area-averaging when shrinking) the rest of the way."""
    downsample = size0 / out_size
    level = slide.best_level_for_downsample(downsample)
    ds = slide.level_downsamples[level]
    side = max(1, int(round(size0 / ds)))
    if side == out_size:
        return slide.read_region(x, y, level, side, side)
    return np.asarray(read_scaled(slide, x, y, level, side, side, out_size, out_size,
                                  reducing_gap=None if side < out_size else 2.0))


# level pixels one read may hold (~200 MB as RGB): a slide without a pyramid is read for its thumbnail in
# blocks of at most this, each shrunk before the next (a 24k x 24k single-level slide peaked at 4.8 GB)
MAX_READ_PIXELS = 2**26


def read_scaled(slide: Slide, x: int, y: int, level: int, width: int, height: int, out_w: int, out_h: int,
                reducing_gap: float | None = None) -> Image.Image:
    """The region at (x, y) level 0, `width` x `height` pixels of `level`, resized to `out_w` x `out_h`.
    A region larger than MAX_READ_PIXELS is read and shrunk block by block, so memory stays bounded where
    the pyramid has no level near the output's resolution (a single-level slide's thumbnail)."""
    if width * height <= MAX_READ_PIXELS:
        image = slide.read_image(x, y, level, width, height)
        return image if image.size == (out_w, out_h) else image.resize((out_w, out_h), Image.BILINEAR,
                                                                         reducing_gap=reducing_gap)
    sx, sy, ds = width / out_w, height / out_h, slide.level_downsamples[level]
    if sx * sy > MAX_READ_PIXELS / 16:    # one output pixel spans more than a block: shrink in two steps
        f = (MAX_READ_PIXELS / 16) ** 0.5
        mid = read_scaled(slide, x, y, level, width, height, max(out_w, math.ceil(width / f)),
                          max(out_h, math.ceil(height / f)), reducing_gap)
        return mid.resize((out_w, out_h), Image.BILINEAR, reducing_gap=reducing_gap)
    block = max(1, int((MAX_READ_PIXELS / (sx * sy)) ** 0.5))    # output pixels per block side (>= 4)
    out = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    for r0 in range(0, out_h, block):
        r1 = min(r0 + block, out_h)
        ly0, ly1 = int(round(r0 * sy)), max(int(round(r0 * sy)) + 1, int(round(r1 * sy)))
        for c0 in range(0, out_w, block):
            c1 = min(c0 + block, out_w)
            lx0, lx1 = int(round(c0 * sx)), max(int(round(c0 * sx)) + 1, int(round(c1 * sx)))
            part = slide.read_image(int(x + lx0 * ds), int(y + ly0 * ds), level, lx1 - lx0, ly1 - ly0)
            out.paste(part.resize((c1 - c0, r1 - r0), Image.BILINEAR, reducing_gap=reducing_gap), (c0, r0))
    return out


def require_mpp(slide: Slide) -> float:
    if slide.mpp is None:
        raise SlideReadError(f"{slide.path}: the slide's metadata has no physical resolution (mpp); pass --mpp "
                             "for the whole batch or --mpp-csv with slide_id,mpp rows")
    return slide.mpp


def slide_id_of(path: Path) -> str:
    """A slide's id: its file name without the extension (`X.ome.tif` -> `X`); a DICOM slide's, whose
    pyramid levels are several `.dcm` files in one folder, is that folder's name."""
    path = Path(path)
    name = path.name
    if name.lower().endswith(".dcm"):
        return path.parent.name
    return name.split(".ome.")[0] if name.lower().endswith((".ome.tif", ".ome.tiff")) else path.stem


def list_slides(folder: str | os.PathLike) -> list[Path]:
    """Slide files in a folder and its subfolders: a gdc-client download puts each slide in a folder named by
    its file UUID (`<uuid>/<barcode>.<uuid>.svs`), and STAMP and Slideflow search nested folders too. Outputs
    are named by slide id, so an id must be unique across the tree. PNG/JPEG count as slides only in the
    folder itself (below it they are another tool's outputs or a scanner's companion images), and masks never
    (`_is_slide_name`). Hidden folders are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"slide folder {folder} does not exist")
    found, visited = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in visited:    # a symlinked folder met twice (or a link loop)
            dirs[:] = []
            continue
        visited.add(os.path.realpath(root))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        # PNG/JPEG are slides only in the folder itself, and never beside a Hamamatsu .vms/.vmu (its tiles)
        images = Path(root) == folder and not any(n.lower().endswith((".vms", ".vmu")) for n in files)
        names = [name for name in sorted(files) if _is_slide_name(name, images)]
        found += [Path(root) / name for name in names if not name.lower().endswith(".dcm")]
        dicom = [Path(root) / name for name in names if name.lower().endswith(".dcm")]
        if dicom:
            found.append(_dicom_slide(dicom))
    by_id: dict[str, list[str]] = {}
    for p in found:
        by_id.setdefault(slide_id_of(p), []).append(p.relative_to(folder).as_posix())
    clashes = {sid: names for sid, names in by_id.items() if len(names) > 1}
    if clashes:   # every output is named by the id: the second slide would be "complete" with the first's
        which = "; ".join(f"{' and '.join(names)} -> {sid!r}" for sid, names in sorted(clashes.items()))
        raise InputError(f"{folder}: slide files share an id ({which}); their outputs would be mixed. Keep one "
                         f"file per slide id: move or rename the others")
    nested = sum(p.parent != folder for p in found)
    if nested:
        log.info("%s: %d slide files, %d of them in subfolders", folder, len(found), nested)
    return found


def _dicom_slide(files: list[Path]) -> Path:
    """The file that stands for the DICOM slide in this folder (OpenSlide opens the whole series from any
    of its files: one per pyramid level, plus label and overview images). Files of two series in one folder
    would be two slides under one id: refused. A file OpenSlide cannot open is left out, said in the log."""
    import openslide

    series: dict[str, Path] = {}
    for path in files:
        try:
            with openslide.OpenSlide(str(path)) as slide:
                uid = slide.properties.get("dicom.SeriesInstanceUID", str(path))
        except openslide.OpenSlideError as exc:
            log.warning("%s: left out, not a whole-slide image OpenSlide reads (%s)", path, exc)
            continue
        series.setdefault(uid, path)
    if len(series) > 1:
        raise InputError(f"{files[0].parent} holds the DICOM files of {len(series)} slides (series); a DICOM slide is "
                         "one folder, named after its slide id: give each slide's files a folder of their own")
    return next(iter(series.values()), files[0])


def _is_slide_name(name: str, images: bool) -> bool:
    """A slide file by its name; PNG/JPEG only where `images` are slides. Masks (`<id>_mask.tif`, as
    CAMELYON ships its annotations, and the `_tissue`/`_tumour` PNGs beside synthetic slides) never are."""
    lower = name.lower()
    stem, suffix = os.path.splitext(lower)
    if lower.startswith(".") or stem.endswith("_mask"):
        return False
    if suffix in IMAGE_SUFFIXES:
        return images and not any(word in lower for word in ("_tissue", "_tumour", "_mask"))
    return suffix in SLIDE_SUFFIXES


def slide_files(folder: str | os.PathLike, ids=()) -> dict[str, Path]:
    """{slide id: file} of the slides in `folder`, plus each of `ids` (a run's, a label table's) that names
    no file itself but matches one file `<id>.<suffix>` (TCGA's `<barcode>.<UUID>.svs`: `utils.ids`)."""
    files = {slide_id_of(p): p for p in list_slides(folder)}
    found, _ = match_ids(ids, files)
    return {**files, **{sid: files[name] for sid, name in found.items()}}
