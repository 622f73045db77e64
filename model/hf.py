"""Hugging Face export: our Transformer -> a transformers ``DeepseekV4ForCausalLM`` directory.

Python API:
    to_hf_config(cfg)                       ModelConfig -> DeepseekV4Config (refuses what HF cannot express)
    hf_state_dict(model_or_sd, cfg)         our tensors under the names the export writes
    from_hf_state_dict(tensors, cfg)        the inverse (an export read back -> our state dict)
    export_hf(model_or_sd, cfg, out, dtype) writes config.json + safetensors, atomically
    load_export(dir)                        (state dict, ModelConfig) from an export

Names in the export
-------------------
* Main model: exactly the parameter names of ``transformers.DeepseekV4ForCausalLM`` (5.23), so the
  file loads with no renaming (``model.layers.i.self_attn.q_a_proj.weight`` ...). Our names map
  one to one (docs/ARCHITECTURE.md); two tensors change layout:
  ``experts.{w1, w3}`` [E, inter, D] -> ``gate_up_proj = cat([w1, w3], dim=1)`` [E, 2 inter, D]
  (gate first: HF splits with chunk(2)), ``experts.w2`` -> ``down_proj``.
* MTP: HF does not instantiate MTP (``num_nextn_predict_layers`` is only recorded) and ignores
  ``mtp.*`` keys when loading (``_keys_to_ignore_on_load_unexpected``). We write the MTP modules
  into the same safetensors under the names of DeepSeek's released V4 checkpoints
  (``mtp.{k}.enorm.weight``, ``mtp.{k}.e_proj.weight``, ``mtp.{k}.hc_head_fn``,
  ``mtp.{k}.attn.wq_a.weight``, ``mtp.{k}.ffn.experts.{e}.w1.weight``,
  ``mtp.{k}.hc_attn_fn``, ... the MTP block's parameters sit directly under ``mtp.{k}``, as the
  official ``MTPBlock(Block)``), so nothing is dropped. Note that HF's ``save_pretrained`` of a
  loaded export does drop them (HF never loaded them).
* dtype: ``bf16`` casts the matrices; 1-D tensors (norm weights, sinks, router bias, mHC
  base/scale), the mHC ``fn`` and the compressor position biases stay fp32 (HF keeps all of
  these in fp32 too: ``_keep_in_fp32_modules_strict``); ``tid2eid`` stays int64.

Differences from HF that stay (deliberate, documented)
-----------------------------------------------------
* ``attention_mode="dense"`` (our curriculum phase in which CSA attends every visible compressed
  entry) has no HF equivalent: HF (and DeepSeek's inference code) always use the indexer's
  top-k. The export records the architecture; a model exported mid-dense-phase runs sparse in HF.
* Packed documents are a training feature: HF runs one document per row from position 0, which
  is our single-document case (that is what the parity test compares).
* HF's mask/top-k run on the same visibility rule as ours (entry i visible to query t iff
  i < (t+1)//m); exact score ties in the indexer's top-k may be broken differently
  (torch.topk's order among equal scores is unspecified). A score is exactly 0 when every head's
  ReLU is 0, which is frequent with few indexer heads (4 heads: ~6% of entries at init, more
  after training; micro's 2 heads too) and improbable with the presets' >= 16 (tiny: 0 of 65K
  entries at init); the parity test runs the default tiny model and checks for ties.

Reading checkpoints (a trainer run, a DeepSpeed save, a state-dict file) and the export command
line are ``train/export.py`` (``python -m train.export``): model/ knows no DeepSpeed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from model.config import ConfigError, ModelConfig

EXPORT_MODEL_CONFIG = "hybridlm_model_config.json"  # our ModelConfig, written next to config.json
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

HF_LAYER_TYPES = {"window": "sliding_attention", "csa": "compressed_sparse_attention",
                  "hca": "heavily_compressed_attention"}

# Names inside one attention layer: ours -> HF (prefix match, most specific first). The HF
# compressor owns the indexer (``compressor.indexer.*``); the scorer owns ``weights_proj``.
HF_ATTENTION_RENAMES: tuple[tuple[str, str], ...] = (
    ("indexer.compressor.wkv.", "compressor.indexer.kv_proj."),
    ("indexer.compressor.wgate.", "compressor.indexer.gate_proj."),
    ("indexer.compressor.ape", "compressor.indexer.position_bias"),
    ("indexer.compressor.norm.", "compressor.indexer.kv_norm."),
    ("indexer.wq_b.", "compressor.indexer.q_b_proj."),
    ("indexer.weights_proj.", "compressor.indexer.scorer.weights_proj."),
    ("compressor.wkv.", "compressor.kv_proj."),
    ("compressor.wgate.", "compressor.gate_proj."),
    ("compressor.ape", "compressor.position_bias"),
    ("compressor.norm.", "compressor.kv_norm."),
    ("wq_a.", "q_a_proj."),
    ("q_norm.", "q_a_norm."),
    ("wq_b.", "q_b_proj."),
    ("wkv.", "kv_proj."),
    ("kv_norm.", "kv_norm."),
    ("wo_a.", "o_a_proj."),
    ("wo_b.", "o_b_proj."),
    ("sink", "sinks"),
)


class ExportError(ValueError):
    """A model, config or checkpoint the export cannot handle; the message says why."""


# ============================================================================ config
def check_exportable(cfg: ModelConfig) -> None:
    """Raise ExportError naming the field if HF's DeepseekV4 cannot represent ``cfg``."""
    def refuse(fld: str, msg: str) -> None:
        raise ExportError(f"model.{fld}: {msg}; transformers' DeepseekV4 cannot represent this model")

    if cfg.hyper_connections != "mhc":
        refuse("hyper_connections", f"is {cfg.hyper_connections!r}, HF implements only 'mhc'")
    if cfg.n_shared_experts != 1:
        refuse("n_shared_experts", f"is {cfg.n_shared_experts}, HF has exactly one shared expert "
                                   "of width moe_inter_dim")
    if cfg.swiglu_limit <= 0:
        refuse("swiglu_limit", f"is {cfg.swiglu_limit} (clamp disabled), HF always clamps")
    hca = sorted({r for r in cfg.compress_ratios if r and not cfg.is_csa(r)})
    if len(hca) > 1:
        refuse("compress_ratios", f"has several HCA ratios {hca}, HF has one rate per layer type")


def to_hf_config(cfg: ModelConfig, **overrides: Any):
    """The ``transformers.DeepseekV4Config`` of ``cfg``. ``overrides`` set further HF fields
    (e.g. ``bos_token_id``, ``eos_token_id``); token ids default to None (the tokenizer is not
    part of ModelConfig)."""
    from transformers import DeepseekV4Config

    check_exportable(cfg)
    layer_types = [HF_LAYER_TYPES[cfg.layer_kind(i)] for i in range(cfg.n_layers)]
    hca = sorted({r for r in cfg.compress_ratios if r and not cfg.is_csa(r)})
    compress_rates = {"compressed_sparse_attention": cfg.csa_ratio,
                      # unused when no layer is HCA; keep DeepSeek's default then
                      "heavily_compressed_attention": hca[0] if hca else 128}
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=1, head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank, partial_rotary_factor=cfg.rope_dim / cfg.head_dim,
        o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank, sliding_window=cfg.window,
        layer_types=layer_types, compress_rates=compress_rates,
        index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta,
        # YaRN on the compressed layers only; HF forces attention_factor = 1 (no mscale), as V4
        rope_parameters={"rope_type": "yarn", "factor": cfg.yarn_factor,
                         "original_max_position_embeddings": cfg.yarn_original_max_pos,
                         "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow},
        max_position_embeddings=cfg.max_seq_len,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.n_activated_experts, moe_intermediate_size=cfg.moe_inter_dim,
        scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=cfg.route_scale,
        swiglu_limit=cfg.swiglu_limit,
        mlp_layer_types=["hash_moe" if i < cfg.n_hash_layers else "moe" for i in range(cfg.n_layers)],
        hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
        num_nextn_predict_layers=cfg.mtp_depth, rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    kwargs.update(overrides)
    hcfg = DeepseekV4Config(**kwargs)
    hcfg.architectures = ["DeepseekV4ForCausalLM"]
    return hcfg


# ============================================================================ names
def hf_attention_name(name: str) -> str:
    """A parameter name inside our Attention -> its name inside HF's DeepseekV4Attention."""
    for ours, theirs in HF_ATTENTION_RENAMES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ExportError(f"attention parameter {name!r} has no Hugging Face name")


_HF_BLOCK_RENAMES: tuple[tuple[str, str], ...] = (
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("hc_attn.", "attn_hc."),
    ("hc_ffn.", "ffn_hc."),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared.w1.", "mlp.shared_experts.gate_proj."),
    ("ffn.shared.w3.", "mlp.shared_experts.up_proj."),
    ("ffn.shared.w2.", "mlp.shared_experts.down_proj."),
)

# DeepSeek's released checkpoints (used for the MTP block): same as ours except these.
_OFFICIAL_BLOCK_RENAMES: tuple[tuple[str, str], ...] = (
    ("hc_attn.fn", "hc_attn_fn"), ("hc_attn.base", "hc_attn_base"), ("hc_attn.scale", "hc_attn_scale"),
    ("hc_ffn.fn", "hc_ffn_fn"), ("hc_ffn.base", "hc_ffn_base"), ("hc_ffn.scale", "hc_ffn_scale"),
    ("attn.sink", "attn.attn_sink"),
    ("ffn.shared.", "ffn.shared_experts."),
    ("attn_norm.", "attn_norm."), ("ffn_norm.", "ffn_norm."), ("attn.", "attn."),
    ("ffn.gate.", "ffn.gate."),
)

_EXPERT_RE = re.compile(r"^(?P<prefix>.*ffn\.experts)\.(?P<w>w[123])$")


def _rename(name: str, rules: tuple[tuple[str, str], ...], what: str) -> str:
    for ours, theirs in rules:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ExportError(f"{what} parameter {name!r} has no name in the export")


def _hf_block_name(name: str) -> str:
    if name.startswith("attn."):
        return "self_attn." + hf_attention_name(name[len("attn."):])
    return _rename(name, _HF_BLOCK_RENAMES, "block")


def export_name(name: str) -> str:
    """Our (non-expert) state-dict name -> its name in the export. Raises on anything unknown."""
    top = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
           "norm.weight": "model.norm.weight", "hc_head.fn": "model.hc_head.hc_fn",
           "hc_head.base": "model.hc_head.hc_base", "hc_head.scale": "model.hc_head.hc_scale"}
    if name in top:
        return top[name]
    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if m:
        return f"model.layers.{m[1]}.{_hf_block_name(m[2])}"
    m = re.match(r"^mtp\.(\d+)\.(.+)$", name)
    if m:
        k, rest = m[1], m[2]
        if rest.startswith("block."):
            return f"mtp.{k}." + _rename(rest[len("block."):], _OFFICIAL_BLOCK_RENAMES, "MTP block")
        if rest.startswith("hc_head."):
            return f"mtp.{k}.hc_head_" + rest[len("hc_head."):]
        if rest in ("enorm.weight", "hnorm.weight", "e_proj.weight", "h_proj.weight", "norm.weight"):
            return f"mtp.{k}.{rest}"
    raise ExportError(f"parameter {name!r} has no name in the export")


def _export_expert_prefix(prefix: str) -> str:
    """'layers.3.ffn.experts' -> 'model.layers.3.mlp.experts'; 'mtp.0.block.ffn.experts' -> 'mtp.0.ffn.experts'."""
    m = re.match(r"^layers\.(\d+)\.ffn\.experts$", prefix)
    if m:
        return f"model.layers.{m[1]}.mlp.experts"
    m = re.match(r"^mtp\.(\d+)\.block\.ffn\.experts$", prefix)
    if m:
        return f"mtp.{m[1]}.ffn.experts"
    raise ExportError(f"expert parameters under {prefix!r} have no name in the export")


# ============================================================================ state dicts
def expected_state_dict(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of our Transformer's state dict for ``cfg`` (built on meta)."""
    from model.transformer import build_on_meta

    return {k: (tuple(v.shape), v.dtype) for k, v in build_on_meta(cfg).state_dict().items()}


def check_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Raise ExportError if ``sd`` is not a complete state dict of Transformer(cfg)."""
    want = expected_state_dict(cfg)
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = [f"{k}: {tuple(sd[k].shape)} != {want[k][0]}" for k in want
             if k in sd and tuple(sd[k].shape) != want[k][0]]
    if missing or unexpected or wrong:
        def head(xs):
            return xs[:8] + (["..."] if len(xs) > 8 else [])
        raise ExportError(f"the state dict does not match the model config {cfg.name!r}: "
                          f"missing {head(missing)}, unexpected {head(unexpected)}, "
                          f"wrong shapes {head(wrong)}")


def _as_state_dict(model_or_sd) -> dict[str, torch.Tensor]:
    if isinstance(model_or_sd, nn.Module):
        return model_or_sd.state_dict()
    if isinstance(model_or_sd, Mapping):
        return dict(model_or_sd)
    raise TypeError(f"expected a Transformer or a state dict, got {type(model_or_sd).__name__}")


@torch.no_grad()
def hf_state_dict(model_or_sd, cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Our weights under the export's names (HF names for the main model, DeepSeek's names for
    MTP; see the module docstring). Every tensor of ours lands somewhere or this raises."""
    if cfg is None:
        if not isinstance(model_or_sd, nn.Module) or not isinstance(getattr(model_or_sd, "cfg", None), ModelConfig):
            raise TypeError("hf_state_dict: pass cfg when giving a state dict")
        cfg = model_or_sd.cfg
    sd = _as_state_dict(model_or_sd)
    if getattr(model_or_sd, "cfg", None) is not cfg:  # a module's own state dict fits its config
        check_state_dict(sd, cfg)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m["prefix"], {})[m["w"]] = t
        else:
            out[export_name(name)] = t.detach()
    for prefix, w in experts.items():
        target = _export_expert_prefix(prefix)
        if target.startswith("model."):
            # HF fuses gate and up: [E, 2*inter, D], gate first (chunk(2) in HF's _apply_gate)
            out[f"{target}.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)
            out[f"{target}.down_proj"] = w["w2"].detach()
        else:  # DeepSeek's layout: one matrix per expert
            for wn in ("w1", "w2", "w3"):
                for e in range(w[wn].shape[0]):
                    out[f"{target}.{e}.{wn}.weight"] = w[wn][e]
    if len(set(out)) != len(out):  # cannot happen with the tables above; guards future edits
        raise ExportError("two parameters map to the same exported name")
    return out


@torch.no_grad()
def from_hf_state_dict(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``hf_state_dict``: exported tensors -> our state dict (strict)."""
    want = expected_state_dict(cfg)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise ExportError(f"the export lacks {key!r}")
        used.add(key)
        return tensors[key]

    expert_prefixes = sorted({m["prefix"] for k in want if (m := _EXPERT_RE.match(k))})
    for name in want:
        if not _EXPERT_RE.match(name):
            out[name] = take(export_name(name))
    for prefix in expert_prefixes:
        src = _export_expert_prefix(prefix)
        if src.startswith("model."):
            w1, w3 = take(f"{src}.gate_up_proj").chunk(2, dim=1)
            out[f"{prefix}.w1"], out[f"{prefix}.w3"] = w1.contiguous(), w3.contiguous()
            out[f"{prefix}.w2"] = take(f"{src}.down_proj")
        else:
            n_exp = want[f"{prefix}.w1"][0][0]
            for wn in ("w1", "w2", "w3"):
                out[f"{prefix}.{wn}"] = torch.stack([take(f"{src}.{e}.{wn}.weight") for e in range(n_exp)])
    extra = sorted(set(tensors) - used)
    if extra:
        raise ExportError(f"the export has tensors this model config does not use: {extra[:8]}")
    return out


def _keeps_fp32(name: str, t: torch.Tensor) -> bool:
    """Tensors HF (and DeepSeek's checkpoints) keep in fp32 even in a bf16 model."""
    return t.dim() == 1 or name.endswith(("position_bias", ".ape", "_fn", "_hc.fn"))


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.to(torch.float32 if _keeps_fp32(name, t) else dtype)


# ============================================================================ writing
def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with its own storage (safetensors refuses shared storage)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(out / SAFETENSORS_SINGLE), metadata=meta)
        return [SAFETENSORS_SINGLE]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        files.append(fname)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [SAFETENSORS_INDEX]


def export_hf(model_or_sd, cfg: ModelConfig | None, out_dir: str | os.PathLike, dtype: str = "fp32",
              *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
              hf_overrides: Mapping[str, Any] | None = None,
              tokenizer: tuple[str, str | None] | None = None) -> Path:
    """Write a transformers DeepseekV4 directory: config.json, model.safetensors (or shards +
    model.safetensors.index.json), hybridlm_model_config.json (our config, for the way back)
    and, given ``tokenizer`` = (data.tokenizer, data.eos_token) of the training run, its
    tokenizer files, whose bos/eos ids go into config.json (``hf_overrides`` that are not None
    win).

    Atomic: everything is written into a temporary sibling directory that then replaces
    ``out_dir`` (os.replace). An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    The directory and files get the usual permissions (the umask's), not mkdtemp's private 0700.
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if max_shard_bytes < 1:
        raise ExportError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    if cfg is None:
        cfg = getattr(model_or_sd, "cfg", None)
        if not isinstance(cfg, ModelConfig):
            raise TypeError("export_hf: pass cfg when giving a state dict")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty (use overwrite / --overwrite)")

    overrides = {k: v for k, v in (hf_overrides or {}).items() if v is not None}
    hcfg = to_hf_config(cfg, **overrides)
    hcfg.dtype = "bfloat16" if dtype == "bf16" else "float32"
    tensors = {k: _owned(_cast(k, t, DTYPES[dtype])) for k, t in hf_state_dict(model_or_sd, cfg).items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        if tokenizer is not None:
            from data.tokenizer import save_hf_tokenizer

            ids = save_hf_tokenizer(tokenizer[0], tokenizer[1], tmp)
            for key, value in ids.items():
                if key not in overrides:
                    setattr(hcfg, key, value)
        hcfg.save_pretrained(str(tmp))
        (tmp / EXPORT_MODEL_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        _write_safetensors(tensors, tmp, max_shard_bytes)
        _umask_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _umask_permissions(directory: Path) -> None:
    """Directory 0777 and files 0666 minus the umask, as a plain mkdir/open would have made them."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


# ============================================================================ reading
def read_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an export directory (single file or index + shards)."""
    from safetensors.torch import load_file

    d = Path(path)
    if (d / SAFETENSORS_INDEX).is_file():
        index = json.loads((d / SAFETENSORS_INDEX).read_text())
        out: dict[str, torch.Tensor] = {}
        for fname in sorted(set(index["weight_map"].values())):
            out.update(load_file(str(d / fname)))
        if set(out) != set(index["weight_map"]):
            raise ExportError(f"{d / SAFETENSORS_INDEX} does not match the shards' contents")
        return out
    if (d / SAFETENSORS_SINGLE).is_file():
        return load_file(str(d / SAFETENSORS_SINGLE))
    raise FileNotFoundError(f"{d}: neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX} found")


def load_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """An export written by ``export_hf`` -> (our state dict, our ModelConfig)."""
    d = Path(path)
    cfg_file = d / EXPORT_MODEL_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not an export written by model.hf")
    cfg = ModelConfig.from_dict(json.loads(cfg_file.read_text()))
    return from_hf_state_dict(read_safetensors_dir(d), cfg), cfg


def read_model_config(source: str | os.PathLike | ModelConfig) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a .json/.yaml file (flat fields, or a composed Hydra
    config with a ``model`` node), or a preset name."""
    if isinstance(source, ModelConfig):
        return source
    p = Path(source)
    if not p.is_file():
        if p.suffix or os.sep in str(source):
            raise FileNotFoundError(f"model config file {p} not found")
        return ModelConfig.from_preset(str(source))
    if p.suffix == ".json":
        d = json.loads(p.read_text())
    elif p.suffix in (".yaml", ".yml"):
        from omegaconf import OmegaConf  # resolves Hydra interpolations in a composed config

        d = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    else:
        raise ExportError(f"model config {p}: expected a .json or .yaml file")
    if not isinstance(d, dict):
        raise ExportError(f"model config {p}: expected a mapping at the top level")
    if isinstance(d.get("model"), dict):
        d = d["model"]
    d = {k: v for k, v in d.items() if not str(k).startswith("_")}
    try:
        return ModelConfig.from_dict(d)
    except ConfigError as e:
        raise ExportError(f"model config {p}: {e}") from e


if __name__ == "__main__":   # the export command moved to train/ (it reads DeepSpeed checkpoints)
    raise SystemExit("python -m model.hf export moved: run python -m train.export export "
                     "--checkpoint RUN/checkpoints --out DIR (same options)")
