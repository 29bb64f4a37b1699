"""The explorer notebook in a real browser: JupyterLab on 127.0.0.1 (token, temporary settings and runtime folders),
driven by headless Debian Chromium through chromium-driver and Selenium (nothing is downloaded)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "10-explorer.ipynb"


def _browser() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_lab(root: Path, tmp: Path, token: str) -> tuple[subprocess.Popen, str]:
    """JupyterLab serving `root`, with every config/runtime/settings folder under `tmp` (the user's own settings
    and workspaces are neither read nor written)."""
    port = _free_port()
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                     ("IPYTHONDIR", "ipython")):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / sub)
    # no "get notified about Jupyter news?" prompt over the page
    notes = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    notes.mkdir(parents=True, exist_ok=True)
    (notes / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly", "--ServerApp.open_browser=False"]
    if os.getuid() == 0:  # CI and containers run as root
        cmd.append("--allow-root")
    log = open(tmp / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited: {(tmp / 'lab.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise AssertionError(f"JupyterLab did not answer within 60 s: {(tmp / 'lab.log').read_text()[-2000:]}")


def _chrome(chromium: str, driver: str, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,1800"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def _thumbs(browser) -> list[str]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('.dcmfg-explorer .dcmfg-explorer-results img.dcmfg-thumb'))"
        ".map(e => e.getAttribute('src'))")


def _details_head(browser) -> str:
    return browser.execute_script(
        "const e = document.querySelector('.dcmfg-explorer .dcmfg-detail-head'); return e ? e.innerText : ''")


def _problems(browser) -> list[str]:
    """Error outputs, widget errors and the explorer's own error boxes visible on the page."""
    return browser.execute_script("""
        const out = [];
        document.querySelectorAll('[data-mime-type="application/vnd.jupyter.error"], .dcmfg-explorer-error')
            .forEach(e => out.push(e.innerText.slice(0, 300)));
        document.querySelectorAll('.jp-OutputArea-output').forEach(e => {
            if (/Error displaying widget|Failed to load model class|Traceback/.test(e.innerText))
                out.push(e.innerText.slice(0, 300)); });
        return out;""")


@pytest.mark.slow
def test_explorer_notebook_runs_in_jupyterlab_and_answers_a_typed_query(mirflickr_root, tmp_path):
    found = _browser()
    if found is None:
        pytest.skip("chromium and chromium-driver not installed (make browser installs them)")
    pytest.importorskip("selenium")
    pytest.importorskip("ipywidgets")
    import papermill as pm
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from test_explore import trained_run

    run = trained_run(mirflickr_root, "dcmfg")
    served = tmp_path / "lab"
    served.mkdir()
    # the repo's notebook with this test's run and one example query injected (papermill, not executed here)
    pm.execute_notebook(str(NOTEBOOK), str(served / "explorer.ipynb"), prepare_only=True, progress_bar=False,
                        parameters={"runs": {"dcmfg": str(run)}, "texts": ["sunset over the sea"],
                                    "query_items": 0, "top": 6})
    token = secrets.token_hex(16)
    lab, url = _start_lab(served, tmp_path / "jupyter", token)
    browser = None
    try:
        browser = _chrome(*found, tmp_path / "chromium-profile")
        browser.get(f"{url}/lab/tree/explorer.ipynb?token={token}&reset")
        wait = WebDriverWait(browser, 90, poll_frequency=0.5)
        wait.until(lambda b: b.execute_script(
            "const a = window.jupyterapp; const w = a && a.shell.currentWidget;"
            "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
            " && w.sessionContext.session.kernel.status === 'idle')"))
        browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        wait.until(lambda b: len(_thumbs(b)) == 6 or _problems(b))
        assert _problems(browser) == []
        before = _thumbs(browser)

        box = browser.find_element(By.CSS_SELECTOR, ".dcmfg-explorer .dcmfg-query-text input")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("snow mountain winter", Keys.ENTER)
        WebDriverWait(browser, 60, poll_frequency=0.5).until(lambda b: _problems(b) or (
            len(_thumbs(b)) == 6 and _thumbs(b) != before and "snow mountain winter" in _details_head(b)))
        after = _thumbs(browser)
        assert _problems(browser) == []
        assert after != before and all(s.startswith("data:image/jpeg;base64,") for s in after)
        status = browser.find_element(By.CSS_SELECTOR, ".dcmfg-explorer .dcmfg-explorer-status").text
        assert "snow mountain winter" in status
        details = browser.find_element(By.CSS_SELECTOR, ".dcmfg-explorer .dcmfg-explorer-details")
        assert details.find_elements(By.CSS_SELECTOR, "figure.dcmfg-region-word img")
        assert details.find_elements(By.CSS_SELECTOR, "figure.dcmfg-neighbourhood img")
        browser.execute_script("arguments[0].scrollIntoView()",
                               browser.find_element(By.CSS_SELECTOR, ".dcmfg-explorer"))
        shot = tmp_path / "explorer.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
    finally:
        if browser is not None:
            browser.quit()
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
