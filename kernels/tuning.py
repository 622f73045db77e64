"""A Triton kernel with a short list of tile candidates: autotuned on CUDA, pinned elsewhere.

``Tuned(kernel, candidates, key)``: ``candidates`` = [(meta-parameters, num_warps, num_stages)];
``launch(grid, args, const, config)`` runs
  * config None on CUDA: ``triton.autotune`` over the candidates, keyed on the argument names in
    ``key`` (and the tensors' dtypes); ``reset_to_zero`` names the outputs a kernel accumulates
    into (atomics): zeroed before each timed run and before the real one. Each new key times every candidate once, on the first
    (eager) call: in train/cuda_graph.py that is the warm-up before the capture, whose replays
    then launch the picked tile with no host work;
  * config "default", or any config off CUDA (the interpreter is not timed): the first candidate;
  * config a dict: the first candidate with the dict's entries for its meta-parameters replaced
    (tests, sweeps; entries a kernel does not have are ignored).
``grid`` is a function of the meta-parameters (the tiles decide the program count).
Results can differ in the last bits between candidates (fp32 sums in another order), as between
any two tile sizes; a run's picks are fixed once made (``picks``).
"""
from __future__ import annotations

from typing import Callable

import triton


class Tuned:
    def __init__(self, kernel, candidates: list[tuple[dict, int, int]], key: list[str],
                 reset_to_zero: list[str] | None = None) -> None:
        self.kernel = kernel
        self.candidates = candidates
        configs = [triton.Config(dict(meta), num_warps=w, num_stages=s) for meta, w, s in candidates]
        self.tuned = triton.autotune(configs, key=key, reset_to_zero=reset_to_zero)(kernel)
        self.timings: dict[str, str] = {}   # tuning key -> every candidate's time (bench output)

    def launch(self, grid: Callable[[dict], tuple], args: tuple, const: dict, config, on_cuda: bool) -> None:
        if config is None and on_cuda:
            n_known = len(self.tuned.cache)   # the cache only grows: a new entry = tuned just now
            self.tuned[grid](*args, **const)
            if len(self.tuned.cache) != n_known:   # the dict's last entry; no set copies per launch
                key = next(reversed(self.tuned.cache))
                self.timings[str(key)] = _describe(getattr(self.tuned, "configs_timings", None))
            return
        meta, warps, stages = self.candidates[0]
        meta = dict(meta)
        if isinstance(config, dict):
            meta.update({k: v for k, v in config.items() if k in meta})
        self.kernel[grid(meta)](*args, **const, **meta, num_warps=warps, num_stages=stages)

    def picks(self) -> dict[str, str]:
        """{tuning key: the picked config (and every candidate's time)} so far (bench output)."""
        return {str(k): f"{c}" + (f" [{self.timings[str(k)]}]" if self.timings.get(str(k)) else "")
                for k, c in self.tuned.cache.items()}


def _describe(timings) -> str:
    """Triton's {config: [median ms, ...] or ms} as text; never raises (bookkeeping must not stop
    a training step): an unexpected shape is described as such."""
    try:
        return ", ".join(f"{c}: {(t[0] if isinstance(t, (list, tuple)) else t) * 1e3:.1f} us"
                         for c, t in (timings or {}).items())
    except Exception as exc:  # a Triton version that records timings differently
        return f"timings unreadable ({type(exc).__name__}: {exc})"
