"""The training job: ``python -m train`` (Hydra app; see train/__main__.py and conf/).

``train.trainer.train(cfg, run_dir)`` is the loop; ``engine`` sets up DeepSpeed, ``curriculum``
lays out the context-length stages, ``checkpoint`` saves and resumes, ``metrics`` writes
metrics.jsonl and wandb, ``config_schema`` is the typed schema of the config tree.
"""
