"""``dcdeploy web`` in a real headless browser (Debian's chromium driven by Playwright)
against a live local data center during deploys: the grid, the progress, a failed health
check, and a screenshot (kept as a test artifact; with DCDEPLOY_UPDATE_SCREENSHOT=1 also as docs/img/web.png)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from cluster import Cluster, wait_for
from prometheus_client.parser import text_string_to_metric_families

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.lab.zkserver import free_port

CHROMIUM = "/usr/bin/chromium"
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img" / "web.png"
SERVICES = {"A": {"quorum": 3, "max_parallel": 1, "healthy_secs": 1.0},
            "B": {"quorum": 2, "max_parallel": 1, "healthy_secs": 0.2}}


@pytest.fixture
def cluster(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, 4, SERVICES, racks=2)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def web(cluster, store_url, tmp_path):
    """``dcdeploy web`` as an operator runs it, in its own process (killed by pid)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "web.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor_dcdeploy.cli", "--store",
                                 store_url, "web", "--listen", f"127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"dcdeploy web exited {proc.returncode}: "
                                     f"{(tmp_path / 'web.log').read_text()}")
            try:
                with urllib.request.urlopen(url + "/style.css", timeout=1):
                    return True
            except OSError:
                return False

        try:
            wait_for(up, 30, "dcdeploy web to answer")
            yield url
        finally:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def browser():
    """Debian's chromium; a browser that cannot start fails the test with the reason."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"playwright is not installed ({exc}): pip install -e '.[test]'")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/setup.sh)")
    with sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        except Exception as exc:  # noqa: BLE001 - any reason is reported, never skipped
            pytest.fail(f"chromium could not start: {exc}")
        try:
            yield chromium
        finally:
            chromium.close()


def done_count(page, item: str) -> int:
    return int(page.get_attribute(f'[data-item="{item}"]', "data-done") or -1)


def test_web_page_follows_a_deploy_and_a_failed_health_check(cluster, web, browser,
                                                             tmp_path):
    cluster.boot({"A": "1", "B": "1"})
    page = browser.new_page(viewport={"width": 1100, "height": 820})
    page.goto(web + "/")
    # The grid shows every host, grouped by rack, each with both services serving 1.
    page.wait_for_function("document.querySelectorAll('[data-host-row]').length === 4")
    for host in cluster.hosts:
        for svc in SERVICES:
            cell = page.locator(f'[data-host="{host}"][data-service="{svc}"]')
            cell.wait_for()
            page.wait_for_function(
                f"document.querySelector('[data-host=\"{host}\"][data-service=\"{svc}\"]')"
                ".dataset.state === 'serving'")
            assert cell.inner_text().startswith("1 ")
    racks = page.locator("th.rack").all_inner_texts()
    assert racks == ["rack r0", "rack r1"]

    # A deploy: the item's progress bar advances host by host to the end.
    cluster.stage("A", "2")
    wait_for(lambda: len(cluster.store.children("staging/A")) == 4, 60,
             "every host ready for A 2")
    (item,) = ops.deploy(cluster.store, ["A"])
    selector = f'[data-item="{item.node}"]'
    page.wait_for_selector(selector)
    assert page.get_attribute(selector, "data-total") == "4"
    seen = []
    for n in (1, 2, 3):  # each step is seen in the page (pushed, never reloaded)
        page.wait_for_function(
            f"(() => {{ const e = document.querySelector('{selector}'); "
            f"return !e || Number(e.dataset.done) >= {n}; }})()", timeout=90_000)
        if page.locator(selector).count():
            seen.append(done_count(page, item.node))
    assert seen == sorted(seen) and seen and seen[0] >= 1, seen
    page.wait_for_selector(f'[data-history="{item.node}"]', timeout=90_000)
    assert "done" in page.locator(f'[data-history="{item.node}"]').inner_text()

    # A broken release: the first host fails its check; the item turns red with the reason.
    cluster.stage("A", "3", broken=True)
    wait_for(lambda: len(cluster.store.children("staging/A")) == 4, 60,
             "every host ready for the broken A 3")
    (bad,) = ops.deploy(cluster.store, ["A"])
    bad_sel = f'[data-item="{bad.node}"]'
    page.wait_for_selector(f'{bad_sel}[data-state="failed"]', timeout=90_000)
    text = page.locator(bad_sel).inner_text()
    assert "failed its health check" in text, text
    failed_host = next(h for h in cluster.hosts if f"host {h}:" in text)
    colour = page.eval_on_selector(bad_sel, "e => getComputedStyle(e).backgroundColor")
    assert colour == "rgb(239, 154, 154)", colour  # .failed's red
    page.wait_for_selector(f'[data-host="{failed_host}"][data-service="A"][data-state="failed"]')
    # The chart has a line and a quorum line per service.
    for svc in SERVICES:
        assert page.locator(f'#chart polyline[data-service="{svc}"]').count() == 1
        assert page.locator(f'#chart line[data-quorum="{svc}"]').count() == 1

    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("DCDEPLOY_UPDATE_SCREENSHOT"):  # refresh the README's picture
        DOCS_IMG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMG)

    # The fleet gauges on the same server agree with the store.
    with urllib.request.urlopen(web + "/metrics", timeout=5) as resp:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(resp.read().decode())
                   for s in f.samples}
    assert samples[("dcdeploy_fleet_quorum_hosts", (("service", "A"),))] == 3
    assert samples[("dcdeploy_fleet_deploy_items", (("state", "failed"),))] == 1
    assert samples[("dcdeploy_fleet_hosts", (("service", "B"),))] == 4
