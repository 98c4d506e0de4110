"""Encoders: the offline EfficientNet-Lite0 default on real tiles, tiny open_clip/transformers models, errors.

Never the network: conftest sets HF_HUB_OFFLINE, and the one test that goes past the local cache has
its hub probe replaced by a failing stub.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_DATA

from rsprune_data.encoders import DEFAULT_ENCODER, Encoder, available_families, load_encoder
from rsprune_data.encoders._base import ImageTransform
from rsprune_data.errors import ConfigError, EncoderLoadError
from rsprune_data.images import decode_rgb

AIRPLANE_CLASSES = (404, 895, 908)  # ImageNet airliner, warplane, wing
UCM = SAMPLE_DATA / "ucmerced"


def _rgb(path: Path) -> np.ndarray:
    return decode_rgb(path.read_bytes(), path.suffix[1:])


def _sample_rgbs(n: int = 4) -> list[np.ndarray]:
    classes = sorted(p for p in UCM.iterdir() if p.is_dir())
    return [_rgb(sorted(c.glob("*.jpg"))[0]) for c in classes[:n]]


def check_encoder(enc: Encoder, rgbs: list[np.ndarray]) -> np.ndarray:
    """The Encoder contract: shapes, dtype, unit rows, deterministic, a row independent of its batch."""
    assert isinstance(enc, Encoder)
    x = torch.stack([enc.preprocess(r) for r in rgbs])
    assert x.dtype == torch.float32 and tuple(x.shape) == (
        len(rgbs),
        3,
        enc.image_size,
        enc.image_size,
    )
    emb = enc.encode(x)
    assert emb.dtype == np.float32 and emb.shape == (len(rgbs), enc.dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(enc.encode(x), emb)
    single = np.concatenate([enc.encode(x[i : i + 1]) for i in range(len(rgbs))])
    np.testing.assert_allclose(single, emb, atol=2e-5)
    assert enc.encode(x[:0]).shape == (0, enc.dim)
    return emb


# ----------------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def effnet():
    return load_encoder(DEFAULT_ENCODER, device="cpu")


def test_efficientnet_contract(effnet) -> None:
    assert (effnet.name, effnet.spec, effnet.dim, effnet.image_size) == (
        "efficientnet-lite0",
    ) * 2 + (1280, 224)
    assert effnet.device == torch.device("cpu")
    check_encoder(effnet, _sample_rgbs())


def test_efficientnet_recognises_real_airplanes(effnet) -> None:
    """Guards the position-by-position weight mapping and the TF-Lite preprocessing (mean = std = 0.5).

    On all 100 UC Merced airplane tiles, 60% have airliner/warplane/wing in the ImageNet top 5; a wrong
    mapping gives ~0%, ImageNet mean/std ~33%.
    """
    files = sorted((UCM / "airplane").glob("*.jpg"))
    assert len(files) >= 5
    logits = effnet.classify(torch.stack([effnet.preprocess(_rgb(f)) for f in files[:5]]))
    assert logits.shape == (5, 1000)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    hits = np.isin(top5, AIRPLANE_CLASSES).any(axis=1)
    assert hits.sum() >= 3, f"top-5 classes {top5.tolist()}"


def test_efficientnet_weights_loaded_by_position(effnet) -> None:
    from rsprune_data.encoders.efficientnet import weights_path

    source = torch.load(weights_path(), weights_only=True, map_location="cpu")
    target = effnet.module.state_dict()
    assert len(source) == len(target) == 296
    for (src_key, a), (dst_key, b) in zip(source.items(), target.items(), strict=True):
        assert torch.equal(a, b.contiguous()), (src_key, dst_key)


def test_efficientnet_size_is_part_of_the_id() -> None:
    enc = load_encoder("efficientnet-lite0@128px", device="cpu")
    assert (enc.name, enc.spec, enc.image_size, enc.dim) == ("efficientnet-lite0@128px",) * 2 + (
        128,
        1280,
    )
    with pytest.raises(ConfigError, match="128px"):
        load_encoder("efficientnet-lite0@128px", image_size=96)
    with pytest.raises(ConfigError, match="checkpoint"):
        load_encoder(DEFAULT_ENCODER, checkpoint="weights.pth")


# ------------------------------------------------------------------------------------------ preprocess


def test_transform_shapes_values_and_pickling() -> None:
    t = ImageTransform(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        t(rgb).numpy(), rgb.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6
    )  # no resampling
    assert t(np.zeros((20, 10, 3), np.uint8)).shape == (3, 8, 8)  # shorter side + centre crop
    squash = ImageTransform(
        size=8, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bicubic", resize_mode="squash"
    )
    flat = squash(np.full((13, 30, 3), 200, np.uint8))
    np.testing.assert_allclose(flat.numpy(), 200 / 255, atol=1e-5)
    assert pickle.loads(pickle.dumps(t)) == t  # DataLoader workers receive it, never the model
    with pytest.raises(ConfigError, match="HxWx3 uint8"):
        t(np.zeros((8, 8), np.uint8))
    with pytest.raises(ConfigError, match="resize_mode"):
        ImageTransform(size=8, mean=(0, 0, 0), std=(1, 1, 1), resize_mode="pad")


# ------------------------------------------------------------------------------------------- open_clip

TINY_CLIP = "rsprune-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised 2-layer open_clip model registered under TINY_CLIP, saved as a .pt file."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP).eval()
    path = folder / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_open_clip_checkpoint_file(tiny_clip) -> None:
    model, path = tiny_clip
    enc = load_encoder(f"open_clip:{TINY_CLIP}", checkpoint=str(path), device="cpu")
    assert enc.dim == 16 and enc.image_size == 32
    assert enc.name.startswith(f"open_clip:{TINY_CLIP}@") and enc.spec == f"open_clip:{TINY_CLIP}"
    assert enc.preprocess.mean[0] == pytest.approx(0.48145466)  # OpenAI CLIP statistics
    rgbs = _sample_rgbs()
    emb = check_encoder(enc, rgbs)
    with torch.no_grad():
        ref = model.encode_image(torch.stack([enc.preprocess(r) for r in rgbs]), normalize=True)
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-5)


def test_open_clip_name_follows_the_weights(tiny_clip, tmp_path) -> None:
    model, path = tiny_clip
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(other, tmp_path / "other.pt")
    a = load_encoder(f"open_clip:{TINY_CLIP}", checkpoint=str(path), device="cpu")
    b = load_encoder(f"open_clip:{TINY_CLIP}", checkpoint=str(tmp_path / "other.pt"), device="cpu")
    assert a.name != b.name


def test_open_clip_errors(tiny_clip, tmp_path) -> None:
    with pytest.raises(ConfigError, match="needs `checkpoint`"):
        load_encoder(f"open_clip:{TINY_CLIP}")
    with pytest.raises(EncoderLoadError, match="does not exist"):
        load_encoder(f"open_clip:{TINY_CLIP}", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="list_models"):
        load_encoder("open_clip:No-Such-Arch", checkpoint=str(tiny_clip[1]))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderLoadError, match="cannot load"):
        load_encoder(f"open_clip:{TINY_CLIP}", checkpoint=str(tmp_path / "garbage.pt"))


def test_open_clip_tag_without_network_fails_fast() -> None:
    t0 = time.monotonic()
    with pytest.raises(EncoderLoadError, match="--checkpoint"):
        load_encoder("open_clip:ViT-B-32", checkpoint="laion2b_s34b_b79k")
    assert time.monotonic() - t0 < 10


# ----------------------------------------------------------------------------------------- transformers


def _tiny_vision(**kw) -> dict:
    return dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        **kw,
    )


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    """A full (text + image) randomly initialised SigLIP saved like Git-RSCLIP: model + image processor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    folder = tmp_path_factory.mktemp("siglip") / "tiny-siglip"
    text = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=_tiny_vision())).eval()
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model, folder


def test_hf_siglip_loads_only_the_image_tower(tiny_siglip) -> None:
    model, folder = tiny_siglip
    enc = load_encoder(f"hf:{folder}", device="cpu")
    assert type(enc.module).__name__ == "SiglipVisionModel"
    assert enc.name.startswith("hf:tiny-siglip@") and enc.spec == f"hf:{folder}"
    assert (enc.dim, enc.image_size) == (16, 32)
    rgbs = _sample_rgbs()
    emb = check_encoder(enc, rgbs)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.stack([enc.preprocess(r) for r in rgbs]))
    ref = out if isinstance(out, torch.Tensor) else out.pooler_output
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(ref, dim=1).numpy(), atol=1e-5)


def test_hf_preprocess_matches_the_saved_image_processor(tiny_siglip) -> None:
    from transformers import SiglipImageProcessor

    _, folder = tiny_siglip
    enc = load_encoder(f"hf:{folder}", device="cpu")
    proc = SiglipImageProcessor.from_pretrained(folder)
    for rgb in _sample_rgbs(3):
        theirs = proc(images=[rgb], return_tensors="pt")["pixel_values"][0]
        diff = (theirs - enc.preprocess(rgb)).abs()
        assert (
            diff.mean() < 0.01 and diff.max() < 0.1
        )  # PIL rounds to uint8 after resizing, we do not


def test_hf_clip_vision_model_with_crop(tmp_path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**_tiny_vision())).eval()
    model.save_pretrained(tmp_path)
    CLIPImageProcessor(
        size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path)
    enc = load_encoder(f"hf:{tmp_path}", device="cpu")
    t = enc.preprocess
    assert (t.size, t.resize_to, t.resize_mode, t.interpolation) == (32, 36, "shortest", "bicubic")
    rgbs = _sample_rgbs()
    emb = check_encoder(enc, rgbs)
    with torch.no_grad():
        ref = model(pixel_values=torch.stack([t(r) for r in rgbs])).pooler_output
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(ref, dim=1).numpy(), atol=1e-5)


def test_input_size_override_is_part_of_the_id(tiny_siglip, tiny_clip) -> None:
    """A ViT at another input size (position embeddings interpolated) is another encoder."""
    _, folder = tiny_siglip
    rgbs = _sample_rgbs(2)
    hf = load_encoder(f"hf:{folder}@48px", device="cpu")
    assert hf.image_size == 48 and hf.name.endswith("@48px") and hf.spec == f"hf:{folder}@48px"
    check_encoder(hf, rgbs)
    oc = load_encoder(
        f"open_clip:{TINY_CLIP}", checkpoint=str(tiny_clip[1]), image_size=48, device="cpu"
    )
    assert (
        oc.image_size == 48
        and oc.name.endswith("@48px")
        and oc.spec == f"open_clip:{TINY_CLIP}@48px"
    )
    check_encoder(oc, rgbs)


def test_hf_hub_name_with_local_checkpoint(tiny_siglip) -> None:
    _, folder = tiny_siglip
    enc = load_encoder("hf:lcybuaa/Git-RSCLIP", checkpoint=str(folder), device="cpu")
    assert enc.name.startswith("hf:lcybuaa/Git-RSCLIP@") and enc.spec == "hf:lcybuaa/Git-RSCLIP"


def test_hf_errors(tmp_path) -> None:
    with pytest.raises(EncoderLoadError, match="does not exist"):
        load_encoder(f"hf:{tmp_path / 'missing'}")
    from transformers import CLIPVisionConfig

    CLIPVisionConfig(**_tiny_vision()).save_pretrained(tmp_path)  # a config without weights
    with pytest.raises(EncoderLoadError, match="cannot load"):
        load_encoder(f"hf:{tmp_path}")


def test_hf_hub_name_offline_fails_fast_with_the_fix(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(EncoderLoadError) as info:
        load_encoder("hf:no-such-org/no-such-model")
    assert time.monotonic() - t0 < 10
    assert "hf:/path/to/model" in str(info.value) and "--checkpoint" in str(info.value)


def test_hf_hub_unreachable_fails_fast(monkeypatch) -> None:
    """Without HF_HUB_OFFLINE the hub is probed once; a failed probe ends the load (no retry loop)."""
    import huggingface_hub

    class _NoNetwork:
        def head(self, *args, **kwargs):
            raise ConnectionError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: _NoNetwork())
    t0 = time.monotonic()
    with pytest.raises(EncoderLoadError, match="unreachable"):
        load_encoder("hf:no-such-org/no-such-model")
    assert time.monotonic() - t0 < 10


# ---------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("spec", ["resnet50", "efficientnet-lite0:x", "hf", "clip:ViT-B-32", ""])
def test_unknown_spec_lists_the_families(spec) -> None:
    with pytest.raises(ConfigError) as info:
        load_encoder(spec)
    for form in available_families():
        assert form in str(info.value)


@pytest.mark.parametrize("size", [0, 8, 10_000, 1.5, True])
def test_bad_image_size(size) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        load_encoder(DEFAULT_ENCODER, image_size=size)


def test_bad_device() -> None:
    with pytest.raises(ConfigError, match="device"):
        load_encoder(DEFAULT_ENCODER, device="tpu:7")


def test_import_is_light() -> None:
    code = (
        "import sys, rsprune_data.encoders, rsprune_data.centroids; "
        "print(sorted(m for m in ('torch', 'timm', 'open_clip', 'transformers', 'faiss') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
