"""The HTML report in a real headless browser (Chromium): it renders without console errors, and the
failing pair with its message is on the first screen however many pairs passed before it.

Needs Chromium (Debian: ``apt-get install chromium``); skipped with that reason where none is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from pytest_convdiff.core.results import CheckResult, PairResult
from pytest_convdiff.reporting import html

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium installed (Debian: apt-get install chromium); the HTML report is not checked in a "
                "browser here")


def _pairs() -> list[PairResult]:
    ok = [CheckResult("nmse", "", 1e-4, 1e-3, "passed", "NMSE 1e-4 <= 1e-3")]
    layers = [{"index": i, "rfn": 0.01 * (i + 1), "rfn_attn": 0.005, "rfn_mlp": 0.008} for i in range(8)]
    passing = [PairResult(f"ref-vs-good-{k}.gguf", "/m/ref", f"/m/good-{k}.gguf", "transformers", "llama.cpp",
                          checks=ok * 30, layers=layers, bounds={"rfn": 0.1}) for k in range(6)]
    failing = PairResult("ref-vs-broken.gguf", "/m/ref", "/m/broken.gguf", "transformers", "llama.cpp",
                         checks=ok + [CheckResult("weights", "layer-3", 4.2, 1.0, "failed",
                                                  "Weights of layer 3: 1 of 9 tensors are not what a correct "
                                                  "conversion of A's gives.")],
                         layers=layers, bounds={"rfn": 0.1}, first_divergent_layer=3)
    return [*passing, failing]  # the failing pair last, as a zoo might list it


def _run(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--window-size=1280,800", *args], capture_output=True, text=True, timeout=120)


def test_the_report_renders_and_leads_with_the_failure(tmp_path):
    browser = _browser()
    page = tmp_path / "report.html"
    html.write(page, _pairs())
    shown = _run(browser, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom",
                 page.as_uri())
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "ref-vs-broken.gguf" in shown.stdout
    console = [line for line in shown.stderr.splitlines() if ":CONSOLE" in line or "Failed to load resource" in line
               or "Uncaught" in line]
    assert not console, console

    # where things are, measured by the browser on a copy of the page with a probe script
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", """<script>
      addEventListener('load', () => {
        const lead = document.querySelector('.lead'), h2 = document.querySelector('h2');
        const r = lead.getBoundingClientRect();
        document.body.setAttribute('data-probe', JSON.stringify({top: r.top, bottom: r.bottom, height: innerHeight,
          lead: lead.textContent, first: h2.textContent}));
      });
    </script></body>"""), encoding="utf-8")
    measured = _run(browser, "--virtual-time-budget=3000", "--dump-dom", probe.as_uri())
    m = re.search(r'data-probe="([^"]*)"', measured.stdout)
    assert m, measured.stdout[-1500:]
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert 0 <= found["top"] and found["bottom"] <= found["height"], found  # on the first screen
    assert "ref-vs-broken.gguf" in found["lead"] and "1 of 9 tensors are not what a correct" in found["lead"]
    assert "ref-vs-broken.gguf" in found["first"]  # the failing pair's section comes first
