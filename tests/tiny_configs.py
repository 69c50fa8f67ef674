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
