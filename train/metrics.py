"""Metrics: ``metrics.jsonl`` in the run directory, wandb, and MFU.

``metrics.jsonl`` holds one JSON object per line, every line with ``step`` (optimizer steps
done) and ``kind`` (train | val | diagnostics | event). Training lines carry ``loss`` (the total
the optimizer saw) and ``loss/lm``, ``loss/mtp``, ``loss/balance``, ``loss/indexer``,
``grad_norm``, ``lr/<group>``, ``tokens``, ``tokens_per_s``, ``tflops`` (achieved, per device),
``mfu``, ``peak_mem_gb``, ``update_rms/<group>``; validation lines carry ``val_loss`` and
``val_ppl``; diagnostics lines carry the model's diagnostics (``moe/maxvio/<layer>``,
``moe/load/<layer>`` as a list, ``moe/bias_spread/<layer>``, ``mhc/gain_fwd/<layer>.<site>``,
``mhc/composite_gain_fwd``, ``attn/sink_mass/<layer>``, ...). wandb gets the same keys (the
"/" makes sections: loss, lr, moe, mhc, attn) and histograms of the expert loads.

The FLOP model per token is ``model/accounting.py::flops_per_token``.
MFU = achieved FLOP/s per device / the device's peak (``logging.peak_tflops``, else the known
GPUs' bf16 peak in train/engine.py); without a peak (CPU by default) ``mfu`` is left out.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- logging
def _plain(value: Any) -> Any:
    """JSON-friendly: tensors to numbers or lists."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    return value


class MetricsLogger:
    """Rank 0 writes ``metrics.jsonl`` and logs to wandb; other ranks do nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool, wandb_cfg: Mapping[str, Any],
                 config: dict, resume_run_id: str | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.wandb_run_id: str | None = resume_run_id
        self._wandb_step = 0
        if not enabled:
            return
        self._file = open(self.path, "a")
        mode = os.environ.get("WANDB_MODE") or wandb_cfg["mode"]
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logging.wandb.mode must be online | offline | disabled, got {mode!r}")
        if mode != "disabled":
            import wandb

            run_dir = Path(run_dir)
            self.wandb = wandb.init(
                project=wandb_cfg["project"], entity=wandb_cfg["entity"], group=wandb_cfg["group"],
                tags=list(wandb_cfg["tags"] or []), notes=wandb_cfg["notes"],
                name=wandb_cfg["name"] or f"{run_dir.parent.name}/{run_dir.name}",
                mode=mode, dir=str(run_dir), config=config,
                id=resume_run_id, resume="allow" if resume_run_id else None,
                reinit="finish_previous",
                # our own log says where things are; keep wandb's banner and summary table out
                settings=wandb.Settings(quiet=True, show_info=False),
            )
            self.wandb_run_id = self.wandb.id

    def log(self, step: int, kind: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind}
        record.update((k, _plain(v)) for k, v in metrics.items())
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            # wandb drops lines whose step goes backwards: after a stability rollback the
            # replayed steps' lines stay in metrics.jsonl only, events go to the newest step
            if step >= self._wandb_step:
                self._wandb_step = step
                self.wandb.log(self._for_wandb(metrics), step=step)
            elif kind == "event":
                self.wandb.log(self._for_wandb(metrics), step=self._wandb_step)

    def _for_wandb(self, metrics: Mapping[str, Any]) -> dict:
        import wandb

        out = {}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                out[k] = wandb.Histogram(v.detach().float().cpu().numpy())
            elif isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool):
                out[k] = float(v)
        return out

    def copy_history(self, previous: Path, up_to_step: int) -> int:
        """Start this run's metrics.jsonl with an earlier run's lines up to ``up_to_step``
        (a resume; call it before logging anything), so that one file holds the whole curve in
        step order. Returns the lines copied."""
        if not self.enabled or not Path(previous).is_file():
            return 0
        kept = []
        with open(previous) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break                       # a line cut by the kill: stop there
                if rec.get("step", 0) <= up_to_step and not (
                        rec.get("step") == up_to_step and rec.get("kind") == "event"):
                    kept.append(line if line.endswith("\n") else line + "\n")
        if Path(previous).resolve() == self.path.resolve():
            # resuming into the same directory: the lines of steps after the checkpoint (to be
            # trained again) go, so that the file stays in step order
            self._file.close()
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
            self._file = open(self.path, "a")
        else:
            self._file.writelines(kept)
        self._file.flush()
        return len(kept)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
    except ImportError:
        return None
