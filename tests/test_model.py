"""DCMFG layers, models, losses and interpretability on small structured feature tensors (no backbones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import GATv2Conv

from dcmfg import graph as G
from dcmfg.study import interpret
from dcmfg.config import load_config
from dcmfg.errors import ConfigError
from dcmfg.engine.losses import (
    contrastive_loss,
    label_similarity,
    quantization_loss,
    total_loss,
)
from dcmfg.models.base import GraphModel, ModelOutput, RetrievalModel
from dcmfg.models.baselines import _TokenEncoder
from dcmfg.models.layers import AlignedGATv2Conv, GraphLayer
from dcmfg.engine.checkpoint import load_weights, save_weights
from dcmfg.models.registry import MODELS, create_model

DI, DT, R, W, C = 24, 20, 4, 6, 5


def _feats(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image_global": torch.randn(n, DI, generator=g),
        "image_regions": torch.randn(n, R, DI, generator=g),
        "text_global": torch.randn(n, DT, generator=g),
        "text_words": torch.randn(n, W, DT, generator=g),
        "text_mask": torch.rand(n, W, generator=g) > 0.3,
    }


def _cfg(name="dcmfg", *extra):
    return load_config(None, [f"model.name={name}", "model.dim=32", "model.hidden=48", "model.token_dim=16",
                              "model.hash_bits=16", "model.heads=2", "graph.k=3", *extra])


def test_attention_conv_is_torch_geometric_gatv2_plus_the_alignment_term():
    torch.manual_seed(0)
    x = torch.randn(10, 8)
    edges = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]])
    edges = torch.cat([edges, torch.arange(10).repeat(2, 1)], 1)
    ours = AlignedGATv2Conv(8, 2, align_scale=3.0)
    ref = GATv2Conv(8, 4, heads=2, add_self_loops=False, share_weights=False)
    ref.load_state_dict(ours.state_dict())
    out, (_, alpha) = ours(x, edges, return_attention_weights=True)
    out_ref, (_, alpha_ref) = ref(x, edges, return_attention_weights=True)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(alpha, alpha_ref)
    # the alignment term: softmax(logit + s * a) = alpha * exp(s * a), renormalised per target
    align = torch.rand(edges.shape[1], generator=torch.Generator().manual_seed(1))
    _, (_, a1) = ours(x, edges, edge_attr=align, return_attention_weights=True)
    w = alpha_ref * torch.exp(3.0 * align)[:, None]
    norm = torch.zeros(10, 2).index_add_(0, edges[1], w)[edges[1]]
    torch.testing.assert_close(a1, w / norm)
    # bipartite (sources, targets) as the bank graph uses it: the same numbers for the same edges
    out_b, (_, a_b) = ours((x, x[:3]), edges[:, edges[1] < 3], return_attention_weights=True)
    torch.testing.assert_close(out_b, out[:3])
    torch.testing.assert_close(a_b, alpha[edges[1] < 3])


def test_attention_dropout_keeps_coefficients_normalised_and_none_is_a_mean():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    e = G.Edges(index=torch.tensor([[1, 2, 0], [0, 0, 0]]), mutual=torch.zeros(3, dtype=torch.bool),
                fallback=torch.zeros(3, dtype=torch.bool), self_loop=torch.tensor([False, False, True]),
                cross=torch.zeros(3, dtype=torch.bool), n_targets=4, occurrence=torch.zeros(4))
    layer = GraphLayer(8, 2, "gatv2", dropout=0.5, align_scale=0.0).train()
    _, alpha = layer(x, x, e)
    torch.testing.assert_close(alpha.sum(0), torch.ones(2))
    mean = GraphLayer(8, 2, "none", dropout=0.0, align_scale=0.0)
    out, a = mean(x, x, e)
    torch.testing.assert_close(a, torch.full((3, 2), 1 / 3))
    expect = mean.conv.lin_l(x[[1, 2, 0]].mean(0))
    torch.testing.assert_close(out[0], mean.norm(x[0] + torch.nn.functional.gelu(expect)))


@pytest.mark.parametrize(
    "name,attention",
    [("dcmfg", "alignment"), ("dcmfg", "gatv2"), ("dcmfg", "none"), ("linear", "alignment"), ("dcmh", "alignment"),
     ("dcmht", "alignment")],
)
def test_every_model_trains_every_parameter(name, attention):
    cfg = _cfg(name, f"model.attention={attention}")
    torch.manual_seed(0)
    model = create_model(name, cfg, DI, DT, C)
    assert isinstance(model, RetrievalModel) and isinstance(model, GraphModel) == (name == "dcmfg")
    feats = _feats()
    labels = (torch.rand(32, C, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    out = model(feats)
    loss, parts = total_loss(out, labels, cfg.loss)
    assert torch.isfinite(loss) and parts
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert dead == []


SWITCHES = [
    ["graph.relation=mutual"],
    ["graph.relation=knn", "graph.rebuild_per_layer=false"],
    ["graph.relation=static"],
    ["graph.relation=static", "graph.cross_modal_only=false"],
    ["graph.cross_modal_only=false", "graph.cross_k=2"],
    ["graph.hubness=csls"],
    ["graph.centre=true"],
    ["graph.reverse_ratio=2.0", "graph.bank_density=matched"],
    ["graph.inference=smooth"],
    ["model.attention=gatv2"],
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(x.split(".")[1] for x in s))
def test_query_embedding_does_not_depend_on_the_other_queries(switches):
    cfg = _cfg("dcmfg", "train.batch_size=16", *switches)
    torch.manual_seed(0)
    model = create_model("dcmfg", cfg, DI, DT, C)
    model(_feats())  # one training forward: the centring's running means are set
    model.eval()
    bank = model.build_bank(_feats(40, seed=1))
    q = _feats(9, seed=2)
    for modality in (0, 1):
        full = model.embed(q, modality, bank)["z"]
        perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
        shuffled = model.embed({k: v[perm] for k, v in q.items()}, modality, bank)["z"]
        single = torch.cat([model.embed({k: v[i : i + 1] for k, v in q.items()}, modality, bank)["z"] for i in range(9)])
        chunked = model.embed(q, modality, bank, chunk=4)["z"]
        torch.testing.assert_close(shuffled, full[perm], atol=1e-5, rtol=0)
        torch.testing.assert_close(single, full, atol=1e-5, rtol=0)
        torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("switches", [[], ["graph.rebuild_per_layer=false"], ["graph.hubness=csls"],
                                      ["graph.relation=static"], ["graph.reverse_ratio=2.0"], ["graph.centre=true"]],
                         ids=str)
def test_a_bank_member_embedded_as_a_query_gets_its_bank_graph_state(switches):
    """One relation rule and one propagation loop: a training item embedded against the bank (its copy and pair
    excluded) ends in exactly the state it has in the bank's own graph (no fallback edges, which only the set's
    own graph sends back). Both layers, rebuilt or not."""
    cfg = _cfg("dcmfg", "graph.fallback=none", "model.dropout=0.0", *switches)
    torch.manual_seed(0)
    model = create_model("dcmfg", cfg, DI, DT, C)
    model(_feats())
    model.eval()
    feats = _feats(20, seed=4)
    bank = model.build_bank(feats)
    enc = model.encode(feats)
    with torch.no_grad():
        h, trace = model.propagate(torch.cat([enc["p_img"], enc["p_txt"]]), model.batch_graph(enc))
    assert len(trace) == 2 and all(torch.equal(s.input, b) for s, b in zip(trace, bank.states))
    for modality in (0, 1):
        e = model.embed(feats, modality, bank, exclude=torch.arange(20) + 20 * modality)
        torch.testing.assert_close(e["z"], F.normalize(h[20 * modality : 20 * (modality + 1)], dim=1), atol=1e-5, rtol=0)


def test_layers_zero_and_inference_none_are_the_projection_alone_and_smooth_adds_the_neighbour_mean():
    torch.manual_seed(0)
    feats, q = _feats(20, seed=4), _feats(6, seed=5)
    flat = create_model("dcmfg", _cfg("dcmfg", "model.layers=0"), DI, DT, C)
    out = flat(feats)
    torch.testing.assert_close(out.z_img, F.normalize(out.p_img, dim=1))
    assert out.stats == {} and len(list(flat.layers)) == 0
    flat.eval()
    for inference in (None, "none"):
        e = flat.embed(q, 0, flat.build_bank(feats, inference=inference))
        torch.testing.assert_close(e["z"], F.normalize(flat.proj_img(q["image_global"]), dim=1))
    model = create_model("dcmfg", _cfg("dcmfg"), DI, DT, C).eval()
    e = model.embed(q, 1, model.build_bank(feats, inference="none"))
    torch.testing.assert_close(e["z"], F.normalize(model.proj_txt(q["text_global"]), dim=1))
    assert e["graph"].summary() == {}
    # smooth: p + mean of the bank neighbours' projections, the neighbours by the model's own relation
    bank = flat.build_bank(feats, inference="smooth")
    e = flat.embed(q, 0, bank, return_attention=True)
    p = flat.proj_img(q["image_global"])
    graph = G.BankGraph(flat.gcfg, bank, 0)
    edges = graph.edges(0, p)
    src, dst = edges.index[:, ~edges.self_loop]
    nb = bank.states[0][edges.bank_nodes[src - 6]]
    mean = torch.stack([nb[dst == i].mean(0) for i in range(6)])
    torch.testing.assert_close(e["z"], F.normalize(p + mean, dim=1))
    assert 0 < e["graph"].summary()["graph_in_degree"]
    with pytest.raises(ConfigError, match="graph.inference='nope'"):
        model.build_bank(feats, inference="nope")


def test_outputs_stats_and_attention_for_the_explorer():
    cfg = _cfg("dcmfg")
    torch.manual_seed(0)
    model = create_model("dcmfg", cfg, DI, DT, C)
    out = model(_feats(16), return_attention=True)
    assert isinstance(out, ModelOutput)
    assert {"graph_mutual_share", "graph_fallback_share", "graph_in_degree", "graph_out_degree", "graph_cross_share",
            "graph_hubness", "graph_attention_entropy", "graph_self_attention"} <= set(out.stats)
    assert all(isinstance(v, float) for v in out.stats.values())
    assert 0 <= out.stats["graph_mutual_share"] <= 1 and out.stats["graph_cross_share"] == 1.0  # cross_modal_only
    assert len(out.attention) == cfg.model.layers
    for layer in out.attention:
        dst = layer["edge_index"][1]
        sums = torch.zeros(32, layer["alpha"].shape[1]).index_add_(0, dst, layer["alpha"])
        torch.testing.assert_close(sums, torch.ones_like(sums))
    model.eval()
    bank = model.build_bank(_feats(20, seed=1))
    assert 0 <= bank.stats["graph_mutual_share"] <= 1
    e = model.embed(_feats(5, seed=2), 1, bank, return_attention=True, exclude=torch.tensor([20, -1, -1, -1, -1]))
    for a in e["attention"]:
        assert set(a) == {"query_index", "bank_index", "alpha", "mutual"}
        assert a["alpha"].shape == (len(a["query_index"]), cfg.model.heads) and a["mutual"].dtype == torch.bool
        selfloop = a["bank_index"] == -1
        assert int(selfloop.sum()) == 5 and not bool(a["mutual"][selfloop].any())
        assert not bool(((a["query_index"] == 0) & ((a["bank_index"] == 20) | (a["bank_index"] == 0))).any())
    s = e["graph"].summary()
    assert s["graph_mutual_share"] == pytest.approx(
        float(torch.stack([a["mutual"][a["query_index"] == i].any() for a in e["attention"] for i in range(5)]).float().mean()))
    with pytest.raises(AttributeError):
        total_loss({"z_img": out.z_img}, torch.ones(16, C), cfg.loss)  # a dict (old field names) is refused


def test_centring_means_and_align_scale_are_saved_with_the_weights(tmp_path):
    cfg = _cfg("dcmfg", "graph.centre=true", "model.align_scale=2.5")
    torch.manual_seed(0)
    model = create_model("dcmfg", cfg, DI, DT, C)
    model(_feats())
    assert all(layer.conv.align_scale == 2.5 for layer in model.layers)
    assert "align_scale" not in " ".join(n for n, _ in model.named_parameters())
    save_weights(model, tmp_path / "m.safetensors")
    other = create_model("dcmfg", cfg, DI, DT, C)
    load_weights(other, tmp_path / "m.safetensors")
    assert torch.equal(other.centre[0].mean, model.centre[0].mean) and float(model.centre[0].mean.abs().sum()) > 0


def test_interpret_region_word_map_and_neighbourhood():
    cfg = _cfg("dcmfg")
    torch.manual_seed(0)
    model = create_model("dcmfg", cfg, DI, DT, C).eval()
    f = _feats(20, seed=5)
    m = interpret.region_word_map(model, f["image_regions"][0], f["text_words"][1], f["text_mask"][1])
    assert m.matrix.shape == (R, int(f["text_mask"][1].sum()))
    assert m.grid == 2 and -1 <= m.score <= 1
    assert torch.equal(m.best_region, m.matrix.argmax(0))
    bank = model.build_bank(f)
    df = interpret.neighbourhood(model, _feats(3, seed=6), 1, bank)
    assert set(df["item"]) == {0, 1, 2}
    sums = df.groupby(["item", "layer"])["alpha"].sum()
    assert bool(((sums - 1).abs() < 1e-5).all())
    assert (df["neighbour"] == "self").sum() == 3 * cfg.model.layers
    assert not bool(df.loc[df["neighbour"] == "self", "mutual"].any())
    with pytest.raises(ConfigError, match="no region/word"):
        interpret.region_word_map(create_model("linear", cfg, DI, DT, C), f["image_regions"][0], f["text_words"][0], f["text_mask"][0])


def test_losses_reward_alignment():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    labels = torch.eye(16)[:, :C].clone()
    labels[torch.arange(16), torch.arange(16) % C] = 1
    aligned = contrastive_loss(x, x + 0.01 * torch.randn(16, 8, generator=g), None, 0.1)
    shuffled = contrastive_loss(x, x[torch.randperm(16, generator=g)], None, 0.1)
    assert aligned < shuffled
    S = label_similarity(labels, labels)
    assert torch.equal(S, S.T) and bool((S.diagonal() == 1).all())
    assert quantization_loss(torch.tensor([[1.0, -1.0]])) == 0


def test_registry_and_checkpoint_from_another_model_is_refused(tmp_path):
    assert {"dcmfg", "linear", "dcmh", "dcmht"} <= set(MODELS)
    with pytest.raises(ConfigError, match="unknown model.name 'nope'"):
        create_model("nope", _cfg(), DI, DT, C)
    cfg = _cfg("dcmfg")
    a = create_model("dcmfg", cfg, DI, DT, C)
    save_weights(a, tmp_path / "m.safetensors")
    b = create_model("dcmfg", cfg, DI, DT, C)
    load_weights(b, tmp_path / "m.safetensors")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    with pytest.raises(ConfigError, match="does not fit"):
        load_weights(create_model("linear", cfg, DI, DT, C), tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="shape"):
        load_weights(create_model("dcmfg", _cfg("dcmfg", "model.hash_bits=32"), DI, DT, C), tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="bad.safetensors"):
        load_weights(b, tmp_path / "bad.safetensors")


def test_dcmht_codes_texts_alone_whatever_group_of_lengths_they_fall_in():
    # the token encoder groups texts by length (padding was most of its cost); a text's code must be what the
    # whole padded batch gives, and must not depend on which other texts share its group
    torch.manual_seed(0)
    enc = _TokenEncoder(24, 32, 4, 1, 16, 0.1).eval()
    n, width = 3 * enc.GROUP + 5, 12
    lengths = torch.randint(0, width + 1, (n,))
    mask = torch.arange(width)[None] < lengths[:, None]
    glob, tokens = torch.randn(n, 24), torch.randn(n, width, 24)
    with torch.no_grad():
        grouped, padded = enc(glob, tokens, mask), enc._encode(glob, tokens, mask)
        alone = torch.cat([enc(glob[i : i + 1], tokens[i : i + 1], mask[i : i + 1]) for i in range(n)])
    torch.testing.assert_close(grouped, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped, alone, atol=1e-5, rtol=0)
