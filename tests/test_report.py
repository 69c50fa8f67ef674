"""`lethe report`: the self-contained HTML page, built from a fabricated MLflow store and run
directory (no pipeline run), checked as text and rendered in headless Chromium.

The browser test drives Debian's `chromium` over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: NUL-separated JSON on file descriptors 3 and 4), so it needs
no websocket library: it loads the page, asserts on the live DOM (tables, decoded images,
no console errors or exceptions) and keeps a full-page screenshot in runs/test-artifacts/.
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
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import ExperimentConfig, save_config
from orchestrator.method.partition import partition_global, partition_stats
from orchestrator.tracking import Tracker
from orchestrator.tracking.inspect import render_html
from orchestrator.tracking.report import write_report
from orchestrator.tracking.report_data import run_root

CHROMIUM = os.environ.get("LETHE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"
SEEDS = (0, 1, 2)
METHODS = ("sft", "ignore", "forget")


def _config(tmp_path: Path, **extra) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "name": "report-test", "run_dir": str(tmp_path / "runs"), "seeds": list(SEEDS),
        "models": [{"name": n, "family": f, "tokenizer_vocab_size": 320,
                    "from_config": {"hidden_size": 8, "num_layers": 1, "num_heads": 2}}
                   for n, f in (("tiny-llama", "llama"), ("tiny-qwen2", "qwen2"))],
        "train": {"methods": list(METHODS)},
        "evaluate": {"tasks": ["lethe_synth_mc"]},
        **extra,
    })


def _inspector_page(sample_id: int) -> str:
    words = ["Q", ":", " 2", "+", "2", "?", " The", " answer", " is", " 5", "."]
    return render_html([{"index": i, "id": i, "text": w, "is_response": i >= 6,
                         "score": (0.8 - 0.3 * i) if i >= 6 else float("nan"),
                         "class": (1 if i != 9 else -1) if i >= 6 else 0, "noise": i == 9}
                        for i, w in enumerate(words)], sample_id)


def _log_curves(run, curves: dict[str, list[float]]) -> None:
    """A whole metric history in one request (steps 1..n), as training's reports leave it."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    run.client.log_batch(run.run_id, metrics=[Metric(k, v, now, i + 1) for k, vals in curves.items()
                                              for i, v in enumerate(vals)])


def fabricate_run(tmp_path: Path) -> ExperimentConfig:
    """A finished pipeline run as the pipeline leaves it: parent + children in a sqlite
    store (eval metrics, curves, partition stats and inspector pages), timeline.json and
    resolved_config.yaml in the run directory."""
    cfg = _config(tmp_path)
    root = run_root(cfg)
    root.mkdir(parents=True)
    save_config(cfg, root / "resolved_config.yaml")
    tracker = Tracker.open(cfg, root)
    parent = tracker.start_parent("pipeline-test", cfg)
    rng = np.random.default_rng(0)
    for k, spec in enumerate(cfg.models):
        fam = {"family": spec.family, "model": spec.name}
        scores = rng.normal(0.3, 1.0, 4000).astype(np.float32)
        noise = (rng.random(4000) < 0.08) & (scores < 0.5)
        stats = partition_stats(scores, partition_global(scores, 0.7), noise.astype(np.int8), bins=40)
        stats.update(mode="global", rho=0.7, noise_by_kind={
            "filler": {"n_noise": 120, "recall": 0.61, "auroc": 0.72},
            "typo": {"n_noise": 90, "recall": 0.44, "auroc": 0.66}})
        with tracker.child(f"{spec.name}/partition", {**fam, "seed": "-",
                                                      "lethe.stage": "partition"}) as run:
            run.log_partition_stats(stats)
            run.log_metrics({f"partition/noise_kind/{kind}/{m}": v
                             for kind, s in stats["noise_by_kind"].items() for m, v in s.items()})
            for sid in (3, 7):
                run.log_text(_inspector_page(sid), f"inspect/sample_{sid}.html")
        with tracker.child(f"{spec.name}/reference", {**fam, "seed": 0,
                                                      "lethe.stage": "reference"}) as run:
            _log_curves(run, {"pos_loss": [5.0 / step for step in range(1, 6)]})
        with tracker.child(f"{spec.name}/base", {**fam, "method": "base", "seed": 0}) as run:
            run.log_eval_metrics({"lethe_synth_mc": {"acc": 0.25, "acc_norm": 0.24}})
        for m, method in enumerate(METHODS):
            for seed in SEEDS:
                with tracker.child(f"{spec.name}/{method}/s{seed}",
                                   {**fam, "method": method, "seed": seed}) as run:
                    acc = 0.30 + 0.04 * m + 0.02 * k + 0.005 * seed
                    run.log_eval_metrics({"lethe_synth_mc": {"acc": acc, "acc_norm": acc - 0.02}})
                    steps = range(1, 11)
                    lam = [0.25 * s / 10 if method == "forget" else 0.0 for s in steps]
                    curves = {"pos_loss": [4.0 / s + 0.1 * seed for s in steps], "lambda": lam}
                    if method == "forget":
                        curves["neg_loss"] = [4.5 / s + la for s, la in zip(steps, lam, strict=True)]
                    _log_curves(run, curves)
    parent.log_metrics({"pipeline_wall_s": 61.5})
    tracker.end_parent()
    t0 = 1_700_000_000.0  # the lead's timeline.json: {"start", "summary", "spans": [...]}
    spans = [{"stage": "ray-init", "model": "-", "category": "startup", "start": t0, "end": t0 + 4}]
    for k, spec in enumerate(cfg.models):
        off = t0 + 4 + k
        spans += [
            {"stage": "tokens", "model": spec.name, "category": "data", "start": off, "end": off + 2},
            {"stage": "reference", "model": spec.name, "category": "startup",
             "start": off + 2, "end": off + 6},
            {"stage": "reference", "model": spec.name, "category": "compute",
             "start": off + 6, "end": off + 15},
            {"stage": "train", "model": spec.name, "category": "compute",
             "start": off + 20, "end": off + 40},
            {"stage": "train", "model": spec.name, "category": "export",
             "start": off + 40, "end": off + 42}]
    (root / "timeline.json").write_text(json.dumps({"start": t0, "spans": spans}))
    return cfg


# ------------------------------------------------------------------------- page as text


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def _elements(text: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Elements()
    parser.feed(text)
    return parser.tags


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    """(config, report path), built once: the browser test reuses the same page."""
    tmp = tmp_path_factory.mktemp("report")
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        cfg = fabricate_run(tmp)
        return cfg, write_report(cfg)
    finally:
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old


def test_report_is_self_contained_and_has_every_section(report_page):
    cfg, path = report_page
    assert path == run_root(cfg) / "report.html"
    text = path.read_text()
    tags = _elements(text)
    names = [t for t, _ in tags]
    assert "script" not in names and "link" not in names  # nothing fetched, nothing run
    for tag, attrs in tags:
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:60]
            png = base64.b64decode(attrs["src"].split(",", 1)[1])
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
        if tag == "a":
            assert attrs["href"].startswith("#")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    for anchor in ("comparison", "partition", "curves", "inspector", "timeline", "config"):
        assert f'id="{anchor}"' in text
    # Comparison: both families and every method, seed spread, paired differences with CIs.
    assert "tiny-llama" in text and "tiny-qwen2" in text
    assert all(f"<th>{m}</th>" in text for m in ("base", *METHODS))
    assert "0.345 ± 0.005" in text  # tiny-llama ignore: 0.340, 0.345, 0.350
    assert "forget − sft" in text and "forget − ignore" in text
    assert re.search(r"\+0\.080 \[\+0\.0\d\d, \+0\.0\d\d\] \*", text)  # paired seeds, no spread
    # Partition: per-kind AUROC, histograms; curves, inspector pages, timeline, config.
    assert "filler" in text and "typo" in text and "0.720" in text
    assert names.count("img") >= 2 + 2 + 2 + 1  # bars, histograms, curves, timeline
    assert names.count("iframe") == 4  # two samples per model
    assert "srcdoc=" in text and "sandbox" in text
    assert "no timeline recorded" not in text and "ray-init" in text
    assert "lethe_synth_mc" in text and "report-test" in text
    assert "seeds:" in text  # the resolved config, verbatim


def test_report_is_logged_to_the_parent_run(report_page):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.compare import latest_parent_run_id
    from orchestrator.tracking.uri import default_sqlite_uri

    cfg, _ = report_page
    uri = default_sqlite_uri(run_root(cfg))
    parent = latest_parent_run_id(uri, cfg.name)
    files = [f.path for f in MlflowClient(uri).list_artifacts(parent, "report")]
    assert "report/report.html" in files


def test_lethe_report_command(report_page, tmp_path, capsys):
    from orchestrator.cli import main

    cfg, _ = report_page
    out = tmp_path / "sent.html"
    assert main(["report", str(run_root(cfg) / "resolved_config.yaml"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "Lethe report: report-test" in out.read_text()


def test_report_without_timeline_or_tracking_says_so(report_page, tmp_path):
    cfg, _ = report_page
    timeline = run_root(cfg) / "timeline.json"
    kept = timeline.rename(tmp_path / "timeline.json")  # the shared run, without its timeline
    try:
        text = write_report(cfg, tmp_path / "r.html", log_to_mlflow=False).read_text()
    finally:
        kept.rename(timeline)
    assert "no timeline recorded" in text and 'id="comparison"' in text
    off = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    text = write_report(off, tmp_path / "off.html", log_to_mlflow=False).read_text()
    assert "tracking disabled" in text and "no evaluated runs" in text
    assert "seeds:" in text  # the config is there even without a store


def test_report_with_a_headline_leads_with_it(report_page, tmp_path):
    """With benchmarks configured, the page follows `lethe compare`: the headline in points
    and its paired differences first, charts for the headline columns only."""
    cfg, _ = report_page
    raw = cfg.to_dict()
    raw["evaluate"]["benchmarks"] = {"MC": {"tasks": ["lethe_synth_mc"], "metric": "acc"},
                                     "MCN": {"tasks": ["lethe_synth_mc"], "metric": "acc_norm"}}
    text = write_report(ExperimentConfig.model_validate(raw), tmp_path / "h.html",
                        log_to_mlflow=False).read_text()
    assert text.index("Headline: average over 2 benchmarks") < text.index("<h3>Methods</h3>")
    assert "38.50 ± 0.50" in text  # tiny-llama forget MC in points
    assert "+8.00 [+8.00, +8.00] *" in text  # forget − sft, in points
    alts = re.findall(r'<img class="fig" src="data:[^"]+" alt="([^"]+)"', text)
    assert [a for a in alts if a.startswith(("compare_", "effect_"))] == [
        "compare_MC", "compare_MCN", "compare_average", "effect_MC", "effect_MCN", "effect_average"]


def test_report_bad_timeline_span_is_named(tmp_path):
    from orchestrator.tracking.report_data import read_timeline

    path = tmp_path / "timeline.json"
    path.write_text(json.dumps([{"stage": "a", "model": "-", "category": "data", "start": 0, "end": 1},
                                {"stage": "b", "start": 5, "end": 2}]))
    spans, notes = read_timeline(path)
    assert [s["stage"] for s in spans] == ["a"]
    assert len(notes) == 1 and "span 1" in notes[0] and "end 2.0 < start 5.0" in notes[0]


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


@pytest.mark.skipif(not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)),
                    reason=f"{CHROMIUM} missing: scripts/setup_venv.sh installs Debian's chromium "
                           "with apt where apt is usable (root, a Debian-based system)")
def test_report_renders_in_headless_chromium(report_page):
    _, path = report_page
    profile = Path(tempfile.mkdtemp(prefix="lethe-chromium-"))
    browser = DevTools(CHROMIUM, profile)
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

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = base64.b64decode(shot["data"])
    (ARTIFACTS / "report.png").write_bytes(png)
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


# ------------------------------------------------------------------------- MLflow UI view


def test_experiment_opens_as_machine_learning_with_a_runs_view(report_page):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.compare import latest_parent_run_id
    from orchestrator.tracking.tracker import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
    from orchestrator.tracking.ui import SHARED_VIEW_TAG, runs_view_url
    from orchestrator.tracking.uri import default_sqlite_uri

    cfg, _ = report_page
    uri = default_sqlite_uri(run_root(cfg))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.name)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"

    url = runs_view_url(uri, "http://127.0.0.1:5000/", cfg.name)
    prefix = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey="
    assert url.startswith(prefix)
    key = url[len(prefix):]
    state = json.loads(client.get_experiment(exp.experiment_id).tags[SHARED_VIEW_TAG + key])
    parent = latest_parent_run_id(uri, cfg.name)
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent}'"
    cols = state["selectedColumns"]
    assert cols[:4] == ["tags.`family`", "tags.`model`", "tags.`method`", "tags.`seed`"]
    assert {"metrics.`eval/lethe_synth_mc/acc`", "metrics.`eval/lethe_synth_mc/acc_norm`"} <= set(cols)
    assert [k["groupByData"] for k in state["groupBy"]["groupByKeys"]] == ["model", "method"]
    assert runs_view_url(uri, "http://127.0.0.1:5000", cfg.name) == url  # same view, same key
    assert runs_view_url(uri, "http://x", "no-such-experiment") is None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)),
                    reason=f"{CHROMIUM} missing (see scripts/setup_venv.sh)")
def test_mlflow_ui_opens_on_the_runs_table_with_config_columns(report_page, tmp_path, capsys):
    """The URL `lethe ui` prints, in a real MLflow UI: the training-runs table of the latest
    pipeline run, grouped by model and method, with the family / method / seed and eval
    metric columns (guards the UI-state keys against an MLflow upgrade)."""
    from orchestrator.tracking.ui import start_ui, stop_ui
    from orchestrator.tracking.uri import default_sqlite_uri

    cfg, _ = report_page
    proc = start_ui(default_sqlite_uri(run_root(cfg)), port=_free_port(), timeout=180,
                    log_path=tmp_path / "server.log", experiment=cfg.name)
    profile = Path(tempfile.mkdtemp(prefix="lethe-chromium-"))
    browser = None
    try:
        printed = capsys.readouterr().out
        url = re.search(r"Runs of the latest pipeline run: (\S+)", printed).group(1)
        browser = DevTools(CHROMIUM, profile)
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
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "mlflow_runs_view.png").write_bytes(base64.b64decode(shot["data"]))
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
