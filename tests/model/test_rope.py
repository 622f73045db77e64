"""RoPE: inverse, relative-position property, pair convention and frequencies vs HF."""
import math

import pytest
import torch

from model.config import ModelConfig
from model.rope import RoPE, default_inv_freq, yarn_inv_freq


def _complex_rope(x, pos, inv_freq, rope_dim):
    """Independent reference: interleaved pairs as complex numbers times exp(i * pos * f)."""
    x64 = x.double()
    nope, rope = x64[..., :-rope_dim], x64[..., -rope_dim:]
    z = torch.view_as_complex(rope.reshape(*rope.shape[:-1], rope_dim // 2, 2).contiguous())
    ang = pos.double()[..., None] * torch.tensor(inv_freq, dtype=torch.float64)
    if z.dim() == 4:
        ang = ang[:, :, None, :]
    z = z * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([nope, torch.view_as_real(z).flatten(-2)], dim=-1)


@pytest.fixture
def cfg():
    return ModelConfig.from_preset("tiny")


@pytest.mark.parametrize("ratio", [0, 4])
def test_matches_complex_multiplication(cfg, ratio):
    rope = RoPE.for_ratio(cfg, ratio)
    x = torch.randn(2, 7, 3, cfg.head_dim)
    pos = torch.randint(0, 300, (2, 7))
    y = rope.apply(x, pos)
    torch.testing.assert_close(y.double(), _complex_rope(x, pos, rope.inv_freq, cfg.rope_dim), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[..., :-cfg.rope_dim], x[..., :-cfg.rope_dim])  # nope part untouched
    x3 = torch.randn(2, 7, cfg.head_dim)  # [B, L, D] form
    torch.testing.assert_close(rope.apply(x3, pos).double(), _complex_rope(x3, pos, rope.inv_freq, cfg.rope_dim),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0, 4])
def test_inverse_undoes_forward(cfg, ratio):
    rope = RoPE.for_ratio(cfg, ratio)
    x = torch.randn(2, 9, 4, cfg.head_dim)
    pos = torch.randint(0, 5000, (2, 9))
    y = rope.apply(x, pos)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(rope.apply(y, pos, inverse=True), x, rtol=1e-5, atol=1e-5)
    # inverse == rotation by -position
    torch.testing.assert_close(rope.apply(x, pos, inverse=True), rope.apply(x, -pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0, 4])
def test_relative_position_property(cfg, ratio):
    rope = RoPE.for_ratio(cfg, ratio)
    q, k = torch.randn(1, 1, cfg.rope_dim).double(), torch.randn(1, 1, cfg.rope_dim).double()
    def dot(p, s):
        return (rope.apply(q, torch.tensor([[p]])) * rope.apply(k, torch.tensor([[s]]))).sum()
    for p, s, d in [(5, 2, 11), (40, 40, 3), (100, 7, 250)]:
        torch.testing.assert_close(dot(p, s), dot(p + d, s + d), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dot(5, 2), dot(5, 3))


def test_yarn_formula():
    # independent evaluation of the YaRN ramp for V4-Flash numbers
    dim, theta, factor, orig = 64, 160000.0, 16.0, 65536
    f = yarn_inv_freq(dim, theta, factor, orig, 32, 1)
    base = default_inv_freq(dim, theta)
    cd = lambda r: dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(theta))
    low, high = math.floor(cd(32)), math.ceil(cd(1))
    assert f[:low + 1] == pytest.approx(base[:low + 1])                      # high freqs kept
    assert f[high:] == pytest.approx([b / factor for b in base[high:]])     # low freqs interpolated
    mid = (low + high) // 2
    assert base[mid] / factor < f[mid] < base[mid]


def test_frequencies_and_rotation_match_hf(cfg):
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    hcfg = DeepseekV4Config(
        vocab_size=64, hidden_size=cfg.dim, num_hidden_layers=1, num_attention_heads=cfg.n_heads,
        head_dim=cfg.head_dim, partial_rotary_factor=cfg.rope_dim / cfg.head_dim,
        rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta,
        rope_parameters={"rope_type": "yarn", "factor": cfg.yarn_factor,
                         "original_max_position_embeddings": cfg.yarn_original_max_pos,
                         "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow},
        max_position_embeddings=cfg.max_seq_len)
    emb = hf.DeepseekV4RotaryEmbedding(hcfg)
    assert emb.compress_attention_scaling == 1.0  # no mscale
    for ratio, kind in ((0, "main"), (4, "compress"), (16, "compress")):
        ours = RoPE.for_ratio(cfg, ratio)
        torch.testing.assert_close(torch.tensor(ours.inv_freq, dtype=torch.float32),
                                   getattr(emb, f"{kind}_inv_freq"), rtol=1e-6, atol=0)
        x = torch.randn(2, 6, 3, cfg.head_dim)
        pos = torch.randint(0, 1000, (2, 6))
        cos, sin = emb(x, pos, layer_type=kind)
        ref = hf.apply_rotary_pos_emb(x.transpose(1, 2), cos, sin).transpose(1, 2)
        # fp32 angles up to ~1000 rad: a 1-ulp frequency difference shows as ~1e-4
        torch.testing.assert_close(ours.apply(x, pos), ref, rtol=1e-4, atol=2e-4)


def test_bad_inputs(cfg):
    rope = RoPE.for_ratio(cfg, 0)
    with pytest.raises(ValueError, match="positions"):
        rope.apply(torch.randn(2, 5, cfg.head_dim), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="rope_dim"):
        rope.apply(torch.randn(2, 5, cfg.rope_dim - 2), torch.zeros(2, 5, dtype=torch.long))


def test_apply_in_place_matches_apply_fp64():
    # RoPE.apply_ (in place on a fresh [B, L, H * D] tensor) == apply on its per-head view, forward
    # and backward, positions restarting at a document boundary; the same storage comes back
    cfg = ModelConfig.from_preset("tiny")
    rope = RoPE.for_ratio(cfg, 4)
    g = torch.Generator().manual_seed(3)
    B, L, H, D = 2, 7, 3, cfg.rope_dim + 6
    w = torch.randn(H * D, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, L, 5, generator=g, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [9, 10, 11, 12, 13, 14, 15]])
    dy = torch.randn(B, L, H * D, generator=g, dtype=torch.float64)
    y = x @ w.t()
    ptr = y.data_ptr()
    got = rope.apply_(y, pos, H)
    assert got.data_ptr() == ptr
    want = rope.apply((x @ w.t()).view(B, L, H, D), pos).view(B, L, H * D)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, w, dy)[0],
                               torch.autograd.grad(want, w, dy)[0], rtol=1e-12, atol=1e-12)


def test_apply_in_place_refuses_a_saved_input():
    # a tensor kept for another op's backward cannot be rotated in place: autograd says so
    rope = RoPE(4, [1.0, 0.1])
    w = torch.randn(8, 3, requires_grad=True)
    y = torch.randn(1, 2, 3) @ w.t()
    z = y * y                      # saves y
    rope.apply_(y, torch.zeros(1, 2, dtype=torch.long), 2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
    with pytest.raises(ValueError, match="heads"):
        rope.apply_(torch.randn(1, 2, 7), torch.zeros(1, 2, dtype=torch.long), 2)
