"""Encoder registry: name -> builder, embedding dim, input size, normalisation, default mpp, weights.

Weights come from `--weights PATH` (safetensors, .bin, .pth; loaded with weights_only=True), from the
default location `$SLIDEMIL_WEIGHTS/<name>/<file>` (`~/.cache/slidemil/weights` when unset), or,
only when the user asks with `download=True`, from the hub. Offline without weights, the error says
which file to get, from where, and where to put it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from slidemil.errors import InputError
from slidemil.utils.registry import Registry

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HUB = os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(address: str = HUB, timeout: float = 3.0) -> bool:
    """Whether `address`'s host answers within `timeout` s: asked before any download, so that offline is
    one line at once instead of the hub client's minute of retries."""
    url = urlparse(address)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    dim: int
    builder: Callable[[], nn.Module]          # architecture with random weights
    input_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    mpp: float = 0.5                          # the resolution the encoder was trained at
    patch_size: int = 256
    hub_id: str | None = None                 # where the weights live (Hugging Face), for the message
    weights_file: str | None = None           # the file to download
    gated: bool = False
    needs_weights: bool = True
    convert: Callable[[dict], dict] | None = None   # maps a published state dict to the builder's keys
    reference: str = ""
    extra: dict = field(default_factory=dict)


# name -> EncoderSpec; `timm:<model>` is resolved on demand (registered by the foundation module)
ENCODERS = Registry("encoder")


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Add an encoder: one `EncoderSpec` is all a new encoder needs."""
    return ENCODERS.register(spec.name, spec)


def available_encoders() -> list[str]:
    return ENCODERS.available()


def get_spec(name: str) -> EncoderSpec:
    """The spec of a registered encoder or of `timm:<any timm model name>`."""
    return ENCODERS.info(name).obj


def weights_home() -> Path:
    return Path(os.environ.get("SLIDEMIL_WEIGHTS", Path.home() / ".cache" / "slidemil" / "weights"))


def default_weights_path(spec: EncoderSpec) -> Path | None:
    return weights_home() / spec.name.replace(":", "_").replace("/", "_") / spec.weights_file if spec.weights_file else None


def read_state_dict(path: Path) -> dict:
    """A state dict from safetensors or a pickle checkpoint, never executing code from the file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{path}: cannot be loaded as weights ({type(exc).__name__}: {exc}); slidemil loads "
                             "checkpoints with weights_only=True and never runs code from them") from exc
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds no state dict")
    for prefix in ("module.", "backbone.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, spec: EncoderSpec, path: Path) -> None:
    fit_state_dict(model, spec, read_state_dict(path), str(path))


def fit_state_dict(model: nn.Module, spec: EncoderSpec, state: dict, source: str) -> None:
    """Load a state dict in the publisher's format (converted by `spec.convert`), all keys or an error."""
    if spec.convert is not None:
        state = spec.convert(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{source}: does not fit encoder {spec.name} ({len(missing)} missing keys, e.g. "
                         f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); is it the right file?")


def weights_help(spec: EncoderSpec) -> str:
    where = default_weights_path(spec)
    src = spec.extra.get("url") or (f"https://huggingface.co/{spec.hub_id}" if spec.hub_id else "the model's publisher")
    gated = " (gated: request access on that page first)" if spec.gated else ""
    fetchable = (spec.extra.get("url") or spec.hub_id) and not spec.extra.get("manual")   # manual: a web page
    fetch = f"`slidemil weights fetch {spec.name}`" if fetchable else ""
    kind = spec.extra.get("kind", "encoder")
    return (f"{kind} {spec.name} needs its weights: download {spec.weights_file or 'the weights file'} from {src}"
            f"{gated}, then pass --weights /path/to/{spec.weights_file or 'file'}" +
            (f" or put it at {where}" if where else "") + (f", or run {fetch} (network)" if fetch else "") + ".")


class Encoder(nn.Module):
    """A backbone plus what extraction needs to feed it: input size and normalisation."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, weights: str | None):
        super().__init__()
        self.spec, self.backbone, self.weights = spec, backbone, weights
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [B, 3, S, S] in [0, 1] at the encoder's input size -> [B, dim]."""
        return self.backbone((images - self.mean) / self.std)


def create_encoder(name: str, weights: str | os.PathLike | None = None, download: bool = False) -> Encoder:
    """A patch encoder ready for extraction: backbone with weights, input size and normalisation.

    Args:
        name: a registered encoder (`available_encoders()`, e.g. "uni_v1", "handcrafted") or
            "timm:<any timm model name>".
        weights: a local weights file (.safetensors, .bin, .pth; loaded with weights_only=True). Without
            it, `$SLIDEMIL_WEIGHTS/<name>/<file>` is used when present.
        download: fetch the weights from the hub when no local file exists (network; gated models need
            access granted on their hub page).

    Returns an `Encoder` mapping float images [B, 3, S, S] in [0, 1] (S = `encoder.spec.input_size`)
    to [B, encoder.spec.dim] features. Without weights and without `download`, the error names the
    file to get, where from, and where to put it.

    Example:
        >>> import torch
        >>> from slidemil.features.encoders import create_encoder
        >>> enc = create_encoder("handcrafted")
        >>> tuple(enc(torch.rand(2, 3, enc.spec.input_size, enc.spec.input_size)).shape) == (2, enc.spec.dim)
        True
    """
    spec = get_spec(name)
    if not spec.needs_weights:
        return Encoder(spec, spec.builder().eval(), None)
    path = Path(weights) if weights else default_weights_path(spec)
    if path is not None and path.exists():
        backbone = spec.builder()
        load_weights(backbone, spec, path)
        return Encoder(spec, backbone.eval(), str(path))
    if weights:
        raise InputError(f"weights file {weights} does not exist. {weights_help(spec)}")
    if download and spec.hub_id:
        if not hub_reachable():          # offline: one line now, not a minute of the hub client's retries
            raise InputError(f"encoder {spec.name}: --download cannot reach {HUB} (offline?). {weights_help(spec)}")
        try:
            backbone = spec.extra["from_hub"]() if "from_hub" in spec.extra else spec.builder(pretrained=True)
        except Exception as exc:   # offline, a gated model without a token, a moved repository: many kinds
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise InputError(f"encoder {spec.name}: --download from the hub ({spec.hub_id}) failed ({type(exc).__name__}: "
                             f"{reason}). Check the network and, for a gated model, that access was granted and "
                             f"HF_TOKEN is set; or fetch the file by hand: {weights_help(spec)}") from exc
        return Encoder(spec, backbone.eval(), f"hf-hub:{spec.hub_id}")
    raise InputError(weights_help(spec))
