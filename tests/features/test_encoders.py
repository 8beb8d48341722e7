"""Encoder registry: every architecture builds with its published size; weights load safely; offline
errors say what to fetch."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import GluMlp, SwiGLUPacked

from slidemil.errors import InputError
from slidemil.features.encoders import available_encoders, create_encoder, get_spec
from slidemil.features.encoders.foundation import LUNIT_MEAN, dino_teacher_to_timm, hf_dinov2_to_timm, hf_vit_to_timm

# parameters (millions) from the model cards
EXPECTED = {"resnet50_trunc": (1024, 8.5), "uni_v1": (1024, 303), "uni_v2": (1536, 681), "virchow2": (2560, 631),
            "hoptimus0": (1536, 1135), "hoptimus1": (1536, 1135), "gigapath": (1536, 1135), "phikon_v2": (1024, 303),
            "virchow": (2560, 631), "phikon": (768, 86), "gpfm": (1024, 303), "lunit_vits16": (384, 21.7),
            "lunit_vits8": (384, 21.7), "kaiko_vits16": (384, 21.7), "kaiko_vits8": (384, 21.7),
            "kaiko_vitb16": (768, 85.8), "kaiko_vitb8": (768, 85.8), "kaiko_vitl14": (1024, 304), "midnight": (3072, 1136)}


def test_required_encoders_are_registered():
    assert set(EXPECTED) | {"handcrafted"} <= set(available_encoders())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_architecture_size_and_output_dim(name):
    spec = get_spec(name)
    with torch.device("meta"):
        model = spec.builder()
        out = model(torch.empty(2, 3, spec.input_size, spec.input_size))
    dim, millions = EXPECTED[name]
    assert spec.dim == dim and tuple(out.shape) == (2, dim)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.01)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_random_weights_roundtrip(tmp_path, suffix):
    torch.manual_seed(0)
    spec = get_spec("resnet50_trunc")
    reference = spec.builder().eval()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    enc = create_encoder("resnet50_trunc", weights=path)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference((x - enc.mean) / enc.std)
        torch.testing.assert_close(enc(x), expected)
    assert enc.weights == str(path)


@pytest.mark.slow
def test_uni_v1_full_size_roundtrip(tmp_path):
    torch.manual_seed(0)
    spec = get_spec("uni_v1")
    reference = spec.builder().eval()
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    enc = create_encoder("uni_v1", weights=tmp_path / "pytorch_model.bin")
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), reference((x - enc.mean) / enc.std))


def _hf_layout(vit, kind: str) -> dict:
    """A timm ViT's weights under transformers' names (Dinov2Model, with SwiGLU where the ViT has it, or
    ViTModel), by the inverse mapping."""
    s = vit.state_dict()
    hf = {"embeddings.cls_token": s["cls_token"], "embeddings.position_embeddings": s["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
          "layernorm.weight": s["norm.weight"], "layernorm.bias": s["norm.bias"]}
    names = (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")) if kind == "dinov2" \
        else (("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
              ("output.dense", "mlp.fc2"))
    for i in range(len(vit.blocks)):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            qw, kw, vw = s[q + f"attn.qkv.{part}"].chunk(3)
            hf.update({p + f"attention.attention.query.{part}": qw, p + f"attention.attention.key.{part}": kw,
                       p + f"attention.attention.value.{part}": vw,
                       p + f"attention.output.dense.{part}": s[q + f"attn.proj.{part}"]})
            for hf_name, timm_name in names:
                hf[p + f"{hf_name}.{part}"] = s[q + f"{timm_name}.{part}"]
        if kind == "dinov2":
            hf[p + "layer_scale1.lambda1"], hf[p + "layer_scale2.lambda1"] = s[q + "ls1.gamma"], s[q + "ls2.gamma"]
        if kind == "dinov2" and isinstance(vit.blocks[i].mlp, GluMlp):   # Dinov2SwiGLUFFN's names
            for part in ("weight", "bias"):
                hf[p + f"mlp.weights_in.{part}"] = hf.pop(p + f"mlp.fc1.{part}")
                hf[p + f"mlp.weights_out.{part}"] = hf.pop(p + f"mlp.fc2.{part}")
    return hf


def test_swiglu_dinov2_keys_map_to_timm():
    """Midnight ships a transformers Dinov2Model with SwiGLU blocks (mlp.weights_in packs [x1; x2], SiLU(x1) * x2,
    as timm's SwiGLUPacked): a small such ViT round-trips, and the full ViT-g/14 loads from that layout."""
    from slidemil.features.encoders.registry import fit_state_dict

    torch.manual_seed(0)
    kw = {"init_values": 1e-5, "mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU, "mlp_ratio": 2.66667 * 2}
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kw).eval()
    hf = _hf_layout(vit, "dinov2")
    assert any(k.endswith("mlp.weights_in.weight") for k in hf) and not any(k.endswith("mlp.fc1.weight") for k in hf)
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kw).eval()
    fresh.load_state_dict(hf_dinov2_to_timm(hf))
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), vit(x))
    spec = get_spec("midnight")
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    with torch.device("meta"):
        model = spec.builder()
        fit_state_dict(model, spec, _hf_layout(model.vit, "dinov2"), "published")


@pytest.mark.parametrize("kind", ["dinov2", "vit"])
def test_hugging_face_keys_map_to_timm(kind):
    """Phikon-v2 ships a transformers Dinov2Model state dict, Phikon a ViTModel one (other names for the same
    weights, under a `vit.` prefix): built from a small timm ViT, the converted weights reproduce the model."""
    torch.manual_seed(0)
    extra = {"init_values": 1e-5} if kind == "dinov2" else {}
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **extra).eval()
    hf = _hf_layout(vit, kind)
    convert = hf_dinov2_to_timm if kind == "dinov2" else (lambda st: hf_vit_to_timm({f"vit.{k}": v for k, v in st.items()}))
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=0, **extra).eval()
    fresh.load_state_dict(convert(hf))
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), vit(x))


def test_dino_teacher_checkpoint_maps_to_timm():
    """GPFM's release is a DINOv2 training checkpoint: {"teacher": backbone.* with chunked blocks
    (blocks.<chunk>.<i>), dino_head.*, mask_token}."""
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    s = vit.state_dict()
    teacher = {f"backbone.{k.replace('blocks.', 'blocks.0.', 1) if k.startswith('blocks.') else k}": v
               for k, v in s.items()}
    teacher |= {"backbone.mask_token": torch.zeros(1, 192), "dino_head.mlp.0.weight": torch.zeros(4, 4)}
    converted = dino_teacher_to_timm(teacher)
    assert set(converted) == set(s) and all(torch.equal(converted[k], s[k]) for k in s)
    assert dino_teacher_to_timm(s) is s                        # already timm keys: untouched


def test_new_encoders_know_their_source_and_preprocessing():
    assert get_spec("lunit_vits8").mean == LUNIT_MEAN and get_spec("lunit_vits8").extra["url"].endswith(".torch")
    assert get_spec("gpfm").extra["url"].startswith("https://github.com/") and not get_spec("gpfm").gated
    assert get_spec("virchow").gated and get_spec("virchow").hub_id == "paige-ai/Virchow"
    kaiko = get_spec("kaiko_vitl14")
    assert kaiko.mean == kaiko.std == (0.5, 0.5, 0.5) and not kaiko.gated
    assert kaiko.hub_id == "1aurent/vit_large_patch14_reg4_dinov2.kaiko_ai_towards_large_pathology_fms"


def test_offline_without_weights_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIDEMIL_WEIGHTS", str(tmp_path))
    with pytest.raises(InputError) as err:
        create_encoder("uni_v1")
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "huggingface.co/MahmoodLab/UNI" in msg and "--weights" in msg
    assert str(tmp_path / "uni_v1" / "pytorch_model.bin") in msg and "gated" in msg
    with pytest.raises(InputError, match="does not exist"):
        create_encoder("uni_v1", weights=tmp_path / "nope.bin")


def test_weights_in_default_location_are_found(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIDEMIL_WEIGHTS", str(tmp_path))
    model = get_spec("resnet50_trunc").builder()
    (tmp_path / "resnet50_trunc").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "resnet50_trunc" / "model.safetensors"))
    assert create_encoder("resnet50_trunc").weights.endswith("model.safetensors")


def test_checkpoint_with_code_is_refused_and_wrong_file_is_named(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.bin")
    with pytest.raises(InputError, match="weights_only=True"):
        create_encoder("resnet50_trunc", weights=tmp_path / "evil.bin")
    torch.save({"foo": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="does not fit encoder resnet50_trunc"):
        create_encoder("resnet50_trunc", weights=tmp_path / "other.pth")


def test_any_timm_model_by_name():
    spec = get_spec("timm:resnet18")
    assert spec.dim == 512 and spec.input_size == 224
    with pytest.raises(InputError, match="timm has no model"):
        get_spec("timm:not_a_model_xyz")
    with pytest.raises(InputError, match="unknown encoder"):
        get_spec("nope")


def test_handcrafted_needs_no_weights():
    enc = create_encoder("handcrafted")
    out = enc(torch.rand(3, 3, 224, 224))
    assert out.shape == (3, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["uni_v2", "virchow2", "virchow", "hoptimus0", "hoptimus1", "gigapath", "gpfm",
                                  "lunit_vits16", "kaiko_vitl14"])
def test_published_key_layout_loads(name):
    """The billion-parameter encoders, on the meta device (no memory): a state dict in the publisher's
    layout (a plain timm ViT's keys) goes through the same conversion and strict key check as a file."""
    from slidemil.features.encoders.registry import fit_state_dict

    spec = get_spec(name)
    with torch.device("meta"):
        model = spec.builder()
        published = (model.vit if name.startswith("virchow") else model).state_dict()
        fit_state_dict(model, spec, published, "published")
        with pytest.raises(InputError, match="does not fit"):
            fit_state_dict(model, spec, {k: v for k, v in list(published.items())[:-3]}, "truncated")


# each model card's preprocessing, typed in from the cards (not from the registry): a foundation model fed
# other normalisation statistics still runs and gives worse features without an error
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CARD_NORMALISATION = {
    **dict.fromkeys(["uni_v1", "uni_v2", "virchow", "virchow2", "gigapath", "phikon", "phikon_v2", "gpfm",
                     "resnet50_trunc"], IMAGENET),
    **dict.fromkeys(["hoptimus0", "hoptimus1"], ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))),
    **dict.fromkeys(["lunit_vits16", "lunit_vits8"], ((0.70322989, 0.53606487, 0.66096631),
                                                      (0.21716536, 0.26081574, 0.20723464))),
    **dict.fromkeys(["kaiko_vits16", "kaiko_vits8", "kaiko_vitb16", "kaiko_vitb8", "kaiko_vitl14", "midnight"],
                    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
}


@pytest.mark.parametrize("name", sorted(CARD_NORMALISATION))
def test_input_normalisation_and_resolution_are_the_model_cards(name):
    spec = get_spec(name)
    mean, std = CARD_NORMALISATION[name]
    assert spec.mean == pytest.approx(mean, abs=1e-8) and spec.std == pytest.approx(std, abs=1e-8)
    assert spec.input_size == 224 and spec.mpp == 0.5            # every one of them: 224 px at 20x (0.5 µm/px)
    assert set(CARD_NORMALISATION) == set(EXPECTED)
