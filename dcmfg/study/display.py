"""What a notebook shows: figures and tables as self-contained HTML (offline, no external file), and the warning
banner of pages built from the synthetic set."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
from IPython.display import HTML, display

if TYPE_CHECKING:
    from dcmfg.study.study import DataChoice


def png_data_uri(fig, dpi: int) -> str:
    """A matplotlib figure as a PNG data URI (tight bounding box); the figure is closed, so a notebook does not
    draw it a second time."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def show_figure(fig, caption: str, name: str = "") -> None:
    """Display a matplotlib figure as one self-contained <figure> with its caption (offline, no external file)."""
    src = png_data_uri(fig, dpi=110)
    alt = html.escape(caption.split(".")[0], quote=True)
    ident = f' id="{html.escape(name, quote=True)}"' if name else ""
    display(HTML(
        f'<figure class="dcmfg-figure"{ident} style="margin:1em 0"><img alt="{alt}" style="max-width:100%" '
        f'src="{src}"/><figcaption style="font-size:0.9em;color:#333">'
        f"<b>Figure.</b> {html.escape(caption)}</figcaption></figure>"
    ))


def table_html(df, caption: str, precision: int = 4, index: bool = False, css_class: str = "dcmfg-table") -> str:
    """A pandas table in the book's markup: captioned (protocol, metric variant, seeds, data size), `precision`
    decimals, missing values as '-'."""
    styler = df.style.format(precision=precision, na_rep="-").set_caption(caption)
    if not index:
        styler = styler.hide(axis="index")
    styler = styler.set_table_attributes(f'class="{css_class}"').set_table_styles(
        [{"selector": "caption", "props": "caption-side: top; text-align: left; font-weight: normal; color: #333"}]
    )
    return styler.to_html()


def show_table(df, caption: str, precision: int = 4, index: bool = False) -> None:
    """Display a pandas table with a caption that states protocol, metric variant, seeds and data size."""
    display(HTML(table_html(df, caption, precision, index)))


def banner_html(choice: DataChoice | dict) -> str:
    """A visible warning for pages built from the synthetic set (empty for real data)."""
    c = choice if isinstance(choice, dict) else asdict(choice)
    if not c["synthetic"]:
        return ""
    return (
        '<div class="admonition warning dcmfg-synthetic-banner"><p class="admonition-title">Synthetic data</p>'
        f"<p>These results come from the procedural <b>synthetic</b> set ({c['reason']}). They exercise the "
        "pipeline only and say nothing about MIRFlickr or NUS-WIDE. Set <code>DCMFG_DATA</code> to a folder holding "
        "a real dataset and rerun <code>dcmfg study run</code>.</p></div>"
    )
