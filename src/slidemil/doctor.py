"""`slidemil doctor`: is this machine ready? Slide reading, encoders' weights, the GPU, disk space, and the
optional extras, each with what to do when it is not.

Every check is a `Check` (name, ok, detail, fix); the command exits 1 when a required one fails (slides
cannot be read, the output disk is nearly full), never for an optional one (no GPU, no weights yet).
"""

from __future__ import annotations

import importlib
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

MIN_FREE_GB = 5.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _openslide() -> Check:
    try:
        import openslide
    except Exception as exc:     # the binary wheel missing or a broken library: say which
        return Check("OpenSlide", False, f"{type(exc).__name__}: {exc}"[:160],
                     "pip install openslide-python openslide-bin")
    return Check("OpenSlide", True, f"openslide-python {openslide.__version__}, library {openslide.__library_version__}")


def _gpu() -> Check:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Check("GPU", True, f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB; "
                     f"torch {torch.__version__}, CUDA {torch.version.cuda}", required=False)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return Check("GPU", False, f"Apple MPS visible to torch {torch.__version__}, but slidemil does not use it yet "
                     "(no test runs there): training and extraction run on the CPU", required=False)
    return Check("GPU", False, f"none visible to torch {torch.__version__} (CPU only: training works, slower)",
                 "for NVIDIA GPUs install a CUDA build of torch (https://pytorch.org/get-started)", required=False)


def _disk(folder: Path) -> Check:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    return Check("disk", free >= MIN_FREE_GB, f"{free:.1f} GiB free under {probe}",
                 "free space or choose another --out (features of 1000 slides at 1024-d take ~10-40 GB)")


def _optional(module: str, what: str, extra: str) -> Check:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return Check(module, False, f"not installed ({what})", f"pip install {extra}", required=False)
    return Check(module, True, f"{getattr(mod, '__version__', '')} ({what})", required=False)


def _weights(hash_files: bool) -> list[Check]:
    from slidemil.features.encoders.weights import all_status

    out = []
    for s in all_status(hash_files):
        if not s.needs_weights:
            continue
        if s.present:
            detail = f"{s.path} ({s.size / 2**20:.0f} MB{', sha256 ' + s.sha256 if s.sha256 else ''})"
            out.append(Check(f"weights {s.name}", True, detail, required=False))
        else:
            out.append(Check(f"weights {s.name}", False, f"not at {s.path}",
                             f"slidemil weights fetch {s.name}" + (f"  (or download from {s.source})" if s.source else ""),
                             required=False))
    return out + _slide_weights(hash_files)


def _slide_weights(hash_files: bool) -> list[Check]:
    """The slide encoders' weights (files the user downloads by hand from the publisher's page)."""
    from slidemil.features.encoders.registry import default_weights_path
    from slidemil.features.slide_encoders import SLIDE_ENCODERS, available_slide_encoders
    from slidemil.utils.io import sha256_file

    out = []
    for name in available_slide_encoders():
        spec = SLIDE_ENCODERS.info(name).obj
        if not spec.needs_weights:
            continue
        path = default_weights_path(spec)
        if path.is_file():
            detail = f"{path} ({path.stat().st_size / 2**20:.0f} MB{', sha256 ' + sha256_file(path) if hash_files else ''})"
            out.append(Check(f"slide weights {name}", True, detail, required=False))
        else:
            out.append(Check(f"slide weights {name}", False, f"not at {path}",
                             f"download {spec.weights_file} from {spec.extra.get('url')} to {path}", required=False))
    return out


def run_checks(out: str | Path = ".", hash_files: bool = False) -> list[Check]:
    import torch

    checks = [Check("python", True, f"{platform.python_version()}, torch {torch.__version__}"), _openslide(), _gpu(),
              _disk(Path(out).expanduser().absolute())]
    checks += [_optional("optuna", "train --tune", "optuna"), _optional("umap", "robustness maps", "'slidemil[umap]'")]
    return checks + _weights(hash_files)
