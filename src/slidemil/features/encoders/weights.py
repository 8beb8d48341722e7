"""Encoder weights on disk: where each encoder's file goes, whether it is there (and its sha256), and
`slidemil weights fetch NAME`, the one network call slidemil makes, only when asked.

A fetch first checks that the hub answers (3 s): offline, the error is one line with the file to get by
hand and where to put it, instead of a minute of retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from slidemil.errors import InputError
from slidemil.features.encoders import registry
from slidemil.features.encoders.registry import HUB, available_encoders, default_weights_path, get_spec, weights_help
from slidemil.utils.io import sha256_file


@dataclass
class WeightsStatus:
    name: str
    needs_weights: bool
    path: Path | None
    present: bool
    size: int = 0
    sha256: str | None = None
    source: str = ""


def weights_status(name: str, hash_files: bool = False) -> WeightsStatus:
    """Where `name`'s weights go and whether they are there (sha256 on request: multi-GB files take time)."""
    spec = get_spec(name)
    path = default_weights_path(spec)
    present = bool(path and path.is_file())
    source = (f"{HUB}/{spec.hub_id}" + (" (gated: request access there)" if spec.gated else "") if spec.hub_id
              else spec.extra.get("url", ""))     # a GitHub release (GPFM, Lunit)
    return WeightsStatus(name, spec.needs_weights, path, present, path.stat().st_size if present else 0,
                         sha256_file(path) if present and hash_files else None, source)


def all_status(hash_files: bool = False) -> list[WeightsStatus]:
    return [weights_status(n, hash_files) for n in available_encoders()]


def _download(url: str, target: Path, spec) -> Path:
    """A publisher's release file (Lunit, GPFM: GitHub releases) to `target`, through a temporary name."""
    import urllib.request

    from slidemil.utils.io import atomic_path

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                while chunk := response.read(1 << 20):
                    fh.write(chunk)
    except OSError as exc:
        raise InputError(f"encoder {spec.name}: downloading {url} failed ({exc}); {weights_help(spec)}") from None
    return target


def fetch(name: str) -> Path:
    """Download `name`'s weights file from the hub to its default location; the path. Every failure is one
    InputError saying what to do."""
    spec = get_spec(name)
    if not spec.needs_weights:
        raise InputError(f"encoder {name} has no weights to fetch")
    url = spec.extra.get("url")
    if not (spec.hub_id or url) or not spec.weights_file:
        raise InputError(f"encoder {name}: no hub file is known; {weights_help(spec)}")
    target = default_weights_path(spec)
    if target.is_file():
        return target
    if not registry.hub_reachable(url or HUB):
        raise InputError(f"cannot reach {urlparse(url or HUB).hostname} (offline?): {weights_help(spec)}")
    if url:
        return _download(url, target, spec)
    from huggingface_hub import hf_hub_download

    try:
        got = hf_hub_download(spec.hub_id, spec.weights_file, local_dir=target.parent)
    except Exception as exc:     # gated without a token, a moved repository, a dropped connection
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"encoder {name}: fetching {spec.weights_file} from {spec.hub_id} failed ({reason}); for a "
                         f"gated model request access on its page and set HF_TOKEN. {weights_help(spec)}") from None
    return Path(got)
