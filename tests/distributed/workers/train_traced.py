"""``python -m train`` with a record of the training data each rank consumes.

    [torchrun ...] python train_traced.py TRACE_DIR <hydra overrides>

Runs the ``train`` package's ``__main__`` unchanged (runpy) after wrapping
``data.loader.TokenLoader.__next__``: every micro-batch drawn appends a line
``{"epoch", "position", "rows": [sha1 of each sequence's input_ids]}`` (the loader's state
before the draw) to ``TRACE_DIR/rank<RANK>.jsonl``.
"""
from __future__ import annotations

import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main() -> None:
    trace_dir = Path(sys.argv[1])
    trace_dir.mkdir(parents=True, exist_ok=True)
    path = trace_dir / f"rank{os.environ.get('RANK', '0')}.jsonl"

    from data.loader import TokenLoader

    original = TokenLoader.__next__

    def traced(self):
        epoch, position = self.epoch, self.position
        batch = original(self)
        rows = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in batch["input_ids"]]
        with open(path, "a") as fh:
            fh.write(json.dumps({"epoch": epoch, "position": position, "rows": rows}) + "\n")
        return batch

    TokenLoader.__next__ = traced
    sys.argv = ["train", *sys.argv[2:]]
    runpy.run_module("train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
