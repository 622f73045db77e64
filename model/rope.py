"""Partial rotary position embedding (RoPE) on the last ``rope_dim`` channels.

Convention (same as DeepSeek's official V4 code and HF's ``modeling_deepseek_v4``): the rope
slice is the *trailing* ``rope_dim`` channels of a head, and rotation acts on *interleaved*
pairs ``(x[2i], x[2i+1])`` with frequency ``inv_freq[i]`` (complex multiplication of
``x[2i] + j x[2i+1]`` by ``exp(j pos inv_freq[i])``). HF keeps the official layout (no
permutation at conversion), so our weights export as they are.

Frequencies:
* window-only layers (ratio 0): ``theta = cfg.rope_theta``, no scaling;
* compressed layers (ratio > 0): ``theta = cfg.compress_rope_theta`` with YaRN frequency
  interpolation (factor, original max positions, beta fast/slow). No YaRN mscale: V4 does not
  scale cos/sin (HF forces ``attention_factor = 1``).

Angles are computed in fp32 from integer positions (as the official code; HF casts cos/sin to
the activation dtype, a small numeric difference only in bf16). Positions come from
``DocLayout.positions`` so RoPE restarts at every packed document.
"""
from __future__ import annotations

import math

import torch

from model.dispatch import dispatcher
from model.config import ModelConfig
from model.norms import rms_norm_reference


def default_inv_freq(rope_dim: int, theta: float) -> list[float]:
    """Plain RoPE frequencies theta^(-2i/rope_dim), i < rope_dim/2 (python floats)."""
    return [1.0 / (theta ** (2 * i / rope_dim)) for i in range(rope_dim // 2)]


def yarn_inv_freq(rope_dim: int, theta: float, factor: float, original_max_pos: int,
                  beta_fast: float, beta_slow: float) -> list[float]:
    """YaRN frequencies: interpolate (divide by ``factor``) the low frequencies, keep the high
    ones, with a linear ramp between the correction dims of beta_fast and beta_slow rotations."""

    def correction_dim(n_rot: float) -> float:
        return rope_dim * math.log(original_max_pos / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    out = []
    for i, f in enumerate(default_inv_freq(rope_dim, theta)):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0 keep, 1 interpolate
        keep = 1.0 - ramp
        out.append(f / factor * (1.0 - keep) + f * keep)
    return out


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2 * len(inv_freq) channels of x [B, L, D] or [B, L, H, D] by positions
    [B, L] (``inverse``: by -position); the rotation in fp32 (fp64 for fp64 x), x's dtype out.
    Triton (one kernel each way): ``kernels/rope.py``."""
    rd = 2 * inv_freq.shape[0]
    ang = positions.to(torch.float32)[..., None] * inv_freq  # [B, L, rd/2]
    cos, sin = ang.cos(), ang.sin()
    extra = x.dim() - 3
    cos = cos.view(*cos.shape[:2], *([1] * extra), rd // 2)
    sin = sin.view(*sin.shape[:2], *([1] * extra), rd // 2)
    if inverse:
        sin = -sin
    cdt = torch.promote_types(x.dtype, torch.float32)
    rope = x[..., -rd:].to(cdt)
    a, b = rope[..., 0::2], rope[..., 1::2]  # interleaved pairs
    ra = a * cos - b * sin
    rb = a * sin + b * cos
    rotated = torch.stack((ra, rb), dim=-1).flatten(-2).to(x.dtype)
    if rd == x.shape[-1]:
        return rotated
    return torch.cat([x[..., :-rd], rotated], dim=-1)


get_rope_rotate = dispatcher("rope_rotate", rope_rotate)


def rope_rotate_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 inverse: bool = False) -> torch.Tensor:
    """``rope_rotate`` in place, no autograd: for a buffer the caller owns (a gradient it has just
    made). Triton (``kernels/rope.py``): reads and writes the rotated channels only. Returns x."""
    rd = 2 * inv_freq.shape[0]
    with torch.no_grad():
        x[..., -rd:] = rope_rotate(x[..., -rd:], positions, inv_freq, inverse)
    return x


get_rope_rotate_ = dispatcher("rope_rotate_", rope_rotate_)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor,
                  inv_freq: torch.Tensor) -> torch.Tensor:
    """RMS-normalise x over its last dim (``model.norms``; weight [D] or None), then rotate its last
    2 * len(inv_freq) channels by positions [B, L] (``rope_rotate``): how q, kv and the compressed
    entries are made. Triton: the norm's kernels with the rotation fused, one launch each way and
    no pass of its own (``kernels/rms_norm.py``)."""
    return rope_rotate(rms_norm_reference(x, weight, eps), positions, inv_freq)


get_rms_norm_rope = dispatcher("rms_norm_rope", rms_norm_rope)


class RoPE:
    """Rotary embedding for one layer kind. Holds no parameters or buffers (so ``module.to(
    bfloat16)`` can never round the frequencies); fp32 frequency tensors are cached per device.
    ``impl`` (``model.attention_impl``) picks the Triton kernel or the reference (model/dispatch.py)."""

    def __init__(self, rope_dim: int, inv_freq: list[float], impl: str = "auto") -> None:
        if rope_dim < 2 or rope_dim % 2:
            raise ValueError(f"RoPE: rope_dim must be even and >= 2, got {rope_dim}")
        if len(inv_freq) != rope_dim // 2:
            raise ValueError(f"RoPE: need rope_dim/2 = {rope_dim // 2} frequencies, got {len(inv_freq)}")
        self.rope_dim = rope_dim
        self.inv_freq = list(inv_freq)
        self.impl = impl
        self._cache: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def for_ratio(cfg: ModelConfig, ratio: int) -> "RoPE":
        """The RoPE of a layer with compress ratio ``ratio`` (0 = window only)."""
        if ratio == 0:
            return RoPE(cfg.rope_dim, default_inv_freq(cfg.rope_dim, cfg.rope_theta), cfg.attention_impl)
        return RoPE(cfg.rope_dim, yarn_inv_freq(cfg.rope_dim, cfg.compress_rope_theta, cfg.yarn_factor,
                                                cfg.yarn_original_max_pos, cfg.yarn_beta_fast,
                                                cfg.yarn_beta_slow), cfg.attention_impl)

    def _freq(self, device: torch.device) -> torch.Tensor:
        f = self._cache.get(device)
        if f is None:
            f = torch.tensor(self.inv_freq, dtype=torch.float32, device=device)
            self._cache[device] = f
        return f

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] integer -> cos, sin [..., rope_dim/2] fp32."""
        ang = positions.to(torch.float32)[..., None] * self._freq(positions.device)
        return ang.cos(), ang.sin()

    def apply(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the last rope_dim channels of x by its position (``inverse``: by -position).

        x: [B, L, D] or [B, L, H, D]; positions: [B, L] (broadcast over heads).
        Returns x's dtype; the rotation is computed in fp32 (fp64 for fp64 inputs).
        """
        self._check(x, positions, "apply")
        return get_rope_rotate(self.impl, x.device, x.dtype)(x, positions, self._freq(positions.device), inverse)

    def rotate_(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``apply`` in place on x's rope channels, outside autograd (for a buffer the caller
        owns, e.g. a gradient its backward has just made); returns x."""
        self._check(x, positions, "rotate_")
        return get_rope_rotate_(self.impl, x.device, x.dtype)(x, positions, self._freq(positions.device), inverse)

    def apply_(self, x: torch.Tensor, positions: torch.Tensor, heads: int = 1) -> torch.Tensor:
        """``apply`` in place, autograd-correct: x [B, L, heads * D] (a fresh result nobody keeps
        for backward, e.g. a projection's output: autograd's version check refuses otherwise)
        gets each head's rope channels rotated in place, only those read and written; its
        gradient is rotated back out of place (the incoming gradient may be shared). Returns x;
        under torch.compile the out-of-place ``apply``."""
        if x.dim() != 3 or heads < 1 or x.shape[-1] % heads:
            raise ValueError(f"RoPE.apply_: x must be [B, L, heads * D] with heads={heads}, got {tuple(x.shape)}")
        if torch.compiler.is_compiling():
            return self.apply(x.view(*x.shape[:2], heads, -1), positions).view(x.shape)
        self._check(x.view(*x.shape[:2], heads, -1), positions, "apply_")
        return _RotateInPlace.apply(x, positions, self, heads)

    def apply_normed(self, x: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
        """``apply(rms_norm(x))``: RMS-normalise x over its last dim (scale ``weight`` [D], an
        ``RMSNorm``'s, or None), then rotate; one fused kernel each way (``rms_norm_rope``)."""
        self._check(x, positions, "apply_normed")
        return get_rms_norm_rope(self.impl, x.device, x.dtype)(x, weight, eps, positions,
                                                               self._freq(positions.device))

    def _check(self, x: torch.Tensor, positions: torch.Tensor, name: str) -> None:
        rd = self.rope_dim
        if x.shape[-1] < rd:
            raise ValueError(f"RoPE.{name}: last dim {x.shape[-1]} is smaller than rope_dim {rd}")
        if tuple(positions.shape) != tuple(x.shape[:2]):
            raise ValueError(f"RoPE.{name}: positions shape {tuple(positions.shape)} does not match "
                             f"x's leading dims {tuple(x.shape[:2])}")


class _RotateInPlace(torch.autograd.Function):
    """``RoPE.apply_``: forward rotates x's rope channels in place (mark_dirty), backward the
    gradient by the opposite angle into a new tensor."""

    @staticmethod
    def forward(ctx, x, positions, rope, heads):
        rope.rotate_(x.view(*x.shape[:2], heads, -1), positions)
        ctx.mark_dirty(x)
        ctx.save_for_backward(positions)
        ctx.meta = (rope, heads)
        return x

    @staticmethod
    def backward(ctx, dy):
        (positions,) = ctx.saved_tensors
        rope, heads = ctx.meta
        return rope.apply(dy.reshape(*dy.shape[:2], heads, -1), positions, inverse=True).view(dy.shape), None, None, None
