"""What a chapter page shows besides its results: what it ran with, the command that reproduces it, and the sentences
its code computes, rendered as prose.

A chapter's first code cell calls, right after `study.start`,

    page.header(globals(), "05-graph")

which shows one short line naming the parameters whose values differ from the notebook's own defaults (the
`parameters` cell; the defaults are the published study's values), and, collapsed under it, the `papermill` command
that reproduces the page and every parameter with its value, default and meaning. The parameters cell itself carries
the Jupyter Book tag `remove-cell`, and `tag_injected_parameters` gives papermill's injected cell the same tag, so no
parameter code stands between a chapter's question and its first result.

`prose(text)` renders a sentence that code computed (a verdict, a closing note, a count) as Markdown: wrapped like
the rest of the page, never a monospace box. `command_block(lines)` shows commands a reader copies (wrapped, not
scrolled), `collapsed_table` a long table under a one-line summary, `table_html` the book's table markup.
"""

from __future__ import annotations

import ast
import html
import json
import re
import shlex
from pathlib import Path

import nbformat
from IPython.display import HTML, Markdown, display

from dcmfg.fileio import write_text_atomic
from dcmfg.study.display import table_html
from dcmfg.study.repo import repo_dir, shown_path
from dcmfg.study.stats import BETTER, NO_DIFFERENCE, WORSE

# Jupyter Book (myst-nb) removes a cell with this tag from the page, source and outputs.
REMOVE = "remove-cell"
INJECTED = "injected-parameters"  # papermill's tag on the cell it inserts
DATA_PARAMETERS = ("dataset", "data_root")  # the runner resolves these for every chapter: named apart in the line
SYNTHETIC_PARAMETERS = ("synthetic_n", "synthetic_seed")


def notebook_path(notebook: str) -> Path:
    """notebooks/<notebook>.ipynb of the source checkout."""
    return repo_dir() / "notebooks" / f"{notebook}.ipynb"


def declared_parameters(notebook: str) -> dict:
    """The `parameters` cell of a notebook as papermill reads it: {name: {"default": value, "type": str, "help": str}},
    in the cell's order; defaults are the literals the cell assigns."""
    import papermill as pm  # inside: the runner imports this module, and papermill only where it is used

    path = notebook_path(notebook)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such notebook (page.header names the notebook it is called from)")
    return {name: {"default": ast.literal_eval(p["default"]), "type": p["inferred_type_name"], "help": p["help"]}
            for name, p in pm.inspect_notebook(str(path)).items()}


def run_values(namespace: dict, declared: dict) -> dict:
    """The value of every declared parameter in the kernel (after papermill's injection and the study's check)."""
    return {name: namespace[name] for name in declared if name in namespace}


def changed(values: dict, declared: dict, omit=()) -> dict:
    """The parameters whose value differs from the notebook's default, in declaration order; the synthetic set's
    size and seed only where the synthetic set may be used (a named real dataset never reads them)."""
    unused = SYNTHETIC_PARAMETERS if values.get("dataset", "auto") not in ("auto", "synthetic") else ()
    return {k: v for k, v in values.items()
            if k not in omit and k not in unused and k in declared and v != declared[k]["default"]}


def cli_value(value) -> str:
    """A value as `papermill -p NAME VALUE` takes it: strings as they are, everything else as JSON (the study reads a
    string given for a list, dict, number or None as YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def papermill_command(notebook: str, values: dict, out: str = "out.ipynb") -> str:
    """`papermill notebooks/<notebook>.ipynb out.ipynb -p NAME VALUE ...`, run from the repository root."""
    args = " ".join(f"-p {k} {shlex.quote(cli_value(v))}" for k, v in values.items())
    return f"papermill notebooks/{notebook}.ipynb {out} {args}".rstrip()


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def ran_with_sentence(values: dict, declared: dict, omit=()) -> str:
    """One sentence (plain text) naming what the page ran with: the data, then each non-default parameter."""
    diff = changed(values, declared, omit)
    data = {k: diff.pop(k) for k in DATA_PARAMETERS if k in diff}
    parts = []
    if data:
        where = f" from {data['data_root']}" if data.get("data_root") else ""
        parts.append(f"data {data.get('dataset', values.get('dataset', ''))}{where}".strip())
    if diff:
        parts.append(", ".join(f"{k} = {_shown(v)}" for k, v in diff.items()))
        rest = "every other parameter at the notebook's default (the published study's value)"
    else:
        rest = "every parameter " + ("else " if data else "") + "at the notebook's default (the published study's value)"
    return "This page ran with " + "; ".join(parts + [rest]) + "."


def header_html(notebook: str, values: dict, declared: dict, omit=()) -> str:
    """The page header: the ran-with sentence, and under it (collapsed) the reproducing command and a table of every
    parameter with this run's value, its default and its meaning."""
    diff = changed(values, declared, omit)
    command = papermill_command(notebook, diff)
    rows = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(d['type'])}</td>"
        f"<td><code>{html.escape(_shown(values.get(k, d['default'])))}</code>{' (changed)' if k in diff else ''}</td>"
        f"<td><code>{html.escape(_shown(d['default']))}</code></td><td>{html.escape(d['help'])}</td></tr>"
        for k, d in declared.items() if k not in omit)
    return (
        '<div class="dcmfg-page-header">'
        f"<p>{html.escape(ran_with_sentence(values, declared, omit))}</p>"
        "<details><summary>Reproduce this page: the command and every parameter</summary>"
        "<p>From the repository root, with <code>DCMFG_DATA</code> naming the folder that holds the dataset folders "
        "(a run or a split this page used is read back from the cache, anything else is computed):</p>"
        f'<pre class="dcmfg-command">{html.escape(command)}</pre>'
        '<table class="dcmfg-table dcmfg-parameters"><thead><tr><th>parameter</th><th>type</th><th>this page</th>'
        f"<th>default</th><th>meaning</th></tr></thead><tbody>{rows}</tbody></table>"
        "</details></div>"
    )


def header(namespace: dict, notebook: str, omit=()) -> None:
    """Show the page header of `notebook` (its file name without .ipynb) from the kernel's parameter values.

    omit: parameters the runner fills in that a reader does not set (e.g. the appendix's `timings`)."""
    declared = declared_parameters(notebook)
    display(HTML(header_html(notebook, run_values(namespace, declared), declared, omit)))


# --------------------------------------------------------------------------------------------- prose
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~$])")
_VERDICTS = re.compile(rf"\b({re.escape(NO_DIFFERENCE)}|{BETTER}|{WORSE})\b")


def markdown_text(text: str, emphasise_verdicts: bool = True) -> str:
    """Computed text as Markdown that renders to exactly that text: characters Markdown would read as markup are
    escaped, each line becomes a paragraph, and the verdict words of dcmfg.study.tables are set in bold."""
    paragraphs = []
    for line in str(text).splitlines():
        if not line.strip():
            continue
        line = _MARKDOWN_SPECIAL.sub(r"\\\1", line.strip())
        if emphasise_verdicts:
            line = _VERDICTS.sub(r"**\1**", line)
        paragraphs.append(line)
    return "\n\n".join(paragraphs)


def prose(text: str, emphasise_verdicts: bool = True) -> None:
    """Render a sentence (or lines of sentences) that code computed as Markdown prose on the page."""
    display(Markdown(markdown_text(text, emphasise_verdicts)))


def command_block(lines, intro: str = "") -> None:
    """Commands a reader copies, one per line, wrapped to the column (a long command never hides behind a scrollbar)."""
    text = "\n".join(lines)
    lead = f"<p>{html.escape(intro)}</p>" if intro else ""
    display(HTML(f'{lead}<pre class="dcmfg-command">{html.escape(text)}</pre>'))


# --------------------------------------------------------------------------------------------- tables
def details_html(summary: str, body: str, css_class: str = "dcmfg-details") -> str:
    """A collapsed block: `summary` is the one line shown, `body` (HTML) opens under it."""
    return f'<details class="{css_class}"><summary>{html.escape(summary)}</summary>{body}</details>'


def collapsed_table(df, caption: str, summary: str, precision: int = 4, index: bool = False) -> None:
    """Show a long table collapsed under a one-line summary (the caption stays with the table)."""
    display(HTML(details_html(summary, table_html(df, caption, precision, index))))


# --------------------------------------------------------------------------------------------- the runner's hook
def tag_injected_parameters(path) -> bool:
    """Give papermill's injected-parameters cell of an executed notebook the `remove-cell` tag (the page header
    shows what it set), and make papermill's record of the input and output paths repository-relative (the book
    offers the notebook for download), in place; returns whether the notebook had such a cell."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    found = False
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if INJECTED in tags:
            found = True
            if REMOVE not in tags:
                cell.metadata["tags"] = [*tags, REMOVE]
    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if meta.get(key):
            where = Path(meta[key])
            if where.name.startswith(".") and where.name.endswith(".running.ipynb"):  # the runner's temporary name
                where = where.with_name(where.name[1:].removesuffix(".running.ipynb") + ".ipynb")
            meta[key] = shown_path(where)
    if found or meta:
        write_text_atomic(path, nbformat.writes(nb))
    return found
