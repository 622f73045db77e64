"""DeepSpeed's checkpoint formats (deepspeed==0.19.8): the one module that knows their files.

    find_tag_dir(path)                   a save's tag directory from a run dir, a save dir or itself
    model_state_dict(tag_dir)            our state dict from one save: the module weights (ZeRO-0),
                                         the fp32 ZeRO masters (DeepSpeed's consolidation), or an
                                         expert-parallel save stacked in global expert order
    to_universal(tag_dir, out_dir=None)  DeepSpeed's universal (reshardable) format, Muon state kept
    load_universal(engine, dir)          a universal checkpoint into an engine of any world size

Every file is read through the restricted unpickler first (``train/safe_load.py``): DeepSpeed's
own loaders and converter unpickle fully, so a file that names code is refused before they
open it. Errors are ``CheckpointError`` naming the file (``UnreadableFileError`` /
``UnsafeFileError`` from ``to_universal``'s check of its input).

Expert-parallel saves (``parallel.ep_size > 1``; DeepSpeed's per-expert files
``layer_<l>_expert_<e>_mp_rank_00_model_states.pt``, keys
``<module>.deepspeed_moe.experts.deepspeed_experts.<global e>.w1``) are read here without
DeepSpeed (its consolidation would mix up the expert groups). The experts of every MoE layer
are stacked in global order (EP rank p's local expert i is global expert p * E/P + i, the id in
the file name and key); every expert of every layer must be there exactly once. ZeRO-0: the
module weights (main file + expert files). ZeRO-1/2: the fp32 master weights from the optimizer
shards (``zero_pp_rank_*``): a non-expert group is partitioned over all W ranks, an expert group
(``moe``, named ``ep_size_P``) of EP rank p over its expert-data-parallel ranks p, p+P, ...;
each parameter's fragments (``param_slice_mappings``) are concatenated in that rank order, and
every consolidated tensor must equal the saved module weight after a cast to its dtype (a check
of the layout that refuses instead of returning wrong weights). Refused: ZeRO-3 with experts,
missing / duplicate expert files, model parallelism.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from train.safe_load import (UnreadableFileError, deepspeed_files, load_deepspeed_file,
                             torch_files, verify_files)

MODEL_STATES = "mp_rank_00_model_states.pt"
UNIVERSAL_SUFFIX = "_universal"
MUON_STATE_KEY = "momentum_buffer"
_ZERO_GLOB = "zero_pp_rank_*"
_EXPERT_GLOB = "layer_*_expert_*_model_states.pt"
_EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_EXPERT_KEY_RE = re.compile(
    r"^(?P<module>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<e>\d+)\.(?P<w>w[123])$")
_ZERO_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read, converted or loaded; the message says why."""


def read_file(path: Path) -> Any:
    """One torch file of a save through the restricted unpickler (tensors, plain data and
    DeepSpeed's few data classes): a crafted file cannot run code."""
    try:
        return load_deepspeed_file(path)
    except UnreadableFileError as err:
        raise CheckpointError(str(err)) from None


def verified(files, what: str) -> None:
    """``verify_files`` with the failure as a ``CheckpointError`` that says whose files they are."""
    try:
        verify_files(files)
    except UnreadableFileError as err:
        raise CheckpointError(f"{what}: {err}") from None


# ------------------------------------------------------------------------ model weights of a save
def find_tag_dir(path: Path) -> Path | None:
    """A DeepSpeed tag directory from a run dir, a save dir (with ``latest``) or the tag dir."""
    if (path / MODEL_STATES).is_file():
        return path
    for save_dir in (path, path / "checkpoints"):
        latest = save_dir / "latest"
        if latest.is_file():
            tag_dir = save_dir / latest.read_text().strip()
            if not (tag_dir / MODEL_STATES).is_file():
                raise FileNotFoundError(f"{latest} names {tag_dir.name!r} but {tag_dir / MODEL_STATES} "
                                        "does not exist")
            return tag_dir
    return None


def is_expert_parallel(tag_dir: Path) -> bool:
    return any(Path(tag_dir).glob(_EXPERT_GLOB))


def module_weights(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict file, or DeepSpeed's model-states file (its state dict under 'module')."""
    obj = read_file(path)
    if isinstance(obj, Mapping) and "module" in obj and isinstance(obj["module"], Mapping):
        obj = obj["module"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor) or a DeepSpeed "
                              "model-states file with the state dict under 'module'")
    return dict(obj)


def model_state_dict(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """Our state dict from one save (see the module docstring for the forms)."""
    tag_dir = Path(tag_dir)
    if is_expert_parallel(tag_dir):
        return consolidate_expert_parallel(tag_dir)
    if any(tag_dir.glob(_ZERO_GLOB)):
        return consolidate_zero(tag_dir)
    return module_weights(tag_dir / MODEL_STATES)


def consolidate_zero(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO-sharded checkpoint (DeepSpeed's own consolidation)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:   # DeepSpeed's consolidation unpickles every file fully: refuse one that names code
        verify_files(deepspeed_files(tag_dir))
    except UnreadableFileError as err:
        raise CheckpointError(str(err)) from None
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))


# ------------------------------------------------------------------------ expert-parallel saves
def _ep_refuse(tag_dir: Path, msg: str) -> CheckpointError:
    return CheckpointError(f"expert-parallel checkpoint {tag_dir}: {msg}")


def _gather_expert_files(tag_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's per-expert files -> ``{<module>.w1: [E, ...], ...}`` in global expert order."""
    found: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(tag_dir.glob(_EXPERT_GLOB)):
        m = _EXPERT_FILE_RE.match(f.name)
        if m is None or int(m[3]) != 0:
            raise _ep_refuse(tag_dir, f"unexpected expert file {f.name} (model parallelism, "
                                      f"mp_rank != 00, is not supported)")
        file_expert = int(m[2])
        obj = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(obj, Mapping) or not obj:
            raise _ep_refuse(tag_dir, f"{f.name} holds no expert weights")
        for key, t in obj.items():
            k = _EXPERT_KEY_RE.match(key)
            if k is None or not isinstance(t, torch.Tensor):
                raise _ep_refuse(tag_dir, f"{f.name}: unexpected entry {key!r} (expected "
                                          f"'<module>.deepspeed_moe.experts.deepspeed_experts.<e>.w1|w2|w3')")
            if int(k["e"]) != file_expert:
                raise _ep_refuse(tag_dir, f"{f.name} holds {key!r}, another expert than its name")
            slot = found.setdefault(f"{k['module']}.{k['w']}", {})
            if file_expert in slot:
                raise _ep_refuse(tag_dir, f"expert {file_expert} of {k['module']}.{k['w']} is saved twice")
            slot[file_expert] = t
    out = {}
    for name, per_expert in found.items():
        n = max(per_expert) + 1
        missing = sorted(set(range(n)) - set(per_expert))
        if missing:
            raise _ep_refuse(tag_dir, f"{name}: the files of experts {missing} are missing "
                                      f"(found {len(per_expert)} of at least {n})")
        out[name] = torch.stack([per_expert[e] for e in range(n)])
    counts = {name: t.shape[0] for name, t in out.items()}
    if len(set(counts.values())) > 1:   # the highest expert id of some layer is missing
        raise _ep_refuse(tag_dir, f"the MoE layers have different numbers of expert files: {counts}")
    return out


def _zero_optim_files(tag_dir: Path) -> list[Path]:
    files: dict[int, Path] = {}
    for f in tag_dir.glob("*_optim_states.pt"):
        m = _ZERO_OPTIM_RE.match(f.name)
        if m is None:
            continue
        if int(m[2]) != 0:
            raise _ep_refuse(tag_dir, f"{f.name}: model parallelism (mp_rank != 00) is not supported")
        files[int(m[1])] = f
    if files and sorted(files) != list(range(len(files))):
        raise _ep_refuse(tag_dir, f"ZeRO optimizer shards of ranks {sorted(files)} found; expected "
                                  f"ranks 0..{len(files) - 1}")
    return [files[r] for r in range(len(files))]


def _merge_zero12_masters(tag_dir: Path, main: Mapping[str, Any], optim_files: list[Path]
                          ) -> dict[str, torch.Tensor]:
    """fp32 master weights of a ZeRO-1/2 checkpoint with expert groups (see the module docstring)."""
    world = len(optim_files)
    shards = []
    for f in optim_files:
        osd = read_file(f).get("optimizer_state_dict", {})
        if "fp32_flat_groups" in osd or int(osd.get("zero_stage", 0)) == 3:
            raise _ep_refuse(tag_dir, "ZeRO-3 with expert parallelism is not supported (the trainer "
                                      "refuses it too)")
        if "single_partition_of_fp32_groups" not in osd or "param_slice_mappings" not in osd:
            raise _ep_refuse(tag_dir, f"{f.name} is not a ZeRO-1/2 optimizer shard (no "
                                      f"single_partition_of_fp32_groups / param_slice_mappings)")
        shards.append(osd)
    shapes = main.get("param_shapes")
    groups = (shards[0].get("base_optimizer_state") or {}).get("param_groups") \
        if isinstance(shards[0].get("base_optimizer_state"), Mapping) else None
    if not isinstance(shapes, list) or not isinstance(groups, list) or len(groups) != len(shapes):
        raise _ep_refuse(tag_dir, "cannot match the optimizer's parameter groups with the model's "
                                  "param_shapes")
    out: dict[str, torch.Tensor] = {}
    for gi, (group, group_shapes) in enumerate(zip(groups, shapes)):
        if group.get("moe"):
            m = re.fullmatch(r"ep_size_(\d+)", str(group.get("name")))
            if m is None:
                raise _ep_refuse(tag_dir, f"expert group {gi} is named {group.get('name')!r}, "
                                          f"expected 'ep_size_<P>'")
            ep = int(m[1])
            if ep < 1 or world % ep:
                raise _ep_refuse(tag_dir, f"expert group {group.get('name')} does not divide the "
                                          f"{world} ranks")
            # DeepSpeed's groups: EP rank of global rank r is r % P, its EDP rank r // P
            holders = [list(range(p, world, ep)) for p in range(ep)]
        else:
            holders = [list(range(world))]
        for name, shape in group_shapes.items():
            shape = tuple(shape)
            slices = []
            for ranks in holders:
                pieces = []
                for r in ranks:
                    addr = shards[r]["param_slice_mappings"][gi].get(name)
                    if addr is not None and addr.numel > 0:
                        flat = shards[r]["single_partition_of_fp32_groups"][gi]
                        pieces.append(flat.narrow(0, addr.start, addr.numel))
                numel = sum(x.numel() for x in pieces)
                if numel != math.prod(shape):
                    raise _ep_refuse(tag_dir, f"{name}: the optimizer shards of ranks {ranks} hold "
                                              f"{numel} of its {math.prod(shape)} elements")
                slices.append(torch.cat(pieces).view(shape).float())
            out[name] = slices[0] if len(slices) == 1 else torch.cat(slices)
    return out


def consolidate_expert_parallel(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """Our state dict from one tag directory of an expert-parallel DeepSpeed save (ZeRO-0/1/2).
    Raises CheckpointError (before anything is written) on a layout it cannot consolidate."""
    tag_dir = Path(tag_dir)
    main = read_file(tag_dir / MODEL_STATES)
    module = main.get("module") if isinstance(main, Mapping) else None
    if not isinstance(module, Mapping):
        raise _ep_refuse(tag_dir, f"{MODEL_STATES} has no 'module' state dict")
    leaked = [k for k in module if _EXPERT_KEY_RE.match(k)]
    if leaked:
        raise _ep_refuse(tag_dir, f"expert weights in {MODEL_STATES} as well: {leaked[:4]}")
    experts = _gather_expert_files(tag_dir)
    clash = sorted(set(experts) & set(module))
    if clash:
        raise _ep_refuse(tag_dir, f"{clash[:4]} are both in {MODEL_STATES} and in expert files")
    saved = {**{k: v for k, v in module.items() if isinstance(v, torch.Tensor)}, **experts}
    optim_files = _zero_optim_files(tag_dir)
    if not optim_files:     # ZeRO-0: the module weights are the weights
        return saved
    masters = _merge_zero12_masters(tag_dir, main, optim_files)
    out = dict(saved)
    for name, master in masters.items():
        if name not in saved:
            raise _ep_refuse(tag_dir, f"{name} is in the optimizer shards but not in the saved "
                                      f"module weights")
        ref = saved[name]
        if tuple(master.shape) != tuple(ref.shape) or not torch.equal(master.to(ref.dtype), ref):
            raise _ep_refuse(tag_dir, f"{name}: the weights consolidated from the ZeRO shards "
                                      f"{tuple(master.shape)} disagree with the saved module weights "
                                      f"{tuple(ref.shape)}; this shard layout is not understood, "
                                      f"refusing to use them")
        out[name] = master
    return out


# ------------------------------------------------------------------------ universal checkpoints
def to_universal(tag_dir: str | Path, out_dir: str | Path | None = None, workers: int = 1) -> Path:
    """DeepSpeed's universal (reshardable) checkpoint of one ZeRO-1/2/3 save (``<save_dir>/<tag>``)
    with Muon state, written to ``out_dir`` (default: ``<tag_dir>_universal``); refuses (before
    writing anything) what it cannot convert.

    ``python -m deepspeed.checkpoint.ds_to_universal`` (0.19.8) reads Adam's state slots
    (exp_avg, exp_avg_sq) of every param group (ZeRO-3: sub-group) and fails on Muon groups, whose
    only state is the momentum. So the converter runs on a staging copy of the checkpoint in
    which the Muon momentum sits in the exp_avg slot (with a zero exp_avg_sq, and at stage 3 the
    AdamW step, which DeepSpeed's stage-3 loader reads from the first sub-group):
    - ZeRO-1/2: the universal format stores any state key (one ``<key>.pt`` per parameter,
      restored by name), so the momentum comes out renamed to ``momentum_buffer.pt``.
    - ZeRO-3: DeepSpeed's stage-3 loader reads exactly fp32/exp_avg/exp_avg_sq, so the momentum
      stays in ``exp_avg.pt``; ``load_universal`` moves it back into the Muon
      state after loading.
    Expert parallelism (ZeRO-1/2; ``parallel.ep_size`` equal to the world size, so the expert
    groups are not partitioned further): rank r's ZeRO shard holds the whole slice of experts
    [r E/P, (r+1) E/P) of each expert stack; the staging copy declares the full ``[E, ...]``
    shape, so the converter's concatenation over ranks is the consolidated stack.
    Load the result with ``load_universal`` at any world size (experts unsharded, ``ep_size=1``).
    """
    src = Path(tag_dir)
    out = Path(out_dir) if out_dir is not None else src.with_name(src.name + UNIVERSAL_SUFFIX)
    # DeepSpeed's converter unpickles every file fully: refuse one that names code first
    verify_files(deepspeed_files(src))
    optim_files = sorted(f for f in src.glob("*_optim_states.pt") if not f.name.startswith("expp_rank_"))
    if not optim_files:
        if any(src.glob("expp_rank_*_optim_states.pt")):
            raise ValueError(f"to_universal: {src} is a ZeRO stage 0 checkpoint with expert "
                             f"parallelism (expp_rank_* optimizer files): it has no ZeRO shards "
                             f"to reshard; save with deepspeed=zero1|zero2 to convert")
        raise FileNotFoundError(f"to_universal: no ZeRO optimizer shards (*_optim_states.pt) in {src}")
    model_files = sorted(f for f in src.glob("*mp_rank_*_model_states.pt")
                         if not f.name.startswith("layer_"))
    stage3, ep_groups = _convertible(src, optim_files)
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    muon_params: set[str] = set()
    try:
        for f in src.iterdir():
            if f.is_file() and f not in optim_files and f not in model_files \
                    and not f.name.startswith(("layer_", "expp_rank_")):
                (staging / f.name).symlink_to(f.resolve())
        shapes = load_deepspeed_file(model_files[0])["param_shapes"]
        for f in model_files:
            sd = load_deepspeed_file(f)
            for gi, name in ep_groups.items():      # local expert slices -> the whole stack
                ep_size = int(str(name).rsplit("_", 1)[-1])
                for pname, shape in sd["param_shapes"][gi].items():
                    sd["param_shapes"][gi][pname] = torch.Size((shape[0] * ep_size, *shape[1:]))
            torch.save(sd, staging / f.name)
        for f in optim_files:
            sd = load_deepspeed_file(f)
            muon_params.update(_muon_state_as_adam(sd["optimizer_state_dict"], stage3, shapes))
            torch.save(sd, staging / f.name)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(staging), "--output_folder", str(out), "--inject_missing_state",
               "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"to_universal: DeepSpeed's converter failed:\n{result.stdout[-3000:]}"
                               f"\n{result.stderr[-3000:]}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not stage3:
        for name in muon_params:
            folder = out / "zero" / name
            (folder / "exp_avg.pt").rename(folder / f"{MUON_STATE_KEY}.pt")
            (folder / "exp_avg_sq.pt").unlink()
    return out


def _convertible(src: Path, optim_files: list[Path]) -> tuple[bool, dict[int, str]]:
    """(ZeRO-3?, the expert groups {index: name}) of a checkpoint's optimizer shards; refuses
    what cannot be converted before anything is written."""
    world = len(optim_files)
    first = load_deepspeed_file(optim_files[0])["optimizer_state_dict"]
    if "fp32_flat_groups" in first:
        return True, {}
    if "base_optimizer_state" not in first:
        raise ValueError(f"to_universal: {optim_files[0].name} is not a ZeRO-1/2/3 optimizer shard")
    ep_groups = {gi: g["name"] for gi, g in enumerate(first["base_optimizer_state"]["param_groups"])
                 if g.get("moe")}
    for name in set(ep_groups.values()):
        ep_size = int(str(name).rsplit("_", 1)[-1])
        if ep_size != world:
            raise ValueError(
                f"to_universal: {src} was saved with expert parallelism {name} on {world} "
                f"ranks: each expert slice is also ZeRO-partitioned over an expert-data-"
                f"parallel group of {world // ep_size} ranks, which is not consolidated here; "
                f"only checkpoints with parallel.ep_size equal to the world size convert")
    return False, ep_groups


def _muon_state_as_adam(osd: dict, stage3: bool, shapes: list[dict]) -> set[str]:
    """Move the Muon momentum of one optimizer shard into Adam's exp_avg slot (exp_avg_sq zero;
    at stage 3 also the AdamW step), in place; -> the names of the Muon parameters."""
    names: set[str] = set()
    if stage3:
        base = osd["optimizer_state_dict"]
        steps = [st["step"] for st in base["state"].values() if "step" in st]
        for group in base["param_groups"]:
            if group.get("kind") != "muon":
                continue
            for idx in group["params"]:     # state index == ZeRO-3 sub-group index
                state = base["state"][idx]
                momentum = state.pop(MUON_STATE_KEY)
                state["exp_avg"], state["exp_avg_sq"] = momentum, torch.zeros_like(momentum)
                state["step"] = steps[0] if steps else 0
                names.update(shapes[idx])
        return names
    base = osd["base_optimizer_state"]
    for gi, group in enumerate(base["param_groups"]):
        if group.get("kind") != "muon":
            continue
        state = base["state"][gi]
        momentum = state.pop(MUON_STATE_KEY)
        state["exp_avg"], state["exp_avg_sq"] = momentum, torch.zeros_like(momentum)
        names.update(osd["param_slice_mappings"][gi])
    return names


def _muon_states(engine):
    """This rank's optimizer state entries of the Muon groups (ZeRO-1/2 flat groups, ZeRO-3
    sub-groups, or plain parameters without ZeRO)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    if hasattr(opt, "fp32_partitioned_groups_flat"):       # ZeRO-3
        pairs = [(opt.sub_group_to_group_id[sub], flat)
                 for sub, flat in enumerate(opt.fp32_partitioned_groups_flat)]
    else:
        pairs = [(gi, p) for gi, g in enumerate(base.param_groups) for p in g["params"]]
    for gi, p in pairs:
        if base.param_groups[gi].get("kind") == "muon" and p in base.state:
            yield base.state[p]


def load_universal(engine, universal_dir: str | Path) -> None:
    """Load a universal checkpoint (``to_universal``'s output) into ``engine``, whatever its world
    size. DeepSpeed's universal loaders (0.19.8) need three repairs for our optimizer:
    - they copy the checkpoint's param-group hyper-parameters onto the groups by position (ZeRO-3:
      group 0's onto every group): a run whose groups differ (expert groups split out under EP,
      Muon vs AdamW) would get the wrong ones. The engine's own (from this run's config) are kept;
    - at ZeRO-3 the Muon momentum arrives as exp_avg (with an exp_avg_sq and a step): moved back;
    - the model's buffers (e.g. the MoE router biases) are not restored at all: read from the
      checkpoint's module state.
    """
    universal_dir = Path(universal_dir)
    if not (universal_dir / "zero").is_dir():
        raise CheckpointError(f"{universal_dir} is not a universal checkpoint (no zero/ folder): "
                              "convert it first with to_universal")
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    hparams = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    verified(torch_files(universal_dir), f"the universal checkpoint {universal_dir}")
    config = engine._config
    was = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(universal_dir.parent), tag=universal_dir.name,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = was
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {universal_dir}")
    for group, saved in zip(base.param_groups, hparams):
        group.update(saved)
    for state in _muon_states(engine):
        if "exp_avg" in state and MUON_STATE_KEY not in state:
            state[MUON_STATE_KEY] = state.pop("exp_avg")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            state.pop(key, None)
    model_files = sorted(f for f in universal_dir.glob("*model_states.pt")
                         if not f.name.startswith("layer_"))
    if model_files:
        module_state = load_deepspeed_file(model_files[0])["module"]
        with torch.no_grad():
            for name, buf in engine.module.named_buffers():
                if name in module_state:
                    buf.copy_(module_state[name].to(buf.dtype))
