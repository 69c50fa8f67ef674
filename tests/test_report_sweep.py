"""The report of a `lethe tune` run shows the sweep: the (lambda_max, rho) map of the metric and
the trial table, read from the artifacts `log_sweep` puts on the sweep's parent run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.tracking.report import render  # noqa: E402
from orchestrator.tracking.report_data import ReportData, _collect_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLE = "trial  lambda_max  rho  neg term  eval/lethe_synth_mc_valid/acc\nt1  0.05  0.9  unlikelihood  0.61\n"


def test_sweep_artifacts_become_a_report_section(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("sweep", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    client.log_text(run_id, TABLE, "sweep/trials.txt")
    fig, ax = plt.subplots()
    ax.scatter([0.05, 0.5], [0.9, 0.7], c=[0.61, 0.40])
    client.log_figure(run_id, fig, "sweep/metric_vs_lambda_rho.png")
    plt.close(fig)

    data = ReportData(name="smollm2-tune", experiment="sweep", tracking_uri=None)
    _collect_sweep(data, client, run_id)
    assert data.sweep_table == TABLE
    assert data.sweep_png_uri and data.sweep_png_uri.startswith("data:image/png;base64,")
    page = render(data, load_config(ROOT / "configs/smollm2-tune.yaml"))
    assert '<h2 id="sweep">Tune sweep</h2>' in page and "unlikelihood  0.61" in page
    assert data.sweep_png_uri in page


def test_a_pipeline_run_without_a_sweep_has_no_sweep_section(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("run", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    data = ReportData(name="x", experiment="run", tracking_uri=None)
    _collect_sweep(data, client, run_id)
    assert data.sweep_table == "" and data.sweep_png_uri is None
    page = render(data, load_config(ROOT / "configs/smollm2-paper-regime.yaml"))
    assert 'id="sweep"' not in page
