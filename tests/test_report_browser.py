"""The report page and the MLflow UI's runs view in headless Chromium.

Drives Debian's `chromium` over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
NUL-separated JSON on file descriptors 3 and 4), so it needs no websocket library: it loads
the page, asserts on the live DOM (tables, decoded images, no console errors or exceptions)
and keeps a full-page screenshot: runs/test-artifacts/report.png (git-ignored; it outlives
the test run; LETHE_TEST_ARTIFACTS moves it, e.g. to a CI upload folder). The page is
conftest's `report_page` (tests/report_run.py), shared with tests/test_report.py.

Without /usr/bin/chromium (scripts/setup_venv.sh installs it where apt is usable) the tests
skip, naming the reason (`make test` prints skip reasons: pytest -rs); with
LETHE_REQUIRE_CHROMIUM=1 they fail instead. A bare CI=true does not make them fail: a
registry hiccup during apt would then fail a submission that changed nothing of the report.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from proc_tree import free_port

from orchestrator.tracking.report_data import run_root

CHROMIUM = os.environ.get("LETHE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LETHE_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[1] / "runs" / "test-artifacts")


def _chromium() -> str:
    """The browser, or a skip naming why not (a failure where the browser is required)."""
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    why = (f"{CHROMIUM} missing: scripts/setup_venv.sh installs Debian's chromium with apt "
           "where apt is usable (root, a Debian-based system); LETHE_CHROMIUM names another")
    if os.environ.get("LETHE_REQUIRE_CHROMIUM") == "1":
        pytest.fail(why)
    pytest.skip(why)


def _keep(name: str, png: bytes) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(png)
    print(f"screenshot: {path}")  # shown with -rP / -s; the file stays after the run
    return path


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ------------------------------------------------------------------------- headless Chromium


class DevTools:
    """Chromium's DevTools protocol over `--remote-debugging-pipe` (fd 3 in, fd 4 out)."""

    def __init__(self, exe: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds() -> None:  # in the child, before exec: the pipe ends become fds 3 / 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
                 "--remote-debugging-pipe", "about:blank"]
        # os.pipe() descriptors are close-on-exec; only the dup2'd 3 and 4 reach Chromium.
        self.proc = subprocess.Popen([exe, *flags], preexec_fn=wire_fds, close_fds=False,  # noqa: PLW1509
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe: {self.proc.stderr.read().decode()[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait(timeout=10)
        for fd in (self._to_chrome, self._from_chrome):
            os.close(fd)


PAGE_CHECKS = """
Promise.all([...document.images].map(i => i.decode().catch(() => null))).then(() => JSON.stringify({
  tables: document.querySelectorAll('table.data').length,
  images: [...document.images].map(i => ({w: i.naturalWidth, h: i.naturalHeight, complete: i.complete,
                                          alt: i.alt})),
  iframes: [...document.querySelectorAll('iframe')].map(f => (f.contentDocument
            ? f.contentDocument.querySelectorAll('span.tok').length : -1)),
  headings: [...document.querySelectorAll('h2')].map(h => h.id),
  external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src')
            || e.getAttribute('href')).filter(u => !u.startsWith('data:') && !u.startsWith('#')),
  height: document.documentElement.scrollHeight,
}))
"""


def _console_errors(events: list[dict]) -> list[str]:
    out = []
    for ev in events:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append(json.dumps(params.get("args"))[:300])
        elif method == "Runtime.exceptionThrown":
            out.append(json.dumps(params.get("exceptionDetails"))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            out.append(params["entry"].get("text", "")[:300])
    return out


def test_report_renders_in_headless_chromium(report_page):
    exe = _chromium()
    _, path = report_page
    profile = Path(tempfile.mkdtemp(prefix="lethe-chromium-"))
    browser = DevTools(exe, profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900,
                                                            "deviceScaleFactor": 1, "mobile": False},
                     session=session)
        browser.call("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired")
        checks = json.loads(browser.call("Runtime.evaluate", {
            "expression": PAGE_CHECKS, "awaitPromise": True, "returnByValue": True},
            session=session)["result"]["value"])
        size = browser.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = browser.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}},
            session=session, timeout=120)
        errors = _console_errors(browser.events)
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)

    png = base64.b64decode(shot["data"])
    assert _keep("report.png", png).stat().st_size == len(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    assert errors == []
    assert checks["headings"] == ["comparison", "partition", "curves", "inspector", "timeline", "config"]
    assert checks["tables"] >= 6  # comparison, differences, noise, 2 partitions (+ kinds), timeline
    assert len(checks["images"]) >= 7
    assert all(i["complete"] and i["w"] > 100 and i["h"] > 100 for i in checks["images"]), checks["images"]
    assert checks["external"] == []
    # The inspector pages render inside their frames (sandboxed: no scripts, same document).
    assert len(checks["iframes"]) == 4 and all(n == 5 for n in checks["iframes"]), checks["iframes"]
    assert checks["height"] > 3000


@pytest.mark.slow
def test_mlflow_ui_opens_on_the_runs_table_with_config_columns(report_page, tmp_path, capsys):
    """The URL `lethe ui` prints, in a real MLflow UI: the training-runs table of the latest
    pipeline run, grouped by model and method, with the family / method / seed and eval
    metric columns (guards the UI-state keys against an MLflow upgrade)."""
    from orchestrator.tracking.ui import start_ui, stop_ui
    from orchestrator.tracking.uri import default_sqlite_uri

    exe = _chromium()
    cfg, _ = report_page
    proc = start_ui(default_sqlite_uri(run_root(cfg)), port=free_port(), timeout=180,
                    log_path=tmp_path / "server.log", experiment=cfg.name)
    profile = Path(tempfile.mkdtemp(prefix="lethe-chromium-"))
    browser = None
    try:
        printed = capsys.readouterr().out
        url = re.search(r"Runs of the latest pipeline run: (\S+)", printed).group(1)
        browser = DevTools(exe, profile)
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.call("Runtime.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride", {"width": 1600, "height": 1000,
                                                            "deviceScaleFactor": 1, "mobile": False},
                     session=session)
        browser.call("Page.navigate", {"url": url}, session=session)
        probe = "document.body ? document.body.innerText : ''"
        deadline = time.monotonic() + 120
        text = ""
        while "tiny-qwen2/forget/s2" not in text and time.monotonic() < deadline:
            time.sleep(1.0)  # the UI renders the table after its API calls return
            result = browser.call("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                                  session=session)["result"]
            text = result.get("value") or ""  # no value while the page is navigating
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
        _keep("mlflow_runs_view.png", base64.b64decode(shot["data"]))
    finally:
        if browser is not None:
            browser.close()
        shutil.rmtree(profile, ignore_errors=True)
        stop_ui(proc)
    assert "Model training" in text and "shared view" in text
    assert "tiny-qwen2/forget/s2" in text, text[:2000]
    for column in ("family", "method", "seed", "eval/lethe_synth_mc/acc"):
        assert f"\n{column}\n" in text, column
    assert "Group: model: tiny-llama, method: forget" in text
    assert "Traces" in text and "Detect issues" not in text  # not the GenAI overview


def test_a_missing_browser_skips_with_its_reason_and_fails_where_required(monkeypatch, tmp_path):
    import test_report_browser as mod

    monkeypatch.setattr(mod, "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LETHE_REQUIRE_CHROMIUM", raising=False)
    with pytest.raises(pytest.skip.Exception, match="setup_venv.sh"):
        mod._chromium()
    monkeypatch.setenv("CI", "true")  # CI alone still skips, naming why
    with pytest.raises(pytest.skip.Exception, match="missing"):
        mod._chromium()
    monkeypatch.setenv("LETHE_REQUIRE_CHROMIUM", "1")
    with pytest.raises(pytest.fail.Exception, match="missing"):
        mod._chromium()
