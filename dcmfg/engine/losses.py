"""Training objective (docs/method.md, section 5): contrastive, multi-label similarity, label head, quantisation.

Every term is a plain function of tensors; `total_loss` adds those whose inputs a model produced (a `ModelOutput`)
and whose weight in the config is non-zero, so baselines and ablations share one objective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dcmfg.choices import Positives, SimilarityKind
from dcmfg.config import LossConfig

if TYPE_CHECKING:
    from dcmfg.models.base import ModelOutput


def label_similarity(a: torch.Tensor, b: torch.Tensor, soft: bool = False) -> torch.Tensor:
    """S_ij = 1 iff l_i . l_j > 0 (multi-label relevance), or the cosine of the label vectors when soft."""
    a, b = a.float(), b.float()
    if soft:
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return ((a @ b.T) > 0).float()


def multi_positive_infonce(logits: torch.Tensor, positives: torch.Tensor | None,
                           mask_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE over a square score matrix (docs/method.md, section 5).

    logits (A, A): row i scores item i of one modality against every item of the other, already divided by the
    temperature. positives (>= A, >= A) or None: 1 where a pair counts as a positive beyond the diagonal (the
    paired item is always one); only its top-left (A, A) block is used. With P = min(positives + I, 1),

        L = 1/2 [ mean_i -sum_j P_ij log softmax_j(logits_i.) / sum_j P_ij  +  the same over logits.T, P.T ]

    mask_dtype: the dtype P is built in (default float32; the contrastive terms pass the logits' own dtype).
    """
    a = len(logits)
    eye = torch.eye(a, device=logits.device, dtype=mask_dtype)
    pos = eye if positives is None else torch.clamp(positives[:a, :a].to(eye.dtype) + eye, max=1.0)

    def one_way(lg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(lg, dim=1)
        return -((logp * p).sum(1) / p.sum(1)).mean()

    return 0.5 * (one_way(logits, pos) + one_way(logits.T, pos.T))


def contrastive_loss(
    x: torch.Tensor, y: torch.Tensor, positives: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of x and y (cosine / temperature).

    `positives` (B, B) marks extra positives (multi-positive: pairs that share a label); the paired item is always
    a positive. Each row's loss is the mean log-probability over its positives (`multi_positive_infonce`).
    """
    logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T / temperature
    return multi_positive_infonce(logits, positives, mask_dtype=logits.dtype)


def similarity_loss(
    u: torch.Tensor, v: torch.Tensor, S: torch.Tensor, kind: str = SimilarityKind.LIKELIHOOD, margin: float = 0.2
) -> torch.Tensor:
    """Multi-label similarity preservation across modalities.

    likelihood (DCMH): theta = <u, v> / 2, loss = log(1 + e^theta) - S * theta, on codes in [-1, 1].
    margin: on cosines, pull S-pairs together and push the others below `margin`.
    """
    if kind == SimilarityKind.LIKELIHOOD:
        theta = 0.5 * u @ v.T
        return (F.softplus(theta) - S * theta).mean()
    cos = F.normalize(u, dim=1) @ F.normalize(v, dim=1).T
    return (S * (1 - cos) + (1 - S) * F.relu(cos - margin)).mean()


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def quantization_loss(h: torch.Tensor) -> torch.Tensor:
    """||h - sign(h)||^2 per bit: pushes tanh codes towards +-1 so Hamming ranking loses little."""
    return (h - torch.sign(h).detach()).pow(2).mean()


def balance_loss(h: torch.Tensor) -> torch.Tensor:
    """Each bit should be +1 for about half the items (a bit always on carries no information)."""
    return h.mean(0).pow(2).mean()


def total_loss(out: "ModelOutput", labels: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of every term whose inputs the model produced (fields of `dcmfg.models.dcmfg.ModelOutput`, None
    when absent) and whose weight in the config is non-zero; returns (loss, {term: value}) for logging.

    z_img/z_txt (graph outputs), p_img/p_txt (pre-graph projections), h_img/h_txt (tanh codes), logits_img/logits_txt
    (label head), align (A, A) region-word alignment scores of the first A pairs.
    """
    S = label_similarity(labels, labels, soft=cfg.soft_labels)
    positives = label_similarity(labels, labels) if cfg.positives == Positives.LABEL else None
    terms: dict[str, torch.Tensor] = {}
    if cfg.contrastive and out.z_img is not None:
        terms["contrastive"] = cfg.contrastive * contrastive_loss(out.z_img, out.z_txt, positives, cfg.temperature)
    if cfg.contrastive_pre and out.p_img is not None:
        terms["contrastive_pre"] = cfg.contrastive_pre * contrastive_loss(out.p_img, out.p_txt, positives, cfg.temperature)
    if cfg.alignment and out.align is not None:
        # align is already a (A, A) image x text score matrix in [-1, 1] of the first A pairs: InfoNCE over it
        terms["alignment"] = cfg.alignment * multi_positive_infonce(out.align / cfg.temperature, positives)
    if out.h_img is not None:
        h_i, h_t = out.h_img, out.h_txt
        if cfg.similarity:
            terms["similarity"] = cfg.similarity * (
                similarity_loss(h_i, h_t, S, cfg.similarity_kind, cfg.margin)
                + similarity_loss(h_t, h_i, S.T, cfg.similarity_kind, cfg.margin)
            ) / 2
        if cfg.hash_contrastive:
            terms["hash_contrastive"] = cfg.hash_contrastive * contrastive_loss(h_i, h_t, positives, cfg.temperature)
        if cfg.quantization:
            terms["quantization"] = cfg.quantization * (quantization_loss(h_i) + quantization_loss(h_t)) / 2
        if cfg.balance:
            terms["balance"] = cfg.balance * (balance_loss(h_i) + balance_loss(h_t)) / 2
    elif cfg.similarity and out.z_img is not None:
        terms["similarity"] = cfg.similarity * similarity_loss(out.z_img, out.z_txt, S, SimilarityKind.MARGIN, cfg.margin)
    if cfg.label and out.logits_img is not None:
        terms["label"] = cfg.label * (label_loss(out.logits_img, labels) + label_loss(out.logits_txt, labels)) / 2
    if not terms:
        raise ValueError("no loss term applies: every weight is zero or the model produced none of their inputs")
    total = torch.stack(list(terms.values())).sum()
    return total, {k: float(v.detach()) for k, v in terms.items()}
