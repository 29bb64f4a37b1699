"""What the graph actually did (is the mutual relation active at all?), always recorded (docs/method.md section 2).

For every graph step (a layer of a training batch, of the bank's own graph, or of a chunk of queries against the bank)
`GraphTally.add` counts, over the step's target nodes:

- `mutual_share`: targets with at least one genuine mutual neighbour (fallback edges and self-loops not counted);
- `fallback_share`: targets served only by the fallback edge (no other non-self edge);
- `in_degree`: mean non-self in-edges per target; `out_degree` / `out_degree_max`: non-self out-edges per candidate
  node (mean and max: a hub feeds many targets);
- `cross_share`: share of the non-self edges that join an image and a text;
- `hubness`: skewness of the k-occurrence (how often each candidate is among a target's k nearest); a long right tail
  means a few hubs are near to everything;
- `attention_entropy` (nats, mean over targets and heads) and `self_attention` (mean weight of the self-loop).

Counts are summed over layers, batches or chunks, so shares are exact over all targets (a mean over layers). With
`shared_candidates` (queries against one bank) the k-occurrence and out-degrees are summed over the steps and computed
once over the bank; otherwise (training batches: each its own nodes) they are computed per step and averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcmfg.graph.edges import Edges


def skewness(x: torch.Tensor) -> float:
    """Sample skewness E[(x - mean)^3] / std^3 (0 for a constant)."""
    x = x.double()
    sd = x.std(unbiased=False)
    return float(((x - x.mean()) ** 3).mean() / sd**3) if float(sd) > 0 else 0.0


@dataclass
class TargetCounts:
    """Per target node of one graph step (n,): what its non-self in-edges are."""

    mutual: torch.Tensor  # bool: at least one genuine mutual neighbour (fallback edges and self-loops not counted)
    fallback_only: torch.Tensor  # bool: served only by the fallback edge (no other non-self edge)
    degree: torch.Tensor  # long: non-self in-edges


def target_counts(edges: Edges) -> TargetCounts:
    """The per-target flags of one graph step, for its `edges.n_targets` targets. The one definition the
    graph statistics (`GraphTally`) and the per-item statistics of an embedding (`item_stats`) both count."""
    t = edges.n_targets
    tgt = edges.index[1]
    other = ~edges.self_loop
    has_genuine = torch.bincount(tgt[other & ~edges.fallback], minlength=t) > 0
    has_fallback = torch.bincount(tgt[edges.fallback & other], minlength=t) > 0
    return TargetCounts(mutual=torch.bincount(tgt[edges.mutual & other], minlength=t) > 0,
                        fallback_only=has_fallback & ~has_genuine,
                        degree=torch.bincount(tgt[other], minlength=t))


def item_stats(steps: list[Edges]) -> dict[str, torch.Tensor]:
    """Per target (n,) float32, a mean over the graph steps (layers): `mutual` (had >= 1 genuine mutual neighbour),
    `fallback` (was served by the fallback edge only), `degree` (non-self in-edges). Per item, so they can be
    sliced to a split part and gathered across ranks like the embeddings."""
    out: dict[str, list] = {"mutual": [], "fallback": [], "degree": []}
    for e in steps:
        c = target_counts(e)
        out["mutual"].append(c.mutual.float())
        out["fallback"].append(c.fallback_only.float())
        out["degree"].append(c.degree.float())
    return {k: torch.stack(v).mean(0) for k, v in out.items()}


class GraphTally:
    """Counts of the graph steps seen (`add`, `+=`), read as statistics with `summary`."""

    def __init__(self, shared_candidates: bool = False):
        self.shared = shared_candidates
        self.n: dict[str, float] = {k: 0.0 for k in ("targets", "mutual", "fallback_only", "edges", "cross",
                                                     "entropy", "self_alpha", "rows", "steps", "hub", "out_mean",
                                                     "out_max")}
        self.occurrence: dict[int, torch.Tensor] = {}  # shared candidates: per layer, summed over steps
        self.out: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def add(self, edges, alpha: torch.Tensor | None = None, layer: int = 0) -> None:
        """One graph step: `edges` its `Edges`, `alpha` (E, heads) its attention coefficients."""
        t = edges.n_targets
        src = edges.index[0]
        other = ~edges.self_loop
        counts = target_counts(edges)
        self.n["targets"] += t
        self.n["mutual"] += int(counts.mutual.sum())
        self.n["fallback_only"] += int(counts.fallback_only.sum())
        self.n["edges"] += int(counts.degree.sum())
        self.n["cross"] += int((edges.cross & other).sum())
        # out-degree per candidate node: bank graphs name the bank node of each source row
        cand = edges.bank_nodes[src[other] - t] if edges.bank_nodes is not None else src[other]
        out = torch.bincount(cand, minlength=len(edges.occurrence))
        if self.shared:
            self.occurrence[layer] = edges.occurrence + self.occurrence.get(layer, 0)
            self.out[layer] = out + self.out.get(layer, 0)
        else:
            self.n["steps"] += 1
            self.n["hub"] += skewness(edges.occurrence)
            self.n["out_mean"] += float(out.double().mean())
            self.n["out_max"] += float(out.max()) if len(out) else 0.0
        if alpha is not None:
            a = alpha.detach().double()
            self.n["entropy"] += float(-(a * torch.log(a.clamp(min=1e-30))).sum())  # summed over targets and heads
            self.n["self_alpha"] += float(a[edges.self_loop].sum())
            self.n["rows"] += t * a.shape[1]

    def __iadd__(self, other: "GraphTally") -> "GraphTally":
        for k, v in other.n.items():
            self.n[k] += v
        for layer, occ in other.occurrence.items():
            self.occurrence[layer] = occ + self.occurrence.get(layer, 0)
            self.out[layer] = other.out[layer] + self.out.get(layer, 0)
        return self

    def summary(self, prefix: str = "graph_") -> dict[str, float]:
        """The statistics as plain floats (empty when no graph step was seen: a model without graph layers)."""
        n = self.n
        if n["targets"] == 0:
            return {}
        res = {
            "mutual_share": n["mutual"] / n["targets"],
            "fallback_share": n["fallback_only"] / n["targets"],
            "in_degree": n["edges"] / n["targets"],
            "cross_share": n["cross"] / n["edges"] if n["edges"] else 0.0,
        }
        if self.occurrence:
            layers = sorted(self.occurrence)
            res["hubness"] = sum(skewness(self.occurrence[la]) for la in layers) / len(layers)
            res["out_degree"] = sum(float(self.out[la].double().mean()) for la in layers) / len(layers)
            res["out_degree_max"] = sum(float(self.out[la].max()) for la in layers) / len(layers)
        elif n["steps"]:
            res["hubness"] = n["hub"] / n["steps"]
            res["out_degree"] = n["out_mean"] / n["steps"]
            res["out_degree_max"] = n["out_max"] / n["steps"]
        if n["rows"]:
            res["attention_entropy"] = n["entropy"] / n["rows"]
            res["self_attention"] = n["self_alpha"] / n["rows"]
        return {prefix + k: float(v) for k, v in res.items()}


def graph_steps(bank) -> int:
    """How many graph steps a query takes against `bank` (the steps `item_stats` averages over): one per layer
    (the bank keeps every layer's input state), one for bank smoothing (its one state)."""
    return max(1, len(bank.states))


def item_share(values: torch.Tensor, steps: int) -> float:
    """The share of (item, graph step) pairs with a flag, from per-item means over `steps` steps (`item_stats`).

    Each mean is count / steps in float32; the counts are recovered as integers and the share is their sum over
    items x steps in float64. A float32 mean of the means could round above the exact share, so two shares of
    disjoint flags (mutual, fallback only) could sum past 1; integer counts cannot.
    """
    counts = torch.round(values.double() * steps).long()
    return float(counts.sum().double() / (len(values) * steps))


def inference_report(bank, embedded: list[dict]) -> dict:
    """The `graph` object of a report from the per-item statistics of `DCMFG.embed` (already cut to the evaluated
    items, e.g. the query split, of each modality): `query_mutual_share` (items with at least one genuine mutual
    bank neighbour, both modalities together, a mean over the layers), `query_fallback_share` (served only by the
    fallback edge), `query_in_degree` (bank neighbours), and the statistics of the bank's own graph. Empty without
    a graph (baselines, model.layers=0, graph.inference=none)."""
    if bank is None or not embedded or not all("mutual" in e for e in embedded):
        return {}
    cat = {k: torch.cat([e[k].float() for e in embedded]) for k in ("mutual", "fallback", "degree")}
    steps = graph_steps(bank)
    return {
        "query_mutual_share": item_share(cat["mutual"], steps),
        "query_fallback_share": item_share(cat["fallback"], steps),
        "query_in_degree": float(cat["degree"].mean()),
        "inference": bank.inference,
        "bank": {k.removeprefix("graph_"): v for k, v in bank.stats.items()},
    }
