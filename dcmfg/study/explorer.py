"""The search explorer: what a query retrieves from one or two trained runs, and why, in the book and live.

- `show_queries`: the book's static output for fixed queries (`example_queries`): each run's results side by
  side, the region-word map of one result and the query's neighbourhood in the inference graph;
- `Explorer`: the live JupyterLab app (ipywidgets) on the same views.

The views themselves (HTML strings built from `dcmfg.search` results) are `dcmfg.study.search_views`.
"""

from __future__ import annotations

import contextlib
import io

import ipywidgets as W
from IPython.display import HTML, display
from PIL import Image

from dcmfg import search as Q
from dcmfg.errors import DcmfgError
# the views, also reachable as `explorer.<name>`
from dcmfg.study.search_views import (ERROR_CLASS, compare_html, distance_for, error_html, esc,  # noqa: F401
                                      neighbourhood_html, query_html, region_word_html, results_html)


# ---------------------------------------------------------------------------------------------- the book


def show_queries(runs: dict, queries: list[dict], top: int = 8, distance: str | None = None,
                 detail_rank: int = 1, size: int = 112) -> None:
    """Static output of the explorer for fixed queries: per query, each run's results side by side (the first two
    runs compared), the region-word map of result `detail_rank` and the query's neighbourhood for the first run.

    runs: {display name: run folder or loaded Run}; queries: [{"text": ...} | {"image": path} | {"item": id,
    "against": "texts"}, ...] (the keyword arguments of `dcmfg.search.search`).
    """
    loaded = {name: r if isinstance(r, Q.Run) else Q.cached_run(r) for name, r in runs.items()}
    names = list(loaded)
    for spec in queries:
        results = {}
        for name in names:
            try:
                results[name] = Q.search(loaded[name], top=top, distance=distance_for(loaded[name], distance),
                                         **spec)
            except DcmfgError as exc:
                display(HTML(error_html(f"{name}: {exc}")))
        if not results:
            continue
        first = results[names[0]] if names[0] in results else next(iter(results.values()))
        parts = [query_html(first)]
        if len(results) >= 2:
            (na, a), (nb_, b) = list(results.items())[:2]
            parts.append(compare_html(a, b, size, names=(na, nb_)))
            parts += [results_html(r, size - 16, title=n) for n, r in list(results.items())[2:]]
        else:
            parts.append(results_html(first, size - 16, title=names[0]))
        parts.append(region_word_html(first, detail_rank))
        parts.append(neighbourhood_html(first))
        display(HTML('<div class="dcmfg-explorer-static" style="margin:1.5em 0">' + "".join(parts) + "</div>"))


def example_queries(runs: dict, texts=(), query_items: int = 0) -> list[dict]:
    """The book's fixed queries: each text, then the images of the first `query_items` items of the first run's
    query split (items no run was trained on) against texts."""
    first = Q.cached_run(next(iter(runs.values())))
    items = [str(first.dataset.ids[int(i)]) for i in first.data.part("query")[: int(query_items)]]
    return [{"text": str(t)} for t in texts] + [{"item": i, "against": "texts"} for i in items]


# ---------------------------------------------------------------------------------------------- the live explorer


class Explorer:
    """ipywidgets app: pick one or two runs, type a text (or upload an image, or name a dataset item), choose
    cosine or Hamming ranking; see the results, and for a selected result the region-word map and the query's
    neighbourhood. `Explorer(runs).widget` is what a notebook displays."""

    def __init__(self, runs: dict, text: str = "", top: int = 8, size: int = 112):
        if not runs:
            raise DcmfgError("the explorer needs at least one run folder")
        self.runs = dict(runs)
        self.size = size
        self._image = None  # an uploaded PIL image
        names = list(self.runs)
        self.run_a = W.Dropdown(options=names, value=names[0], description="run")
        self.run_b = W.Dropdown(options=["(none)"] + names, value=names[1] if len(names) > 1 else "(none)",
                                description="compare")
        self.kind = W.ToggleButtons(options=["text", "image", "item"], value="text", description="query")
        self.text = W.Text(value=text, placeholder="type a query, then Enter", description="text",
                           continuous_update=False, layout=W.Layout(width="420px"))
        self.text.add_class("dcmfg-query-text")
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="image")
        # suggestions: the query split of the first run (items none of the runs was trained on)
        first = Q.cached_run(self.runs[names[0]])
        suggest = [str(first.dataset.ids[int(i)]) for i in first.data.part("query")[:2000]]
        self.item = W.Combobox(value="", options=suggest, placeholder="dataset item id (query split suggested)",
                               description="item", ensure_option=False, continuous_update=False)
        self.against = W.ToggleButtons(options=["auto", "images", "texts"], value="auto", description="against")
        self.distance = W.ToggleButtons(options=[("run's own", ""), ("cosine", "cosine"), ("hamming", "hamming")],
                                        value="", description="ranking")
        self.top = W.IntSlider(value=top, min=1, max=50, description="top")
        self.detail = W.Dropdown(options=[("result 1", 1)], value=1, description="inspect")
        self.status = W.HTML()
        self.status.add_class("dcmfg-explorer-status")
        self.results = W.HTML()
        self.results.add_class("dcmfg-explorer-results")
        self.details = W.HTML()
        self.details.add_class("dcmfg-explorer-details")
        self._last: dict = {}
        self._hold = False
        for w in (self.run_a, self.run_b, self.kind, self.text, self.item, self.against, self.distance, self.top):
            w.observe(self._on_change, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.detail.observe(self._on_detail, names="value")
        self.widget = W.VBox([
            W.HBox([self.run_a, self.run_b]),
            W.HBox([self.kind, self.distance]),
            W.HBox([self.text, self.upload, self.item]),
            W.HBox([self.against, self.top]),
            self.status, self.results,
            self.detail, self.details,
        ])
        self.widget.add_class("dcmfg-explorer")
        if text:
            self.refresh()

    # -- events ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _quiet(self):
        """Set widgets without each change starting its own search."""
        self._hold = True
        try:
            yield
        finally:
            self._hold = False

    def _on_change(self, change) -> None:
        if self._hold:
            return
        with self._quiet():
            if change["owner"] is self.text:
                self.kind.value = "text"  # typing a text means a text query
            elif change["owner"] is self.item:
                self.kind.value = "item"
        self.refresh()

    def _on_upload(self, change) -> None:
        files = change["new"]  # ipywidgets 8: a tuple of {name, type, size, content, last_modified}
        if not files:
            return
        try:
            self._image = Image.open(io.BytesIO(bytes(files[0]["content"]))).convert("RGB")
        except Exception as exc:  # a file that is not an image: say so in the widget
            self._image = None
            self.status.value = error_html(f"{files[0].get('name', 'upload')}: cannot read the image ({exc})")
            self.results.value = self.details.value = ""
            return
        with self._quiet():
            self.kind.value = "image"
        self.refresh()

    def _on_detail(self, change=None) -> None:
        if self._hold:
            return
        res = self._last.get("a")
        if res is None:
            self.details.value = ""
            return
        rank = int(self.detail.value or 1)
        head = (f'<div class="dcmfg-detail-head" style="font-weight:bold">result {rank} '
                f'({esc(res.table["id"].iloc[rank - 1])}) for the query {esc(res.query.description)}</div>')
        try:
            self.details.value = head + region_word_html(res, rank) + neighbourhood_html(res)
        except DcmfgError as exc:
            self.details.value = error_html(str(exc))

    # -- searching ---------------------------------------------------------------------------------------
    def query_spec(self) -> dict | None:
        kind = self.kind.value
        if kind == "text":
            return {"text": self.text.value} if self.text.value.strip() else None
        if kind == "image":
            return {"image": self._image} if self._image is not None else None
        return {"item": self.item.value.strip()} if self.item.value.strip() else None

    def search(self, name: str):
        spec = self.query_spec()
        run = Q.cached_run(self.runs[name])
        against = None if self.against.value == "auto" else self.against.value
        return Q.search(run, top=int(self.top.value), against=against,
                        distance=distance_for(run, self.distance.value), **spec)

    def refresh(self) -> None:
        """Run the current query on the chosen run(s) and redraw results and details."""
        self._last = {}
        if self.query_spec() is None:
            self.status.value = '<span style="color:#555">type a query, upload an image or name an item</span>'
            self.results.value = ""
            self.details.value = ""
            return
        self.status.value = '<span style="color:#555">searching ...</span>'
        self.details.value = ""  # never the old query's details beside the new results
        try:
            a = self.search(self.run_a.value)
            b = self.search(self.run_b.value) if self.run_b.value not in ("(none)", self.run_a.value) else None
        except DcmfgError as exc:
            self.status.value = error_html(str(exc))
            self.results.value = ""
            self.details.value = ""
            return
        self._last = {"a": a, "b": b}
        note = ""
        if self.distance.value == "hamming" and a.distance != "hamming":
            note = " (this run has no hash head: ranked by cosine)"
        self.status.value = query_html(a, self.size) + (f'<div style="font-size:0.8em">{note}</div>' if note else "")
        self.results.value = (compare_html(a, b, self.size, (self.run_a.value, self.run_b.value)) if b is not None
                              else results_html(a, self.size, title=self.run_a.value))
        with self._quiet():
            self.detail.options = [(f"result {r} ({i})", r) for r, i in zip(a.table["rank"], a.table["id"])]
            self.detail.value = 1
        self._on_detail()
