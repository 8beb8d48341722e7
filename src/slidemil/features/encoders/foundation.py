"""Pathology foundation models and CNNs through timm, with their published architectures.

Each builder makes the architecture with random weights (no download); weights are loaded by the
registry from a local file or, when asked, from the hub. Architectures and normalisations follow the
published model cards: UNI (Chen et al., Nat. Med. 2024), UNI2-h, Virchow (Vorontsov et al., Nat. Med.
2024) and Virchow2 (Zimmermann et al. 2024), H-optimus-0/1 (Bioptimus), Prov-GigaPath (Xu et al., Nature
2024), Phikon (Filiot et al. 2023) and Phikon-v2 (2024), GPFM (Ma et al. 2024), Lunit's DINO ViT-S (Kang et
al., CVPR 2023), Kaiko's ViTs (Aben et al. 2024) and Midnight-12k (Karasikov et al. 2025), and ResNet-50
truncated after block 3 as in CLAM. Weights published in another layout
(Hugging Face transformers, a DINO training checkpoint) are mapped to timm's keys by `convert`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from slidemil.errors import InputError
from slidemil.features.encoders.registry import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
LUNIT_MEAN, LUNIT_STD = (0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464)
LUNIT_RELEASES = "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights"


def create_timm_model(name: str, **kwargs) -> nn.Module:
    """timm.create_model, with timm imported on first use: it pulls in torchvision, seconds of start-up
    that every `slidemil` command would pay otherwise."""
    import timm

    return timm.create_model(name, **kwargs)


class ResNet50Trunc(nn.Module):
    """timm `resnet50.tv_in1k` up to layer3, then global average pooling: 1024-d (CLAM)."""

    def __init__(self, pretrained: bool = False):
        super().__init__()
        self.net = create_timm_model("resnet50.tv_in1k", pretrained=pretrained, features_only=True, out_indices=(3,))

    def forward(self, x):
        return self.net(x)[-1].mean((2, 3))


class ClassAndMeanTokens(nn.Module):
    """Virchow2's embedding: class token concatenated with the mean of the patch tokens (registers skipped)."""

    def __init__(self, vit: nn.Module, n_prefix: int):
        super().__init__()
        self.vit, self.n_prefix = vit, n_prefix

    def forward(self, x):
        tokens = self.vit.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.n_prefix:].mean(1)], 1)


def _vit(arch: str, pretrained: bool = False, **kwargs) -> nn.Module:
    return create_timm_model(arch, pretrained=pretrained, num_classes=0, **kwargs)


def _swiglu():
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


# Hugging Face transformers names of a ViT block's weights -> timm's: Dinov2Model, then ViTModel
_HF_BLOCK = {"dinov2": (("attention.output.dense", "attn.proj"), ("norm1", "norm1"), ("norm2", "norm2"),
                        ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")),
             "vit": (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                     ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"))}


def _hf_to_timm(state: dict, kind: str) -> dict:
    """A transformers ViT-family state dict (`kind` "dinov2" or "vit") with timm's keys; timm keys pass."""
    state = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in state.items()}
    if not any(k.startswith("encoder.layer.") for k in state):
        return state
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    for i in range(depth):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        att = p + "attention.attention."
        for part in ("weight", "bias"):
            out[q + f"attn.qkv.{part}"] = torch.cat([state[att + f"{n}.{part}"] for n in ("query", "key", "value")])
            for a, b in _HF_BLOCK[kind]:
                if p + f"{a}.{part}" in state:             # a SwiGLU block has no mlp.fc1 / mlp.fc2
                    out[q + f"{b}.{part}"] = state[p + f"{a}.{part}"]
        if kind == "dinov2":
            out[q + "ls1.gamma"] = state[p + "layer_scale1.lambda1"]
            out[q + "ls2.gamma"] = state[p + "layer_scale2.lambda1"]
            if p + "mlp.weights_in.weight" in state:     # SwiGLU (ViT-g): transformers' packed [x1; x2] = timm's
                for part in ("weight", "bias"):
                    out[q + f"mlp.fc1.{part}"] = state[p + f"mlp.weights_in.{part}"]
                    out[q + f"mlp.fc2.{part}"] = state[p + f"mlp.weights_out.{part}"]
    return out


def hf_dinov2_to_timm(state: dict) -> dict:
    """Map a Hugging Face `Dinov2Model` state dict (Phikon-v2's format) to timm ViT keys."""
    return _hf_to_timm(state, "dinov2")


def hf_vit_to_timm(state: dict) -> dict:
    """Map a Hugging Face `ViTModel` state dict (Phikon's format) to timm ViT keys."""
    return _hf_to_timm(state, "vit")


def dino_teacher_to_timm(state: dict) -> dict:
    """A DINO/DINOv2 training checkpoint's teacher (GPFM's release): drop the `backbone.` prefix, the DINO
    head and the mask token, and un-chunk `blocks.<chunk>.<i>` into `blocks.<i>`."""
    import re

    if not any(k.startswith("backbone.") for k in state):
        return state
    out = {}
    for key, value in state.items():
        if not key.startswith("backbone.") or key == "backbone.mask_token":
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)", r"blocks.\1", key[len("backbone."):])] = value
    return out


def _spec(name, dim, builder, **kw):
    return register_encoder(EncoderSpec(name=name, dim=dim, builder=builder, **kw))


_spec("resnet50_trunc", 1024, ResNet50Trunc, hub_id="timm/resnet50.tv_in1k", weights_file="model.safetensors",
      input_size=224, mpp=0.5, reference="He et al. 2016; truncated as in CLAM (Lu et al. 2021)",
      extra={"from_hub": functools.partial(ResNet50Trunc, pretrained=True)})
_spec("uni_v1", 1024, functools.partial(_vit, "vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                                        dynamic_img_size=True),
      hub_id="MahmoodLab/UNI", weights_file="pytorch_model.bin", gated=True, reference="Chen et al., Nat. Med. 2024",
      extra={"from_hub": functools.partial(_vit, "hf-hub:MahmoodLab/uni", pretrained=True, init_values=1e-5,
                                           dynamic_img_size=True)})
_uni2 = dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
             mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8, dynamic_img_size=True)
_spec("uni_v2", 1536, lambda: _vit("vit_giant_patch14_224", **_uni2, **_swiglu()), hub_id="MahmoodLab/UNI2-h",
      weights_file="pytorch_model.bin", gated=True, reference="Chen et al., Nat. Med. 2024 (UNI2-h)",
      extra={"from_hub": lambda: _vit("hf-hub:MahmoodLab/UNI2-h", pretrained=True, **_uni2, **_swiglu())})
_virchow2 = dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, reg_tokens=4)
_spec("virchow2", 2560, lambda: ClassAndMeanTokens(_vit("vit_huge_patch14_224", **_virchow2, **_swiglu()), 5),
      hub_id="paige-ai/Virchow2", weights_file="pytorch_model.bin", gated=True,
      convert=lambda s: {f"vit.{k}": v for k, v in s.items()},
      reference="Zimmermann et al. 2024 (Virchow2); embedding = [class token, mean patch token]",
      extra={"from_hub": lambda: ClassAndMeanTokens(_vit("hf-hub:paige-ai/Virchow2", pretrained=True, **_virchow2,
                                                         **_swiglu()), 5)})
for _name, _hub in (("hoptimus0", "bioptimus/H-optimus-0"), ("hoptimus1", "bioptimus/H-optimus-1")):
    _spec(_name, 1536, functools.partial(_vit, "vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5,
                                         dynamic_img_size=False),
          hub_id=_hub, weights_file="pytorch_model.bin", gated=_name == "hoptimus1", mean=HOPTIMUS_MEAN,
          std=HOPTIMUS_STD, reference="Bioptimus H-optimus (ViT-g/14, 4 registers)",
          extra={"from_hub": functools.partial(_vit, f"hf-hub:{_hub}", pretrained=True, init_values=1e-5,
                                               dynamic_img_size=False)})
_giga = dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
             mlp_ratio=5.33334)
_spec("gigapath", 1536, functools.partial(_vit, "vit_giant_patch14_dinov2", **_giga), hub_id="prov-gigapath/prov-gigapath",
      weights_file="pytorch_model.bin", gated=True, reference="Xu et al., Nature 2024 (Prov-GigaPath tile encoder)",
      extra={"from_hub": functools.partial(_vit, "hf-hub:prov-gigapath/prov-gigapath", pretrained=True)})
_spec("phikon_v2", 1024, functools.partial(_vit, "vit_large_patch16_224", img_size=224, init_values=1e-5,
                                           dynamic_img_size=True),
      hub_id="owkin/phikon-v2", weights_file="model.safetensors", convert=hf_dinov2_to_timm,
      reference="Filiot et al. 2024 (Phikon-v2, DINOv2 ViT-L/16); Hugging Face Dinov2 keys are mapped to timm's")


_virchow = dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True)
_spec("virchow", 2560, lambda: ClassAndMeanTokens(_vit("vit_huge_patch14_224", **_virchow, **_swiglu()), 1),
      hub_id="paige-ai/Virchow", weights_file="pytorch_model.bin", gated=True,
      convert=lambda s: {f"vit.{k}": v for k, v in s.items()},
      reference="Vorontsov et al., Nat. Med. 2024 (Virchow); embedding = [class token, mean patch token]",
      extra={"from_hub": lambda: ClassAndMeanTokens(_vit("hf-hub:paige-ai/Virchow", pretrained=True, **_virchow,
                                                         **_swiglu()), 1)})
_spec("phikon", 768, functools.partial(_vit, "vit_base_patch16_224", img_size=224, dynamic_img_size=True),
      hub_id="owkin/phikon", weights_file="model.safetensors", convert=hf_vit_to_timm,
      reference="Filiot et al. 2023 (Phikon, iBOT ViT-B/16); Hugging Face ViT keys are mapped to timm's")
_spec("gpfm", 1024, functools.partial(_vit, "vit_large_patch14_dinov2", img_size=224, patch_size=14, init_values=1e-5,
                                      dynamic_img_size=True),
      weights_file="GPFM.pth", convert=dino_teacher_to_timm,
      reference="Ma et al. 2024 (GPFM, arXiv 2407.18449; ViT-L/14 distilled); the release's DINO teacher is mapped",
      extra={"url": "https://github.com/birkhoffkiki/GPFM/releases/download/ckpt/GPFM.pth"})
for _name, _arch, _file in (("lunit_vits16", "vit_small_patch16_224", "dino_vit_small_patch16_ep200.torch"),
                            ("lunit_vits8", "vit_small_patch8_224", "dino_vit_small_patch8_ep200.torch")):
    _spec(_name, 384, functools.partial(_vit, _arch, img_size=224, dynamic_img_size=True), weights_file=_file,
          mean=LUNIT_MEAN, std=LUNIT_STD, reference="Kang et al., CVPR 2023 (Lunit DINO ViT-S, benchmark-ssl-pathology)",
          extra={"url": f"{LUNIT_RELEASES}/{_file}"})


# Kaiko (Aben et al. 2024, "Towards large-scale training of pathology foundation models"): DINO/DINOv2 ViTs whose
# timm ports are on the hub (as TRIDENT loads them); input normalised with mean = std = 0.5, embedding = class token
KAIKO_MEAN = KAIKO_STD = (0.5, 0.5, 0.5)
for _name, _arch, _dim, _kw in (("kaiko_vits16", "vit_small_patch16_224", 384, {}),
                                ("kaiko_vits8", "vit_small_patch8_224", 384, {}),
                                ("kaiko_vitb16", "vit_base_patch16_224", 768, {}),
                                ("kaiko_vitb8", "vit_base_patch8_224", 768, {}),
                                ("kaiko_vitl14", "vit_large_patch14_reg4_dinov2", 1024, {"img_size": 518})):
    _hub = f"1aurent/{_arch}.kaiko_ai_towards_large_pathology_fms"
    _spec(_name, _dim, functools.partial(_vit, _arch, dynamic_img_size=True, **_kw), hub_id=_hub,
          weights_file="model.safetensors", mean=KAIKO_MEAN, std=KAIKO_STD,
          reference="Aben et al. 2024 (Kaiko; timm port 1aurent/*.kaiko_ai_towards_large_pathology_fms)",
          extra={"from_hub": functools.partial(_vit, f"hf-hub:{_hub}", pretrained=True, dynamic_img_size=True, **_kw)})
# Midnight-12k (Karasikov et al. 2025, kaiko-ai/midnight): DINOv2 ViT-g/14 (SwiGLU) in transformers' Dinov2Model
# layout; embedding = [class token, mean patch token] (3072), input normalised with mean = std = 0.5
_midnight = dict(img_size=518, init_values=1e-5, global_pool="", dynamic_img_size=True)
_spec("midnight", 3072, lambda: ClassAndMeanTokens(_vit("vit_giant_patch14_dinov2", **_midnight), 1),
      hub_id="kaiko-ai/midnight", weights_file="model.safetensors", mean=KAIKO_MEAN, std=KAIKO_STD,
      convert=lambda s: {f"vit.{k}": v for k, v in hf_dinov2_to_timm(s).items()},
      reference="Karasikov et al. 2025 (Midnight-12k, ViT-g/14); embedding = [class token, mean patch token]")


def timm_spec(model_name: str) -> EncoderSpec:
    """`timm:<name>`: any timm model as a pooled feature extractor; weights from --weights or the hub."""
    def build(pretrained: bool = False):
        return create_timm_model(model_name, pretrained=pretrained, num_classes=0)

    try:
        probe = create_timm_model(model_name, pretrained=False, num_classes=0)
    except Exception as exc:
        raise InputError(f"timm has no model {model_name!r} ({exc})") from None
    cfg = probe.pretrained_cfg or {}
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    return EncoderSpec(name=f"timm:{model_name}", dim=int(probe.num_features), builder=build, input_size=size,
                       mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                       hub_id=cfg.get("hf_hub_id"), weights_file="model.safetensors",
                       reference=f"timm model {model_name}",
                       extra={"from_hub": functools.partial(build, pretrained=True)})


ENCODERS.add_resolver("timm:", timm_spec)
