"""Text encoders: BERT-family models through transformers (offline all-MiniLM-L6-v2, or hub repos).

Global = mean of the last hidden states over the attention mask (sentence-transformers' pooling for MiniLM).
Word tokens = the sub-word states of each word averaged (fast tokenizer `word_ids()`), special tokens dropped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from dcmfg.backbones.errors import OFFLINE_DEFAULTS, BackboneUnavailable
from dcmfg.backbones.output import EncoderOutput, plain
from dcmfg.errors import ConfigError

RECIPE = "meanpool/word-mean/v1"


class HFTextEncoder:
    def __init__(self, source: str | Path, *, name: str, max_words: int = 32, device: str = "cpu",
                 local: bool = False, max_length: int | None = None):
        if max_words < 1:
            raise ConfigError(f"max_words must be >= 1, got {max_words}")
        self.name, self.max_words, self.device = name, max_words, torch.device(device)
        self.source, self.local = str(source), local
        self.n_encoded = 0
        self._model = None
        if local:
            # weights ship in a package: key on their bytes, load the network lazily (cache hits never need it)
            from transformers import AutoConfig, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.source, local_files_only=True)
            self.dim = int(AutoConfig.from_pretrained(self.source, local_files_only=True).hidden_size)
            weights = _folder_digest(Path(self.source))
        else:
            self._load_hub()
            weights = getattr(self._model.config, "_commit_hash", None) or "local"
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"text backbone {name!r} has no fast tokenizer; word pooling needs word_ids()")
        self.max_length = int(max_length or min(getattr(self.tokenizer, "model_max_length", 512), 512))
        blob = json.dumps([name, weights, max_words, self.max_length, RECIPE])
        self.cache_key = f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def _load_hub(self) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(self.source)
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            if config.model_type == "clip":
                from transformers import CLIPTextModel as cls
            else:
                cls = AutoModel
            self._model = cls.from_pretrained(self.source).eval().to(self.device)
        except (OSError, ValueError, KeyError):  # hub errors (OSError, HTTP errors) with long tracebacks
            raise BackboneUnavailable(
                f"text backbone {self.name!r} could not be loaded from the Hugging Face hub (offline or not cached); "
                f"{OFFLINE_DEFAULTS}"
            ) from None
        self.dim = int(self._model.config.hidden_size)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar would clutter logs and notebooks
            try:
                self._model = AutoModel.from_pretrained(self.source, local_files_only=True).eval().to(self.device)
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
        return self._model

    def encode(self, texts: Sequence[str]) -> EncoderOutput:
        with torch.inference_mode():
            out = self._encode(texts)
        return plain(out)

    def _encode(self, texts: Sequence[str]) -> EncoderOutput:
        texts = [str(t) for t in texts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.model(**inputs).last_hidden_state.float().cpu()  # (B, L, D)
        self.n_encoded += len(texts)
        am = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        globals_ = (hidden * am).sum(1) / am.sum(1).clamp(min=1e-9)

        # word pooling as one scatter-mean: token (b, l) belongs to word slot b * W + word_id (if < max_words)
        b, length, d = hidden.shape
        w = self.max_words
        word_ids = torch.tensor(
            [[-1 if x is None else x for x in enc.word_ids(i)] for i in range(b)], dtype=torch.long
        )
        keep = (word_ids >= 0) & (word_ids < w)
        slot = (torch.arange(b).unsqueeze(1) * w + word_ids)[keep]
        sums = torch.zeros(b * w, d).index_add_(0, slot, hidden[keep])
        counts = torch.zeros(b * w).index_add_(0, slot, torch.ones(slot.shape[0]))
        words = (sums / counts.clamp(min=1).unsqueeze(1)).view(b, w, d)
        mask = (counts > 0).view(b, w)
        # words are numbered 0..n-1, so real words are a prefix; trim to the longest (>= 1 slot, so shapes stay valid)
        t = max(1, int(mask.sum(1).max()))
        return EncoderOutput(globals_, words[:, :t].contiguous(), mask[:, :t].contiguous())


_DIGESTS: dict[tuple, str] = {}


def _folder_digest(folder: Path) -> str:
    """SHA-256 over a model folder's weights and tokenizer/config files (remembered per process)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".json", ".txt"})
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(folder)).encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]
