"""Export a checkpoint as a Hugging Face ``DeepseekV4ForCausalLM`` directory.

    python -m train.export export --checkpoint PATH --out DIR [--dtype fp32|bf16] [--config FILE]

The HF names and layouts are ``model/hf.py``; this module finds the weights and the config of a
checkpoint (DeepSpeed's formats: ``train/ds_checkpoint.py``) and the tokenizer its run trained with.

Checkpoint input (``load_checkpoint``)
--------------------------------------
* a file: ``.safetensors`` or ``.pt``/``.pth``/``.bin`` holding our state dict (or a DeepSpeed
  ``mp_rank_00_model_states.pt`` with the state dict under ``'module'``);
* a trainer checkpoint: a run directory (``<run>/checkpoints/latest``), its ``checkpoints/``
  directory (``latest`` names the tag) or one ``step_*`` directory. The model states are read
  from ``<tag>/mp_rank_00_model_states.pt``; a ZeRO-sharded checkpoint (``zero_pp_rank_*`` files)
  is consolidated with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``.
* an expert-parallel trainer checkpoint (``parallel.ep_size > 1``): the experts of every MoE
  layer stacked in global order, the fp32 ZeRO-1/2 masters where there are any
  (``train/ds_checkpoint.py`` says how, and what it refuses before anything is written).
The model config comes from ``config=`` (a json/yaml file, a preset name or a ModelConfig) or is
looked up next to the checkpoint: ``model_config.json`` or ``config.yaml`` beside a file; for a
trainer checkpoint the ``model_config`` entry of ``<tag>/meta.json`` (ModelConfig.to_dict()),
``<tag>/model_config.json``, ``<run>/checkpoints/model_config.json``, ``<run>/model_config.json``,
then Hydra's ``<run>/.hydra/config.yaml`` (its ``model`` node).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from model.config import ConfigError, ModelConfig
from model.hf import (DEFAULT_MAX_SHARD_BYTES, DTYPES, ExportError, check_state_dict, export_hf,
                      read_model_config)
from train.ds_checkpoint import (MODEL_STATES, CheckpointError, find_tag_dir, is_expert_parallel,
                                 model_state_dict, module_weights)


def _refused_as_export_error(read: Callable[[Path], dict[str, torch.Tensor]], path: Path
                             ) -> dict[str, torch.Tensor]:
    try:
        return read(path)
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def _config_candidates(ckpt: Path, tag_dir: Path | None) -> list[Path]:
    if tag_dir is None:  # a file
        return [ckpt.parent / "model_config.json", ckpt.parent / "config.yaml"]
    save_dir = tag_dir.parent
    run_dir = save_dir.parent
    return [tag_dir / "model_config.json", save_dir / "model_config.json",
            run_dir / "model_config.json", run_dir / ".hydra" / "config.yaml"]


def load_checkpoint(path: str | os.PathLike, config: str | os.PathLike | ModelConfig | None = None
                    ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(our state dict, ModelConfig) from a checkpoint; see the module docstring for the forms."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if p.is_file() and p.name == MODEL_STATES and is_expert_parallel(p.parent):
        p = p.parent   # an expert-parallel save: the experts are in the files next to it
    tag_dir = None
    if p.is_dir():
        tag_dir = find_tag_dir(p)
        if tag_dir is None:
            raise FileNotFoundError(f"{p} is not a checkpoint: expected a run directory with "
                                    f"checkpoints/latest, a directory with a 'latest' file, or a "
                                    f"directory holding {MODEL_STATES}")
        sd = _refused_as_export_error(model_state_dict, tag_dir)
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    elif p.suffix in (".pt", ".pth", ".bin"):
        sd = _refused_as_export_error(module_weights, p)
    else:
        raise ExportError(f"checkpoint {p}: expected a .safetensors/.pt/.pth/.bin file or a checkpoint "
                          "directory")

    if config is None and tag_dir is not None and (tag_dir / "meta.json").is_file():
        meta = json.loads((tag_dir / "meta.json").read_text())
        if isinstance(meta.get("model_config"), dict):
            # in the CSA mode the run trained in at that step (the plan's), as it ran
            config = ModelConfig.from_dict({**meta["model_config"],
                                            **({"attention_mode": meta["attention_mode"]}
                                               if "attention_mode" in meta else {})})
    if config is None:
        tried = _config_candidates(p, tag_dir)
        found = next((c for c in tried if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no model config found for {p}; looked for 'model_config' in "
                                    f"meta.json and {[str(c) for c in tried]}; pass one with --config")
        config = found
    cfg = read_model_config(config)
    check_state_dict(sd, cfg)
    return sd, cfg


def recorded_tokenizer(path: str | os.PathLike) -> tuple[str, str | None] | None:
    """(data.tokenizer, data.eos_token) the trainer recorded for a checkpoint: its meta.json
    (``job.data``), else the run's .hydra/config.yaml; None for a bare state-dict file."""
    p = Path(path)
    tag_dir = find_tag_dir(p) if p.is_dir() else (p.parent if p.name == MODEL_STATES else None)
    if tag_dir is None:
        return None
    data = None
    if (tag_dir / "meta.json").is_file():
        meta = json.loads((tag_dir / "meta.json").read_text())
        data = (meta.get("job") or {}).get("data")
        run_hydra = Path(meta.get("run_dir", tag_dir.parent.parent)) / ".hydra" / "config.yaml"
    else:
        run_hydra = tag_dir.parent.parent / ".hydra" / "config.yaml"
    if data is None and run_hydra.is_file():
        import yaml

        data = (yaml.safe_load(run_hydra.read_text()) or {}).get("data")
    if not data or not data.get("tokenizer"):
        return None
    return str(data["tokenizer"]), data.get("eos_token")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write a Hugging Face DeepseekV4 directory from a checkpoint")
    ex.add_argument("--checkpoint", required=True,
                    help="a .pt/.safetensors state dict, or a trainer run / checkpoints / step_* directory")
    ex.add_argument("--out", required=True, help="output directory (created atomically)")
    ex.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="fp32 (default, lossless) or bf16 (matrices; see the module docstring)")
    ex.add_argument("--config", default=None,
                    help="model config (.json/.yaml or a preset name); default: found next to the checkpoint")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    ex.add_argument("--bos-token-id", type=int, default=None)
    ex.add_argument("--eos-token-id", type=int, default=None)
    ex.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024 ** 3)
    ex.add_argument("--tokenizer", default=None,
                    help="the training tokenizer to export (gpt2-embedded, a HF name or directory); "
                         "default: the one the trainer recorded with the checkpoint; 'none': skip")
    args = ap.parse_args(argv)
    try:
        sd, cfg = load_checkpoint(args.checkpoint, args.config)
        tokenizer = (None if args.tokenizer == "none" else (args.tokenizer, None) if args.tokenizer
                     else recorded_tokenizer(args.checkpoint))
        out = export_hf(sd, cfg, args.out, args.dtype, overwrite=args.overwrite,
                        max_shard_bytes=int(args.max_shard_gb * 1024 ** 3),
                        hf_overrides={"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id},
                        tokenizer=tokenizer)
    except (FileNotFoundError, ExportError, ConfigError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None and args.tokenizer != "none":
        print(f"note: no tokenizer recorded with {args.checkpoint}: the export has none (give "
              "--tokenizer, e.g. gpt2-embedded, for AutoTokenizer and bos/eos ids)", file=sys.stderr)
    n = sum(t.numel() for t in sd.values())
    print(f"exported {cfg.name} ({n / 1e6:.2f}M tensors' elements, {args.dtype}"
          + (f", tokenizer {tokenizer[0]}" if tokenizer else "") + f") to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
