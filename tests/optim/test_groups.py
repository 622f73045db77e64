"""Parameter grouping: every contract name placed, unknown / ambiguous / forbidden names raise."""
import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from optim.groups import RULES, GroupingError, Rule, assign_groups, param_groups

# Expected optimizer per name suffix, written out by hand from docs/ARCHITECTURE.md and the V4
# report (independent of the regexes in optim/groups.py).
EXPECTED_BY_SUFFIX = {
    "embed.weight": "adamw", "head.weight": "adamw", "norm.weight": "adamw",
    "attn_norm.weight": "adamw", "ffn_norm.weight": "adamw", "q_norm.weight": "adamw",
    "kv_norm.weight": "adamw", "enorm.weight": "adamw", "hnorm.weight": "adamw",
    "compressor.norm.weight": "adamw", "base": "adamw", "scale": "adamw", "sink": "adamw",
    "ape": "adamw", "fn": "muon", "wq_a.weight": "muon", "wq_b.weight": "muon",
    "wkv.weight": "muon", "wo_a.weight": "muon", "wo_b.weight": "muon", "wgate.weight": "muon",
    "weights_proj.weight": "muon", "gate.weight": "muon", "e_proj.weight": "muon",
    "h_proj.weight": "muon", "w1": "muon", "w2": "muon", "w3": "muon", "w1.weight": "muon",
    "w2.weight": "muon", "w3.weight": "muon",
}


def expected_kind(name):
    parts = name.split(".")
    for k in range(len(parts)):  # longest matching suffix wins
        suffix = ".".join(parts[k:])
        if suffix in EXPECTED_BY_SUFFIX:
            return EXPECTED_BY_SUFFIX[suffix]
    raise KeyError(name)


def contract_names(cfg):
    """(name, shape) for every parameter named in docs/ARCHITECTURE.md, for config cfg."""
    d, n = cfg.dim, cfg.hc_mult

    def compressor(prefix, c):
        return [(f"{prefix}.wkv.weight", (2 * c, d)), (f"{prefix}.wgate.weight", (2 * c, d)),
                (f"{prefix}.ape", (4, 2 * c)), (f"{prefix}.norm.weight", (c,))]

    def block(prefix, ratio):
        out = [(f"{prefix}.attn_norm.weight", (d,)), (f"{prefix}.ffn_norm.weight", (d,))]
        for site in ("hc_attn", "hc_ffn"):
            out += [(f"{prefix}.{site}.fn", (n * n + 2 * n, n * d)),
                    (f"{prefix}.{site}.base", (n * n + 2 * n,)), (f"{prefix}.{site}.scale", (3,))]
        a = f"{prefix}.attn"
        out += [(f"{a}.wq_a.weight", (cfg.q_lora_rank, d)), (f"{a}.q_norm.weight", (cfg.q_lora_rank,)),
                (f"{a}.wq_b.weight", (cfg.n_heads * cfg.head_dim, cfg.q_lora_rank)),
                (f"{a}.wkv.weight", (cfg.head_dim, d)), (f"{a}.kv_norm.weight", (cfg.head_dim,)),
                (f"{a}.wo_a.weight", (cfg.o_groups * cfg.o_lora_rank,
                                      cfg.n_heads * cfg.head_dim // cfg.o_groups)),
                (f"{a}.wo_b.weight", (d, cfg.o_groups * cfg.o_lora_rank)), (f"{a}.sink", (cfg.n_heads,))]
        if ratio:
            out += compressor(f"{a}.compressor", cfg.head_dim)
        if ratio == cfg.csa_ratio:
            out += [(f"{a}.indexer.wq_b.weight", (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)),
                    (f"{a}.indexer.weights_proj.weight", (cfg.index_n_heads, d))]
            out += compressor(f"{a}.indexer.compressor", cfg.index_head_dim)
        f, E, I = f"{prefix}.ffn", cfg.n_routed_experts, cfg.moe_inter_dim
        out += [(f"{f}.gate.weight", (E, d)), (f"{f}.experts.w1", (E, I, d)),
                (f"{f}.experts.w2", (E, d, I)), (f"{f}.experts.w3", (E, I, d)),
                (f"{f}.shared.w1.weight", (I, d)), (f"{f}.shared.w2.weight", (d, I)),
                (f"{f}.shared.w3.weight", (I, d))]
        return out

    def hc_head(prefix):
        return [(f"{prefix}.fn", (n, n * d)), (f"{prefix}.base", (n,)), (f"{prefix}.scale", (1,))]

    out = [("embed.weight", (cfg.vocab_size, d)), ("head.weight", (cfg.vocab_size, d)),
           ("norm.weight", (d,))] + hc_head("hc_head")
    for i, ratio in enumerate(cfg.compress_ratios):
        out += block(f"layers.{i}", ratio)
    for k in range(cfg.mtp_depth):
        m = f"mtp.{k}"
        out += [(f"{m}.enorm.weight", (d,)), (f"{m}.hnorm.weight", (d,)), (f"{m}.e_proj.weight", (d, d)),
                (f"{m}.h_proj.weight", (d, d)), (f"{m}.norm.weight", (d,))]
        out += block(f"{m}.block", cfg.mtp_compress_ratio) + hc_head(f"{m}.hc_head")
    return out


def as_params(names_shapes):
    # meta tensors: shapes without memory (the tiny vocab table would be 50304 x 128)
    return [(n, torch.nn.Parameter(torch.empty(s, device="meta"))) for n, s in names_shapes]


def test_contract_names_all_placed_as_expected():
    named = as_params(contract_names(ModelConfig.from_preset("tiny")))
    kinds = assign_groups(named)
    assert set(kinds) == {n for n, _ in named}
    for name, kind in kinds.items():
        assert kind == expected_kind(name), name
    # spot checks of the choices the report leaves open
    assert kinds["layers.1.ffn.gate.weight"] == "muon"
    assert kinds["layers.1.attn.sink"] == "adamw"
    assert kinds["layers.1.attn.compressor.ape"] == "adamw"
    assert kinds["hc_head.fn"] == "muon" and kinds["mtp.0.hc_head.scale"] == "adamw"


def test_real_tiny_transformer_grouping():
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg)
    named = dict(model.named_parameters())
    kinds = assign_groups(model.named_parameters())
    assert set(kinds) == set(named)
    for name, kind in kinds.items():
        assert kind == expected_kind(name), name
        assert kind == "adamw" or named[name].ndim >= 2
    groups = param_groups(model, muon_lr=1e-3, adamw_lr=2e-3)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"muon", "muon_wo_a", "adamw"}
    assert by_name["muon_wo_a"]["row_blocks"] == cfg.o_groups      # read from model.cfg
    assert all(n.endswith("wo_a.weight") for n in by_name["muon_wo_a"]["param_names"])
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters())
    assert by_name["adamw"]["lr"] == 2e-3 and by_name["muon"]["lr"] == 1e-3
    # the router bias must be a buffer, never a parameter
    assert not any(n.endswith("gate.bias") for n in named)


def test_unknown_names_are_all_reported():
    named = as_params(contract_names(ModelConfig.from_preset("tiny")))
    named += as_params([("layers.0.attn.mystery.weight", (4, 4)), ("layers.0.ffn.gate.bias", (8,)),
                        ("layers.0.attn.wo_b.weight_extra", (3, 3))])
    with pytest.raises(GroupingError) as err:
        assign_groups(named)
    msg = str(err.value)
    assert "layers.0.attn.mystery.weight" in msg and "matches no rule" in msg
    assert "layers.0.ffn.gate.bias" in msg and "buffer" in msg
    assert "layers.0.attn.wo_b.weight_extra" in msg


def test_ambiguous_and_non_matrix_muon_names_raise():
    rules = RULES + (Rule("muon", r"\.attn\.sink$", "overlapping rule"),)
    with pytest.raises(GroupingError, match=r"layers\.0\.attn\.sink: matches 2 rules"):
        assign_groups(as_params([("layers.0.attn.sink", (4,))]), rules=rules)
    with pytest.raises(GroupingError, match=r"layers\.0\.attn\.wq_a\.weight \(7,\).*needs a matrix"):
        assign_groups(as_params([("layers.0.attn.wq_a.weight", (7,))]))


def test_frozen_skipped_and_tied_counted_once():
    shared = torch.nn.Parameter(torch.zeros(10, 4))
    frozen = torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False)
    named = [("embed.weight", shared), ("head.weight", shared), ("layers.0.attn.wq_a.weight", frozen),
             ("layers.0.attn.wkv.weight", torch.nn.Parameter(torch.zeros(4, 4)))]
    assert assign_groups(named) == {"embed.weight": "adamw", "layers.0.attn.wkv.weight": "muon"}


def test_param_groups_options():
    named = as_params([("layers.0.attn.wo_a.weight", (8, 6)), ("layers.0.attn.wkv.weight", (4, 6)),
                       ("norm.weight", (6,))])
    with pytest.raises(GroupingError, match="wo_a_blocks"):
        param_groups(named, 1e-3, 1e-3)
    whole = param_groups(named, 1e-3, 1e-3, wo_a_blocks=1, muon_hparams={"momentum": 0.9})
    assert [(g["name"], g["param_names"]) for g in whole] == [
        ("muon", ["layers.0.attn.wo_a.weight", "layers.0.attn.wkv.weight"]), ("adamw", ["norm.weight"])]
    assert whole[0]["momentum"] == 0.9 and "momentum" not in whole[1]
    ablation = param_groups(named, 1e-3, 5e-4, all_adamw=True)
    assert [(g["name"], len(g["params"]), g["lr"]) for g in ablation] == [("adamw", 3, 5e-4)]
