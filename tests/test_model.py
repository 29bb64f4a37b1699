"""DCMFG layers, models, losses and interpretability on small structured feature tensors (no backbones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import GATv2Conv

from dcmfg import interpret
from dcmfg.config import load_config
from dcmfg.errors import ConfigError
from dcmfg.losses import contrastive_loss, label_similarity, quantization_loss, total_loss
from dcmfg.model import AttentionConv, load_weights, save_weights
from dcmfg.registry import MODELS, create_model

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


def test_attention_conv_matches_torch_geometric_gatv2():
    torch.manual_seed(0)
    x = torch.randn(10, 8)
    edges = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]])
    edges = torch.cat([edges, torch.arange(10).repeat(2, 1)], 1)
    ours = AttentionConv(8, 2, "gatv2")
    ref = GATv2Conv(8, 4, heads=2, add_self_loops=False, share_weights=False)
    with torch.no_grad():
        ref.lin_l.weight.copy_(ours.lin_l.weight)
        ref.lin_l.bias.copy_(ours.lin_l.bias)
        ref.lin_r.weight.copy_(ours.lin_r.weight)
        ref.lin_r.bias.copy_(ours.lin_r.bias)
        ref.att.copy_(ours.att)
        ref.bias.copy_(ours.bias)
    out, alpha = ours(x, edges)
    out_ref, (_, alpha_ref) = ref(x, edges, return_attention_weights=True)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(alpha, alpha_ref)


def test_alignment_term_shifts_attention_towards_aligned_edges_and_none_is_a_mean():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    edges = torch.tensor([[1, 2, 0], [0, 0, 0]])
    conv = AttentionConv(8, 2, "alignment")
    _, a0 = conv(x, edges, torch.zeros(3))
    _, a1 = conv(x, edges, torch.tensor([1.0, 0.0, 0.0]))
    assert bool((a1[0] > a0[0]).all())
    torch.testing.assert_close(a1.sum(0), torch.ones(2))
    mean = AttentionConv(8, 2, "none")
    out, a = mean(x, edges)
    torch.testing.assert_close(a, torch.full((3, 2), 1 / 3))
    expect = mean.lin_l(x[[1, 2, 0]]).mean(0) + mean.bias
    torch.testing.assert_close(out[0], expect)


@pytest.mark.parametrize(
    "name,attention",
    [("dcmfg", "alignment"), ("dcmfg", "gatv2"), ("dcmfg", "none"), ("linear", "alignment"), ("dcmh", "alignment"),
     ("dcmht", "alignment")],
)
def test_every_model_trains_every_parameter(name, attention):
    cfg = _cfg(name, f"model.attention={attention}")
    torch.manual_seed(0)
    model = create_model(name, cfg, DI, DT, C)
    feats = _feats()
    labels = (torch.rand(32, C, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    out = model(feats)
    loss, parts = total_loss(out, labels, cfg.loss)
    assert torch.isfinite(loss) and parts
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert dead == []


@pytest.mark.parametrize(
    "relation,rebuild,cross",
    [("mutual", True, False), ("mutual", True, True), ("knn", False, False), ("static", True, False), ("static", True, True)],
)
def test_query_embedding_does_not_depend_on_the_other_queries(relation, rebuild, cross):
    # cross_modal_only=true is the shipped default: the static graph's within-modality bank must still work with it
    cfg = _cfg("dcmfg", f"graph.relation={relation}", f"graph.rebuild_per_layer={str(rebuild).lower()}",
               f"graph.cross_modal_only={str(cross).lower()}")
    torch.manual_seed(0)
    model = create_model("dcmfg", cfg, DI, DT, C).eval()
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


def test_bank_and_batch_graph_agree_for_the_bank_members():
    """A bank member embedded against the bank (its copy excluded) sees the same kind of graph as in training."""
    cfg = _cfg("dcmfg", "graph.rebuild_per_layer=false", "model.dropout=0.0")
    torch.manual_seed(0)
    model = create_model("dcmfg", cfg, DI, DT, C).eval()
    feats = _feats(20, seed=4)
    bank = model.build_bank(feats)
    e = model.embed(feats, 0, bank)
    assert e["z"].shape == (20, 32) and e["h"].shape == (20, 16)
    torch.testing.assert_close(e["z"].norm(dim=1), torch.ones(20))
    assert bool((e["h"].abs() <= 1).all())


def test_return_attention_gives_normalised_coefficients_per_node():
    cfg = _cfg("dcmfg")
    torch.manual_seed(0)
    model = create_model("dcmfg", cfg, DI, DT, C).eval()
    out = model(_feats(16), return_attention=True)
    assert len(out["attention"]) == cfg.model.layers
    for layer in out["attention"]:
        dst = layer["edge_index"][1]
        sums = torch.zeros(32, layer["alpha"].shape[1]).index_add_(0, dst, layer["alpha"])
        torch.testing.assert_close(sums, torch.ones_like(sums))


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
