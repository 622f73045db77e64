"""The context-length curriculum: stages of (sequence length, tokens, global batch, attention
mode, indexer warm-up), laid out on the optimizer-step axis.

V4 trains 4K -> 16K -> 64K -> 1M with dense attention first and sparse attention (the lightning
indexer's top-k) from the 64K stage on. Before the first sparse steps comes a short indexer
warm-up (DeepSeek-V3.2, sec. 2.1): the main model is frozen and only the indexer learns, from its
KL loss against the dense attention distribution; attention stays dense during the warm-up.

A stage of ``tokens`` tokens at ``global_batch_tokens`` per optimizer step lasts
``tokens // global_batch_tokens`` steps; the first ``indexer_warmup_steps`` of them are the
warm-up. The micro batch (sequences per rank per forward) is ``micro_batch`` or
``micro_batch_tokens // seq_len`` (at least one), and gradient accumulation makes up the rest
of the global batch. The lr schedule runs over the non-warm-up ("main") steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from model.config import ATTENTION_MODES

PHASE_WARMUP = "indexer_warmup"
PHASE_TRAIN = "train"


class CurriculumError(ValueError):
    """An impossible curriculum; the message names the stage, the field and the values."""


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    seq_len: int
    micro_batch: int         # sequences per rank per micro step
    global_batch: int        # sequences per optimizer step, all ranks
    grad_accum: int          # micro steps per optimizer step
    attention_mode: str      # after the warm-up
    warmup_steps: int        # indexer warm-up steps at the start of the stage
    train_steps: int         # main steps after the warm-up
    first_step: int          # global optimizer step at which the stage starts
    main_steps_before: int   # main (non-warm-up) steps of all earlier stages

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.train_steps

    @property
    def end_step(self) -> int:
        return self.first_step + self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


@dataclass(frozen=True)
class Position:
    """Where optimizer step ``step`` (0-based) falls in the curriculum."""
    stage: Stage
    phase: str               # PHASE_WARMUP | PHASE_TRAIN
    main_step: int           # index of this step among main steps (lr schedule); -1 in warm-up

    @property
    def attention_mode(self) -> str:
        return "dense" if self.phase == PHASE_WARMUP else self.stage.attention_mode


class Curriculum:
    def __init__(self, stages: Sequence[Stage]):
        if not stages:
            raise CurriculumError("curriculum.stages: at least one stage is needed")
        self.stages = list(stages)

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step

    @property
    def main_steps(self) -> int:
        return sum(s.train_steps for s in self.stages)

    @property
    def total_tokens(self) -> int:
        return sum(s.steps * s.tokens_per_step for s in self.stages)

    def tokens_before(self, step: int) -> int:
        """Training tokens consumed by optimizer steps 0 .. step-1."""
        done = 0
        for s in self.stages:
            n = min(max(step - s.first_step, 0), s.steps)
            done += n * s.tokens_per_step
        return done

    def at(self, step: int) -> Position:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the curriculum [0, {self.total_steps})")
        for s in self.stages:
            if step < s.end_step:
                k = step - s.first_step
                if k < s.warmup_steps:
                    return Position(s, PHASE_WARMUP, -1)
                return Position(s, PHASE_TRAIN, s.main_steps_before + k - s.warmup_steps)
        raise AssertionError("unreachable")

    def describe(self) -> str:
        lines = []
        for s in self.stages:
            warm = f", indexer warm-up {s.warmup_steps} steps" if s.warmup_steps else ""
            lines.append(f"  stage {s.index} {s.name}: seq_len {s.seq_len}, {s.steps} steps "
                         f"[{s.first_step}, {s.end_step}) x {s.global_batch} seqs "
                         f"(micro {s.micro_batch} x accum {s.grad_accum}), {s.attention_mode}{warm}")
        return "\n".join(lines)


def build_curriculum(stages_cfg: Sequence[Mapping[str, Any]], *, micro_batch_tokens: int,
                     world_size: int, compress_ratios: Sequence[int], max_seq_len: int) -> Curriculum:
    """Validate the ``curriculum.stages`` list and lay the stages out on the step axis."""
    if not stages_cfg:
        raise CurriculumError("curriculum.stages: at least one stage is needed")
    if micro_batch_tokens < 1:
        raise CurriculumError(f"train.micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
    max_ratio = max([int(r) for r in compress_ratios] + [1])
    stages: list[Stage] = []
    first_step = main_before = 0
    for i, sc in enumerate(stages_cfg):
        name = str(sc["name"])
        where = f"curriculum.stages[{i}] ({name})"
        seq_len, tokens = int(sc["seq_len"]), int(sc["tokens"])
        gbt = int(sc["global_batch_tokens"])
        mode = str(sc["attention_mode"])
        warmup = int(sc.get("indexer_warmup_steps") or 0)
        if seq_len < 1:
            raise CurriculumError(f"{where}: seq_len must be >= 1, got {seq_len}")
        if seq_len % max_ratio != 0:
            raise CurriculumError(
                f"{where}: seq_len={seq_len} is not divisible by the largest compress ratio "
                f"{max_ratio} (model.compress_ratios={list(compress_ratios)})")
        if seq_len > max_seq_len:
            raise CurriculumError(f"{where}: seq_len={seq_len} exceeds model.max_seq_len={max_seq_len}")
        if mode not in ATTENTION_MODES:
            raise CurriculumError(f"{where}: attention_mode must be one of {ATTENTION_MODES}, got {mode!r}")
        if gbt < seq_len or gbt % seq_len != 0:
            raise CurriculumError(
                f"{where}: global_batch_tokens={gbt} must be a positive multiple of seq_len={seq_len}")
        global_batch = gbt // seq_len
        micro = sc.get("micro_batch")
        micro = max(1, micro_batch_tokens // seq_len) if micro is None else int(micro)
        if micro < 1:
            raise CurriculumError(f"{where}: micro_batch must be >= 1, got {micro}")
        if global_batch % (micro * world_size) != 0:
            raise CurriculumError(
                f"{where}: the micro batch ({micro} sequences x {world_size} ranks = "
                f"{micro * world_size}) does not divide the global batch ({global_batch} sequences "
                f"= global_batch_tokens {gbt} / seq_len {seq_len})")
        steps = tokens // gbt
        if steps < 1:
            raise CurriculumError(f"{where}: tokens={tokens} is less than one global batch "
                                  f"(global_batch_tokens={gbt})")
        if warmup < 0 or warmup >= steps:
            raise CurriculumError(f"{where}: indexer_warmup_steps={warmup} must be in [0, {steps}) "
                                  f"(the stage has {steps} steps)")
        if warmup and mode != "sparse":
            raise CurriculumError(f"{where}: indexer_warmup_steps={warmup} needs attention_mode=sparse "
                                  "(the warm-up prepares the switch to sparse attention)")
        stage = Stage(index=i, name=name, seq_len=seq_len, micro_batch=micro,
                      global_batch=global_batch, grad_accum=global_batch // (micro * world_size),
                      attention_mode=mode, warmup_steps=warmup, train_steps=steps - warmup,
                      first_step=first_step, main_steps_before=main_before)
        stages.append(stage)
        first_step += stage.steps
        main_before += stage.train_steps
    return Curriculum(stages)
