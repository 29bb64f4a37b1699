"""The built book read in a real browser at 1400 px (headless Debian Chromium driven by chromium-driver and Selenium,
nothing downloaded): every chapter fits its column, the computed sentences are prose, every table of paired
differences has its forest plot, no parameter code stands above a chapter's first result, the worked example ran,
and the API page lists the library's public functions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dcmfg import study

from test_page import api_directives, documented

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1400, 1000
CHAPTERS = study.notebook_names()
OWN = [nb for nb in CHAPTERS if nb != "11-reproducibility"]  # the pages that use dcmfg.study.page


def _browser() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="session")
def quick_book(quick_study):
    """The session's quick book (conftest.py: built once for every book test)."""
    if _browser() is None:
        pytest.skip("chromium and chromium-driver not installed (make browser installs them)")
    return quick_study[0]


@pytest.fixture(scope="module")
def browser(quick_book, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", f"--window-size={WIDTH},{HEIGHT}"):
        opts.add_argument(flag)
    b = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    b.set_window_size(WIDTH, HEIGHT)
    yield b
    b.quit()


def _open(browser, html: Path, page: str) -> None:
    browser.get((html / f"{page}.html").resolve().as_uri())
    browser.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")  # measure folded parts too


# Everything in the main column that is wider than its box: a scroll container whose content is wider than it (a
# column behind a scrollbar), or an element reaching past the column's right edge. Code inputs may scroll: they are
# code, hidden behind their toggles on the chapters.
_OVERFLOW = """
const article = document.querySelector('article.bd-article') || document.querySelector('main');
const edge = article.getBoundingClientRect().right + 1;
const out = [];
if (document.documentElement.scrollWidth > window.innerWidth + 1)
    out.push('page ' + document.documentElement.scrollWidth + ' > ' + window.innerWidth);
article.querySelectorAll('*').forEach(e => {
    if (e.closest('.cell_input, div.highlight-ipython3, div.highlight-python')) return;
    const s = getComputedStyle(e);
    if (s.display === 'none' || e.getClientRects().length === 0) return;
    const name = e.tagName.toLowerCase() + (e.className && typeof e.className === 'string' ? '.' + e.className.split(' ').join('.') : '');
    if (['auto', 'scroll'].includes(s.overflowX) && e.scrollWidth > e.clientWidth + 1)
        out.push(name + ' scrolls ' + e.scrollWidth + ' > ' + e.clientWidth + ': ' + (e.innerText || '').slice(0, 80));
    else if (e.getBoundingClientRect().right > edge && !e.closest('[style*="overflow"]'))
        out.push(name + ' ends at ' + Math.round(e.getBoundingClientRect().right) + ' > ' + Math.round(edge) + ': '
                 + (e.innerText || '').slice(0, 80));
});
return out.slice(0, 8);
"""


@pytest.mark.slow
def test_every_page_fits_its_column_at_1400_px(quick_book, browser):
    html = Path(quick_book.html_dir)
    for page in ["intro", *[f"chapters/{nb}" for nb in CHAPTERS], "api"]:
        _open(browser, html, page)
        assert browser.execute_script("return window.innerWidth") >= WIDTH - 20
        problems = browser.execute_script(_OVERFLOW)
        assert not problems, f"{page}: content wider than the main column at {WIDTH} px: {problems}"


@pytest.mark.slow
def test_chapters_open_with_their_question_and_first_result_and_read_as_prose(quick_book, browser):
    html = Path(quick_book.html_dir)
    for nb in OWN:
        _open(browser, html, f"chapters/{nb}")
        page = browser.execute_script("""
            const a = document.querySelector('article.bd-article');
            const header = a.querySelector('.dcmfg-page-header');
            const first = a.querySelector('.cell_output figure, .cell_output table.dcmfg-table, .cell_output .dcmfg-explorer, .cell_output p');
            return {
                header: header ? header.innerText : '',
                headerTop: header ? header.getBoundingClientRect().top : -1,
                firstTop: first ? first.getBoundingClientRect().top + window.scrollY : -1,
                h1: (a.querySelector('h1') || {innerText: ''}).innerText,
                parameters: a.querySelectorAll('.tag_parameters, .tag_injected-parameters').length,
                shownCode: Array.from(a.querySelectorAll('.cell_input')).filter(e => e.offsetParent !== null
                    && !e.closest('details') && e.getBoundingClientRect().top < (first ? first.getBoundingClientRect().top : 0)).length,
                streams: Array.from(a.querySelectorAll('.cell_output .output.stream')).map(e => e.innerText.slice(0, 120)),
            };""")
        assert page["h1"], f"{nb}: no title"
        assert page["header"].startswith("This page ran with"), f"{nb}: no page header"
        assert "papermill notebooks/" + nb + ".ipynb out.ipynb" in page["header"]  # the command (folded out here)
        assert page["parameters"] == 0, f"{nb}: a parameter cell is on the page"
        assert page["streams"] == [], f"{nb}: printed output instead of prose: {page['streams']}"
        if nb != "12-library":  # the worked example shows its code on purpose
            assert page["shownCode"] == 0, f"{nb}: code above the first result"
        if nb in ("04-benchmark", "05-graph"):
            assert 0 < page["firstTop"] < HEIGHT, f"{nb}: the first result starts at {page['firstTop']} px, below the fold"

    _open(browser, html, "chapters/05-graph")
    note = browser.execute_script("""
        const s = document.querySelector('section#closing-note');
        return Array.from(s.querySelectorAll('p')).map(p => ({text: p.innerText, pre: !!p.closest('pre'),
                                                                  width: p.getBoundingClientRect().width}));""")
    sentences = [p for p in note if p["text"].startswith(("Against the same model", "Scored without its graph",
                                                          "Against the loss-matched linear baseline"))]
    assert len(sentences) == 3 and not any(p["pre"] for p in sentences), note
    assert all(p["width"] <= WIDTH for p in sentences)


@pytest.mark.slow
def test_every_paired_table_has_its_forest_plot(quick_book, browser):
    html = Path(quick_book.html_dir)
    counts = {}
    for nb in CHAPTERS:
        _open(browser, html, f"chapters/{nb}")
        found = browser.execute_script("""
            const out = [];
            document.querySelectorAll('article table').forEach(t => {
                if (!/95% t interval/.test(t.querySelector('thead') ? t.querySelector('thead').innerText : '')) return;
                const cell = t.closest('.cell_output');
                const fig = cell ? cell.querySelector('figure.dcmfg-figure[id^="forest-"] img[src^="data:image/png"]') : null;
                out.push({figure: !!fig, folded: !!t.closest('details.dcmfg-paired'), caption: (t.caption || {innerText: ''}).innerText.slice(0, 80)});
            });
            return out;""")
        assert all(f["figure"] and f["folded"] for f in found), f"{nb}: a paired table without its forest plot: {found}"
        counts[nb] = len(found)
    assert counts["04-benchmark"] >= 1 and counts["05-graph"] >= 2 and counts["06-ablations"] >= 1, counts


@pytest.mark.slow
def test_the_worked_example_ran_and_the_api_page_lists_the_public_functions(quick_book, browser):
    html = Path(quick_book.html_dir)
    _open(browser, html, "chapters/12-library")
    example = browser.execute_script("""
        const a = document.querySelector('article.bd-article');
        return {code: a.querySelectorAll('.cell_input').length, text: a.innerText,
                errors: a.querySelectorAll('.output.traceback, .output.error').length,
                results: a.querySelectorAll('table.dcmfg-table tbody tr').length};""")
    assert example["errors"] == 0 and example["code"] >= 4 and example["results"] >= 1
    assert "Query mAP@all of that checkpoint" in example["text"] and "Embedded" in example["text"]

    _open(browser, html, "api")
    shown = set(browser.execute_script(
        "return Array.from(document.querySelectorAll('dt.sig[id]')).filter(e => e.offsetParent !== null).map(e => e.id)"))
    expected = set(documented(api_directives((REPO / "book" / "api.md").read_text())))
    missing = sorted(expected - shown)
    assert not missing, f"the API page lacks {len(missing)} public names, e.g. {missing[:8]}"
    for name in ("dcmfg.data.load_dataset", "dcmfg.engine.train.train", "dcmfg.metrics.mean_average_precision",
                 "dcmfg.search.search", "dcmfg.config.load_config"):
        assert name in shown
