"""``python -m train`` on one rank of a multi-rank job, with per-rank evidence of the stability
controller's decisions and an injected spike that only one rank's batch carries.

    python train_stability.py OUT_DIR SPIKE_RANK <hydra overrides>     (RANK etc. in the env)

Runs the ``train`` package's ``__main__`` unchanged (runpy) after wrapping:

* ``Injector.corruption``: when SPIKE_RANK >= 0, the ``stability.inject`` corruption
  (scale_grad / scale_loss / nan) of a step reaches only the first micro-batch of rank
  SPIKE_RANK (recorded as ``{"corrupted": step}``); every other rank trains on its batches
  unchanged. The injector itself runs on every
  rank as usual (its bookkeeping stays the trainer's); ``skip`` and ``anticipate`` are untouched.
* ``StabilityController.end_step``: each call appends ``{"step", "observed", "next"}`` (the
  detector inputs this rank fed in and the step it continues at) to ``OUT_DIR/rank<R>.jsonl``.
* ``StabilityController.pop_events``: each event appends ``{"event": ...}`` to the same file.
* ``StabilityController.detector_inputs``: each call appends ``{"local": ...}``, this rank's own loss,
  grad norm and update RMS before they are averaged over ranks.

At the end it writes ``OUT_DIR/rank<R>.pt``: ``{"step": steps done, "module": the module's
state_dict}`` (under ZeRO-2 every rank holds the full parameters).
"""
from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main() -> None:
    out_dir, spike_rank = Path(sys.argv[1]), int(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    log_path = out_dir / f"rank{rank}.jsonl"

    import torch

    import train.setup as setup
    import train.trainer as trainer
    from train.stability_control import Injector, StabilityController

    def record(entry: dict) -> None:
        with open(log_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    corruption = Injector.corruption

    def one_rank_corruption(self, step, batches):
        out = corruption(self, step, batches)
        if spike_rank < 0:
            return out
        out = [c if rank == spike_rank and m == 0 else None for m, c in enumerate(out)]
        if any(c is not None for c in out):
            record({"corrupted": step, "micro": [m for m, c in enumerate(out) if c is not None]})
        return out

    end_step = StabilityController.end_step

    def recorded_end_step(self, step, metrics, objects):
        nxt = end_step(self, step, metrics, objects)
        record({"step": step, "observed": dict(metrics), "next": nxt})
        return nxt

    pop_events = StabilityController.pop_events

    def recorded_pop_events(self):
        events = pop_events(self)
        for ev in events:
            record({"event": ev})
        return events

    Injector.corruption = one_rank_corruption
    StabilityController.end_step = recorded_end_step
    StabilityController.pop_events = recorded_pop_events

    detector_inputs = StabilityController.detector_inputs

    def recorded_detector_inputs(self, loss, grad_norm, update_rms, device):
        record({"local": {"loss": loss, "grad_norm": grad_norm,
                          "update_rms": None if update_rms is None else dict(update_rms)}})
        return detector_inputs(self, loss, grad_norm, update_rms, device)

    StabilityController.detector_inputs = recorded_detector_inputs

    engines, results = [], []
    initialize_engine, train = setup.initialize_engine, trainer.train

    def capture_engine(*args, **kwargs):
        engines.append(initialize_engine(*args, **kwargs))
        return engines[-1]

    def capture_result(*args, **kwargs):
        results.append(train(*args, **kwargs))
        return results[-1]

    setup.initialize_engine = capture_engine
    trainer.train = capture_result   # train/__main__.py imports it when Hydra calls main()

    sys.argv = ["train", *sys.argv[3:]]
    runpy.run_module("train", run_name="__main__", alter_sys=True)

    assert len(engines) == 1 and len(results) == 1, "the trainer did not run exactly once"
    module = {k: v.detach().cpu().clone() for k, v in engines[0].module.state_dict().items()}
    torch.save({"step": results[0].step, "module": module}, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
