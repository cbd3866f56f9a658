"""The dashboard in a real browser: Debian's chromium driven by Playwright (issue 23).

Scenario base: a real cluster (`aurora-lite up --detach`: control plane, six storage nodes,
writer db1, replica db2; tests/test_cli_tour.py's fixture) under `aurora-lite bench load`
(2 clients, in the background for the whole test); headless chromium opens the URL that
`status --json` gives under `dashboard` and clicks the page's own fault buttons (each
behind a confirm(), which the test accepts).

Chromium is /usr/bin/chromium (.ci/run installs it; `playwright install` is never run).
Without it, or without the playwright package, the test skips with the reason, except
when CI=true or AURORA_REQUIRE_BROWSER=1 (.ci/run sets it): then it fails. AURORA_UPDATE_SCREENSHOTS=1 writes the screenshots of the
states into docs/img/ (README.md and docs/dashboard.md show them); otherwise they go to
the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.test_cli_tour import NAMES, ROOT, cli_env, cluster, up  # noqa: F401 (cluster: the fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000
STORAGE = ["sn1", "sn2", "sn3", "sn4", "sn5", "sn6"]


def sync_playwright_or_skip():
    """Playwright's sync API, or a skip (a failure when CI=true) saying what is missing."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[test]')"
    if missing is None and not os.path.exists(CHROMIUM):
        missing = f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run does it)"
    if missing:
        if os.environ.get("CI") == "true" or os.environ.get("AURORA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CI=true or AURORA_REQUIRE_BROWSER=1 (.ci/run), but {missing}")
        pytest.skip(missing)
    return sync_playwright


def post(url: str, body: dict, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_dashboard_watches_quorum_storage_fail_and_recover(cluster, tmp_path):
    """Scenario: the page lists all nodes up and the VDL advancing under load; kill sn1 from
    the page: sn1 shows down and the VDL keeps advancing (4/6 still met); AZ az-a down
    (sn2 too): writes still possible; kill sn3 as well: the page shows the write quorum
    lost, the read quorum met, and a read is still served; az-a up and sn3 start from the
    page: every node up, the write quorum back, the VDL advancing again. POSTs without the
    token or from another origin get 403."""
    sync_playwright = sync_playwright_or_skip()
    cli = cluster
    up(cli)
    cli("put", "hello", "world")
    cli("bench", "load", "--init", "--rows", "200", timeout=90)
    state = cli.status()
    url = state["dashboard"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/"), url
    token = open(os.path.join(cli.data_dir, "dashboard.token")).read().strip()
    host = url[len("http://"):-1]

    # Refused: no token; another origin (with the token); a Host that is not ours.
    assert post(url + "api/action", {"verb": "node-kill", "target": "sn1"}, {})[0] == 403
    assert post(url + "api/action", {"verb": "node-kill", "target": "sn1"},
                {"X-Aurora-Token": token, "Origin": "http://evil.example"})[0] == 403
    assert post(url + "api/action", {"verb": "node-kill", "target": "sn1"},
                {"X-Aurora-Token": token, "Host": "evil.example"})[0] == 403
    assert cli.status()["by_name"]["sn1"]["state"] == "up"

    shots = os.path.join(ROOT, "docs", "img") if os.environ.get("AURORA_UPDATE_SCREENSHOTS") == "1" \
        else str(tmp_path)
    load = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "bench", "load", "--clients", "2", "--duration", "300",
         "--no-progress", "--data-dir", cli.data_dir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env(), cwd=ROOT)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.on("dialog", lambda dialog: dialog.accept())
                page.goto(url)
                _scenario(page, cli, shots, host)
            finally:
                browser.close()
    finally:
        load.kill()
        load.wait(10)


def _status(page, name: str, status: str) -> None:
    page.wait_for_selector(f"#node-{name}[data-status='{status}']", timeout=WAIT_MS)


def _vdl(page) -> int:
    return int(page.locator("#vdl").inner_text())


def _vdl_advances(page) -> None:
    """The VDL shown grows past what it shows now (the page updates itself)."""
    before = _vdl(page)
    page.wait_for_function(f"() => +document.getElementById('vdl').textContent > {before}",
                           timeout=WAIT_MS, polling=250)


def _quorum(page, which: str, ok: bool) -> None:
    page.wait_for_selector(f"#{which}-quorum[data-ok='{'true' if ok else 'false'}']", timeout=WAIT_MS)


def _click(page, verb: str, target: str) -> None:
    page.click(f"button[data-verb='{verb}'][data-target='{target}']")
    page.wait_for_function("() => !document.getElementById('msg').textContent.endsWith('sent...')",
                           timeout=WAIT_MS * 3, polling=250)


def _shot(page, shots: str, name: str) -> None:
    page.screenshot(path=os.path.join(shots, f"dashboard-{name}.png"))


def _scenario(page, cli, shots: str, host: str) -> None:
    # The first response is rendered on the server: every process by name, and the VDL.
    html = page.content()
    for name in NAMES:
        assert f'id="node-{name}"' in html, name
    assert _vdl(page) > 0
    for name in NAMES:
        _status(page, name, "up")
    _quorum(page, "write", True)
    _quorum(page, "read", True)
    _vdl_advances(page)
    page.wait_for_function("() => +document.getElementById('commits-s').textContent > 0",
                           timeout=WAIT_MS, polling=250)
    _shot(page, shots, "healthy")

    # One storage node down: 5/6, writes go on.
    _click(page, "node-kill", "sn1")
    _status(page, "sn1", "down")
    _vdl_advances(page)
    _quorum(page, "write", True)
    assert "sn1" in page.locator("#timeline").inner_text()

    # AZ az-a down (sn1 already was; sn2 now): 4/6 still a write quorum.
    _click(page, "az-down", "az-a")
    _status(page, "sn2", "down")
    _vdl_advances(page)
    _quorum(page, "write", True)
    _shot(page, shots, "az-down")

    # One more node: 3/6. Writes stall (write quorum lost), reads go on (3/6 read quorum).
    _click(page, "node-kill", "sn3")
    _status(page, "sn3", "down")
    _quorum(page, "write", False)
    _quorum(page, "read", True)
    assert page.locator("#pg-0 td[data-ok='false']").count() == 1   # W no, R yes
    assert cli("get", "hello").stdout.strip() == "world"
    _shot(page, shots, "write-quorum-lost")

    # Back: az-a up, sn3 started; every node up, the write quorum back, writes flowing.
    _click(page, "az-up", "az-a")
    _click(page, "node-start", "sn3")
    for name in STORAGE:
        _status(page, name, "up")
    _quorum(page, "write", True)
    _vdl_advances(page)
    _vdl_advances(page)
    timeline = page.locator("#timeline").inner_text()
    assert "az-a" in timeline and "started again" in timeline, timeline
    _shot(page, shots, "recovered")
