"""What a chapter page shows besides its results (dcmfg.study.page), the forest plots of paired tables
(dcmfg.study.forest) and the API reference page's coverage of the library (book/api.md)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import nbformat
import numpy as np
import pandas as pd
import pytest
from markdown_it import MarkdownIt

from dcmfg import study
from dcmfg.study import forest, graphstudy, page, tables

REPO = Path(__file__).resolve().parents[1]
PAPERMILL = str(Path(sys.executable).with_name("papermill"))
# the chapters whose pages use the page header (the appendix, 11, has an owner of its own)
CHAPTERS = [nb for nb in study.notebook_names() if nb != "11-reproducibility"]


# ------------------------------------------------------------------------------------------ the page header
def test_the_header_names_what_differs_and_its_command_reproduces_the_values(tmp_path):
    nb = "05-graph"
    declared = page.declared_parameters(nb)
    values = {k: d["default"] for k, d in declared.items()}
    values.update(dataset="mirflickr25k", data_root="$DCMFG_DATA/mirflickr-mini", seeds=[0], epochs=2,
                  settings={"features.regions": 2}, switches=["csls", "static"])
    sentence = page.ran_with_sentence(values, declared)
    assert sentence.startswith("This page ran with data mirflickr25k from $DCMFG_DATA/mirflickr-mini; ")
    assert 'seeds = [0], epochs = 2, settings = {"features.regions": 2}, switches = ["csls", "static"]' in sentence
    assert "patience" not in sentence and "k_values" not in sentence  # defaults are not repeated
    defaults = {k: d["default"] for k, d in declared.items()}
    assert "every parameter at the notebook's default" in page.ran_with_sentence(defaults, declared)
    # the synthetic set's size matters only where the synthetic set may be used
    assert "synthetic_n" not in page.ran_with_sentence({**values, "synthetic_n": 300}, declared)
    assert "synthetic_n = 300" in page.ran_with_sentence({**defaults, "synthetic_n": 300}, declared)
    assert "synthetic_n" in page.changed({**defaults, "dataset": "synthetic", "synthetic_n": 300}, declared)

    # the command, run for real by papermill (prepare only), injects exactly the page's values
    command = page.papermill_command(nb, page.changed(values, declared))
    args = __import__("shlex").split(command)
    assert args[:3] == ["papermill", f"notebooks/{nb}.ipynb", "out.ipynb"]
    out = tmp_path / "out.ipynb"
    done = subprocess.run([PAPERMILL, str(REPO / args[1]), str(out), *args[3:], "--prepare-only"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = nbformat.read(out, as_version=4).cells
    params = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    injected = next(c for c in cells if "injected-parameters" in c.metadata.get("tags", []))
    ns: dict = {"Optional": Optional}
    before = set(ns)
    for cell in (params, injected):  # as the kernel runs them (without this module's `from __future__` flags)
        exec(compile(cell.source, "<cell>", "exec", dont_inherit=True), ns)
    assert study.check_parameters(ns, before) == values


def test_the_header_html_folds_the_command_and_every_parameter_away():
    declared = page.declared_parameters("04-benchmark")
    values = {**{k: d["default"] for k, d in declared.items()}, "seeds": [0], "epochs": 2}
    html = page.header_html("04-benchmark", values, declared)
    visible, folded = html.split("<details>", 1)
    assert "seeds = [0], epochs = 2" in visible and "<pre" not in visible and "<table" not in visible
    assert "papermill notebooks/04-benchmark.ipynb out.ipynb -p seeds &#x27;[0]&#x27; -p epochs 2" in folded
    assert folded.count("<tr><td><code>") == len(declared)  # every parameter, with its meaning
    assert page.header_html("04-benchmark", values, declared, omit=("seeds",)).count("<tr><td><code>") == len(declared) - 1


def test_every_chapter_shows_its_header_and_no_parameter_code_or_printed_sentence():
    for nb in CHAPTERS:
        cells = nbformat.read(REPO / "notebooks" / f"{nb}.ipynb", as_version=4).cells
        params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and "remove-cell" in params[0].metadata["tags"], f"{nb}: parameters cell shown"
        start = next(c for c in cells if "study.start(globals(), _before)" in c.source)
        lines = start.source.splitlines()
        at = lines.index("s = study.start(globals(), _before)")
        assert lines[at + 1] == f'page.header(globals(), "{nb}")', f"{nb}: the header must follow study.start"
        for c in cells:
            if c.cell_type == "code":
                assert not re.search(r"^\s*print\(", c.source, re.M), f"{nb}: computed text goes through page.prose"


def test_tag_injected_parameters_removes_papermills_cell_from_the_page(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x: int = 1", metadata={"tags": ["parameters", "remove-cell"]}),
                nbformat.v4.new_code_cell("x = 2", metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("x", metadata={})]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert page.tag_injected_parameters(path) and page.tag_injected_parameters(path)  # twice: tagged once
    cells = nbformat.read(path, as_version=4).cells
    assert cells[1].metadata["tags"] == ["injected-parameters", "remove-cell"]
    assert cells[0].metadata["tags"] == ["parameters", "remove-cell"] and "tags" not in cells[2].metadata
    nb.cells = nb.cells[2:]
    nbformat.write(nb, path)
    assert not page.tag_injected_parameters(path)


# ------------------------------------------------------------------------------------------ prose
def _rendered_text(markdown: str) -> str:
    html = MarkdownIt("commonmark").render(markdown)
    text = re.sub(r"<[^>]+>", "", html)
    return __import__("html").unescape(text).strip()


def test_computed_sentences_render_to_themselves_as_paragraphs_with_the_verdicts_in_bold():
    text = ("DCMFG - layers=0: I->T no detectable difference (+0.0123 [-0.0040, +0.0286], 5 seeds); "
            "T->I better (+0.0200 [+0.0100, +0.0300], 5 seeds).\nmutual_share *not* a_b_c # | `x` <b> $1 ~2")
    md = page.markdown_text(text)
    assert md.count("\n\n") == 1  # one paragraph per line
    assert "**no detectable difference**" in md and "**better**" in md
    html = MarkdownIt("commonmark").render(md)
    assert html.count("<p>") == 2 and "<em>" not in html and "<a" not in html and "<code>" not in html
    assert _rendered_text(md).replace("\n\n", "\n") == text
    assert _rendered_text(page.markdown_text(text, emphasise_verdicts=False)).replace("\n\n", "\n") == text


# ------------------------------------------------------------------------------------------ forest plots
def _reports(diff: dict, seeds=(0, 1, 2, 3, 4)) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for model, dists in (("dcmfg", ("cosine", "hamming")), ("linear", ("cosine",)), ("dcmh", ("hamming",))):
        for seed in seeds:
            summ = {d: {"map_i2t": 0.6 + diff.get(model, 0) + rng.normal(0, 0.01), "map_t2i": 0.6 + rng.normal(0, 0.01)}
                    for d in dists}
            out.append({"model": model, "seed": seed, "summaries": summ})
    return out


def test_forest_reads_headline_pairs_as_the_table_shows_them():
    pairs = tables.headline_pairs(_reports({"dcmfg": 0.05}), "dcmfg")
    data = forest.intervals(pairs)
    assert len(data) == len(pairs) == 4
    assert list(data["label"]) == ["dcmfg - linear (cosine)"] * 2 + ["dcmfg - dcmh (hamming)"] * 2
    assert list(data["measure"]) == ["I->T", "T->I"] * 2
    assert list(data["verdict"]) == list(pairs["verdict"]) and tables.BETTER in set(data["verdict"])
    for r, cell in zip(data.to_dict("records"), pairs["difference [95% t interval]"]):
        assert tables.format_interval({"n": 5, **{k: r[k] for k in ("mean",)}, "ci_low": r["low"],
                                       "ci_high": r["high"]}) == cell
        assert r["low"] <= r["mean"] <= r["high"]
    lines = forest.verdict_sentences(pairs)
    assert len(lines) == 2 and lines[0].startswith("dcmfg - linear (cosine): I->T better (+0.0")
    assert lines[0].endswith(", 5 seeds).")
    fig = forest.forest_figure(pairs, "dcmfg minus the other model")
    axes = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in axes] == ["I->T", "T->I"]
    ticks = sorted(zip(axes[0].get_yticks(), [t.get_text() for t in axes[0].get_yticklabels()]))
    # the first row on top; the side every comparison shares ("dcmfg - ") is left to the axis label
    assert [t for _, t in ticks] == ["dcmh (hamming)", "linear (cosine)"]
    assert fig.get_supxlabel() == "dcmfg minus the other model"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("better") for t in legend) and all(t.split(" (")[0] in set(data["verdict"]) for t in legend)
    lo, hi = axes[0].get_xlim()
    assert lo < 0 < hi and np.isclose(-lo, hi)  # zero in the middle
    __import__("matplotlib.pyplot").pyplot.close(fig)


def test_forest_reads_the_graph_chapters_wide_tables_and_single_seeds():
    rows = [{"variant": v, "seed": s, "val mAP": 0.5 + 0.01 * s + (0.03 if v == "static" else 0.0),
             "query mutual share": 0.5, "bank mutual share": 0.5, "bank hubness": 1.0, "I->T": 0.6 + 0.001 * s,
             "T->I": 0.6} for v in ("default", "static", "csls") for s in range(3)]
    frame = pd.DataFrame(rows)
    table = graphstudy.switch_table(frame, "default")
    assert forest.is_paired(table)
    data = forest.intervals(table)
    assert list(data["label"]) == ["static - default", "csls - default"]  # the reference row has nothing to pair
    assert list(data["measure"]) == ["val mAP"] * 2
    assert data["mean"].round(4).tolist() == [0.03, 0.0]
    versus = graphstudy.versus(frame, "default", ["I->T", "T->I"])
    assert sorted(set(forest.intervals(versus)["measure"])) == ["I->T", "T->I"]
    one = forest.intervals(graphstudy.switch_table(frame[frame["seed"] == 0], "default"))
    assert set(one["verdict"]) == {tables.NO_INTERVAL} and one["low"].isna().all() and one["mean"].notna().all()
    controls = graphstudy.paired_against(frame.rename(columns={"variant": "arm"}), "default")
    assert forest.intervals(controls)["label"].tolist()[:2] == ["default - static"] * 2
    assert not forest.is_paired(frame)
    with pytest.raises(ValueError, match="no paired difference"):
        forest.forest_figure(table.iloc[:1], "x")
    with pytest.raises(ValueError, match="not an interval cell"):
        forest.parse_interval("better")


# ------------------------------------------------------------------------------------------ the API page
API_PACKAGES = ["dcmfg.data", "dcmfg.features", "dcmfg.graph", "dcmfg.models", "dcmfg.engine", "dcmfg.metrics",
                "dcmfg.search", "dcmfg.config", "dcmfg.choices"]


def public_modules() -> list[str]:
    """The library's public modules: the packages above and their modules, minus _private ones and the `cli`
    glue of a package (the command line documents itself)."""
    out = []
    for name in API_PACKAGES:
        out.append(name)
        mod = importlib.import_module(name)
        if hasattr(mod, "__path__"):
            out += [f"{name}.{m.name}" for m in pkgutil.iter_modules(mod.__path__)
                    if not m.name.startswith("_") and m.name != "cli"]
    return out


def own_names(module: str) -> set[str]:
    """Public functions and classes a module defines itself."""
    mod = importlib.import_module(module)
    return {k for k, v in vars(mod).items() if not k.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
            and getattr(v, "__module__", None) == module}


def api_directives(text: str) -> dict[str, set[str]]:
    """book/api.md's automodule directives: {module: names excluded}."""
    found = {}
    for m in re.finditer(r"\.\. automodule:: (\S+)\n((?:   :[^\n]*\n)*)", text):
        options = m.group(2)
        excl = re.search(r":exclude-members: ([^\n]*)", options)
        found[m.group(1)] = {x.strip() for x in excl.group(1).split(",")} if excl else set()
    return found


def documented(directives: dict[str, set[str]]) -> dict[str, str]:
    """{qualified name autodoc gives it: the object's own module.name} for every function and class on the page."""
    out = {}
    for module, excluded in directives.items():
        mod = importlib.import_module(module)
        names = getattr(mod, "__all__", None) if hasattr(mod, "__path__") else None
        candidates = set(names) if names is not None else own_names(module)
        for name in sorted(candidates - excluded):
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out[f"{module}.{name}"] = f"{obj.__module__}.{obj.__qualname__}"
    return out


def test_the_api_page_documents_every_public_module_and_each_function_once():
    directives = api_directives((REPO / "book" / "api.md").read_text())
    missing = [m for m in public_modules() if m not in directives]
    assert not missing, f"book/api.md lacks {missing}: add an automodule block for each (see its other sections)"
    assert all(m.split(".")[0] == "dcmfg" and not m.startswith("dcmfg.study") for m in directives)
    docs = documented(directives)
    owners: dict[str, list[str]] = {}
    for shown, own in docs.items():
        owners.setdefault(own, []).append(shown)
    twice = {k: v for k, v in owners.items() if len(v) > 1}
    assert not twice, f"documented twice (exclude the re-exported names in the module's block): {twice}"
    for module in public_modules():
        for name in own_names(module):
            obj = getattr(importlib.import_module(module), name)
            assert f"{obj.__module__}.{obj.__qualname__}" in owners, f"{module}.{name} is not on the API page"
    assert "dcmfg.metrics.mean_average_precision" in docs and "dcmfg.engine.train.train" in docs
    assert "dcmfg.search.search" in docs and "dcmfg.data.load_dataset" in docs
