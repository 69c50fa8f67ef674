"""Tiny experiment configs shared by the end-to-end tests (seconds per stage on a laptop)."""

TINY = {
    "name": "pipe-test",
    "seed": 0,
    "data": {"source": "synthetic", "max_seq_len": 96,
             "synthetic": {"num_train": 96, "num_eval": 16, "noise_fraction": 0.3, "seed": 1}},
    "models": [{"name": "tiny-llama", "family": "llama", "tokenizer_vocab_size": 320,
                "from_config": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                "num_kv_heads": 1, "intermediate_size": 64}}],
    "reference": {"subset_fraction": 0.5, "seed": 0},
    "scoring": {"num_actors": 1, "batch_size": 64, "token_budget": 4096, "chunk_size": 512},
    "partition": {"rho": 0.7},
    "train": {"methods": ["sft", "forget"], "lr": 3e-3, "epochs": 1, "micro_batch_size": 16,
              "num_workers": 1, "cpus_per_worker": 0.5, "deepspeed": None},
    "evaluate": {"tasks": ["lethe_synth_mc"], "limit": 8, "batch_size": 8},
    "ray": {"max_parallel_trainings": 2},
}


def runs_frame(tracking_uri: str, experiment: str, filter_string: str = ""):
    """The experiment's runs as a DataFrame with `tags.*`, `params.*`, `metrics.*` columns.

    Through an explicit client: `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI,
    which would leak into every later pipeline run of the test session.
    """
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    rows = []
    for run in client.search_runs([exp.experiment_id], filter_string=filter_string,
                                  max_results=10000):
        row = {"run_id": run.info.run_id}
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)
