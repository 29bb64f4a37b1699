"""Every closed set of values a switch takes, declared once as a `StrEnum`.

Config checks (`dcmfg.config.CHOICES`), the CLI's `choices=` and the error messages that list what is allowed are
all derived from these classes, and code compares against their members (`cfg.graph.relation == Relation.STATIC`).
A member is a `str`, so configs, JSON reports and run identities hold the plain value. This module imports nothing
but `enum`: the CLI reads it without loading torch.
"""

from __future__ import annotations

from enum import StrEnum


class SplitProtocol(StrEnum):
    """How a split file is drawn (dcmfg.data.splits)."""
    RANDOM = "random"
    DCMH = "dcmh"
    DCMHT = "dcmht"
    CLASS_BALANCED = "class_balanced"


class OnCorrupt(StrEnum):
    """What feature extraction does with an unreadable image."""
    SKIP = "skip"
    FAIL = "fail"


class Relation(StrEnum):
    """Which nodes the graph connects: mutual kNN, plain kNN, or a static graph of the frozen backbone features."""
    MUTUAL = "mutual"
    KNN = "knn"
    STATIC = "static"


class Fallback(StrEnum):
    """What a node without a (mutual) neighbour gets: its nearest candidate, or no edge."""
    NEAREST = "nearest"
    NONE = "none"


class Inference(StrEnum):
    """How queries meet the bank at inference: learned layers over the bank graph, no graph, parameter-free
    smoothing, or the bank graph plus separately reported transductive re-ranking."""
    BANK = "bank"
    NONE = "none"
    SMOOTH = "smooth"
    TRANSDUCTIVE = "transductive"


class Hubness(StrEnum):
    """Candidate scoring: plain similarity, or CSLS (2 cos(x, y) - r(x) - r(y))."""
    NONE = "none"
    CSLS = "csls"


class BankDensity(StrEnum):
    """The reverse test against the bank: the same k, or k scaled by bank size / batch size."""
    SAME = "same"
    MATCHED = "matched"


class Attention(StrEnum):
    """Edge weights: GATv2 plus the region-word alignment term, GATv2 alone, or the plain mean of neighbours."""
    ALIGNMENT = "alignment"
    GATV2 = "gatv2"
    NONE = "none"


class Positives(StrEnum):
    """Contrastive positives: every item sharing a label, or only the paired item."""
    LABEL = "label"
    PAIR = "pair"


class SimilarityKind(StrEnum):
    """The multi-label similarity term: DCMH's likelihood, or a margin loss."""
    LIKELIHOOD = "likelihood"
    MARGIN = "margin"


class SelectMetric(StrEnum):
    """The validation mAP@all that selects the checkpoint."""
    MAP_MEAN = "map_mean"
    MAP_I2T = "map_i2t"
    MAP_T2I = "map_t2i"


class Distance(StrEnum):
    """Ranking: cosine on the real-valued embeddings, or Hamming on the sign of the hash head."""
    COSINE = "cosine"
    HAMMING = "hamming"


class EvalSplit(StrEnum):
    """The split an evaluation scores."""
    QUERY = "query"
    VAL = "val"


class Against(StrEnum):
    """What a search query is ranked against."""
    IMAGES = "images"
    TEXTS = "texts"


def values(choice: type[StrEnum]) -> tuple[str, ...]:
    """The allowed values of a choice, in declaration order (for argparse `choices=` and messages)."""
    return tuple(m.value for m in choice)


def check(choice: type[StrEnum], value, name: str, error: type[Exception] = ValueError) -> StrEnum:
    """`value` as a member of `choice`, or `error` naming `name` and the allowed values."""
    try:
        return choice(value)
    except ValueError:
        raise error(f"{name} must be one of {', '.join(values(choice))}, got {value!r}") from None
