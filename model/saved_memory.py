"""Saved-activation accounting: the bytes autograd holds for backward, measured on any device.

``SavedTensorMeter`` installs ``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd
saves is wrapped in a handle that counts its storage (once per storage, however many ops save
it) while alive. Handles die with the graph that holds them, so ``live_bytes`` after a forward
is what that forward keeps for backward: transient graphs (a chunk's local autograd pass inside
a fused op) are counted while they exist and gone at the end, and ``peak_bytes`` shows them.
Parameters (and any storages passed in ``exclude``) are not activations and are not counted.
Activation checkpointing's inputs are saved through the same hooks, its inner tensors are not
(they are recomputed), so a checkpointed forward is measured as it runs.
"""
from __future__ import annotations

from collections import defaultdict

import torch


class _Handle:
    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key, meter: "SavedTensorMeter"):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """with SavedTensorMeter(exclude=model.parameters()) as m: loss = model(...).loss
    -> m.live_bytes (held for backward now), m.peak_bytes, m.by_dtype(), m.by_site().
    ``site``: optional callable naming where a tensor is being saved (e.g. the module running);
    a storage counts for the site that saved it first."""

    def __init__(self, exclude=(), site=None):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._site = site
        self._refs: dict[int, int] = defaultdict(int)
        self._bytes: dict[int, tuple[int, torch.dtype, str]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        key = None
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._exclude and t.untyped_storage().nbytes() > 0:
                key = ptr
                if self._refs[key] == 0:
                    n = t.untyped_storage().nbytes()
                    self._bytes[key] = (n, t.dtype, self._site() if self._site else "all")
                    self.live_bytes += n
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                self._refs[key] += 1
        return _Handle(t, key, self)

    @staticmethod
    def _unpack(h: _Handle) -> torch.Tensor:
        return h.tensor

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live_bytes -= self._bytes.pop(key)[0]
            del self._refs[key]

    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for n, dt, _ in self._bytes.values():
            out[str(dt).replace("torch.", "")] += n
        return dict(out)

    def by_site(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for n, _, site in self._bytes.values():
            out[site] += n
        return dict(out)

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def live_tensor_bytes(exclude=(), also: dict[int, int] | None = None) -> int:
    """Bytes of the distinct storages behind every tensor Python can reach now (a gc walk; a
    leaf's ``.grad`` included), on any device: what a step keeps alive between operations,
    measured deterministically (no allocator involved). A view counts its whole storage (that
    is what it keeps alive). ``exclude``: tensors whose storages are not counted (parameters,
    their gradients, buffers); ``also``: {storage data_ptr: bytes} held elsewhere (e.g. a
    ``SavedTensorMeter``'s saved activations, which only autograd references), merged in."""
    import gc

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = dict(also or {})
    gc.collect()   # unreachable cycles are not alive: they would make the count depend on gc timing
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):   # (type(): no __class__ lookups on proxies)
            continue
        for t in (obj, obj.grad if obj.is_leaf else None):
            if t is None or t.device.type == "meta":
                continue
            try:
                st = t.untyped_storage()
                ptr = st.data_ptr()
            except RuntimeError:   # a FakeTensor / FunctionalTensor left by torch.compile: no memory
                continue
            if ptr and ptr not in skip:
                seen[ptr] = st.nbytes()
    return sum(seen.values())
