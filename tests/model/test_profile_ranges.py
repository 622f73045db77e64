"""model/profile_ranges.py: the model's component ranges appear in a profile only while
recording is on, and cost a no-op context otherwise."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from model import profile_ranges
from model.config import ModelConfig
from model.transformer import Transformer


@pytest.fixture
def model_and_batch():
    cfg = ModelConfig.from_preset("micro")
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    return model, ids


def _range_names(model, ids, on: bool) -> list[str]:
    profile_ranges.recording(on)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids, labels=ids).loss.backward()
    finally:
        profile_ranges.recording(False)
    return [e.name for e in prof.events() if e.name.startswith(profile_ranges.COMPONENT_PREFIX)]


def test_component_ranges_only_while_recording(model_and_batch):
    model, ids = model_and_batch
    assert _range_names(model, ids, on=False) == []
    names = set(_range_names(model, ids, on=True))
    want = {"embed", "mhc.pre", "mhc.post", "mhc.head", "attn.window", "attn.csa", "attn.hca", "compressor",
            "indexer", "core", "moe", "router", "experts", "dispatch", "mlp", "combine", "shared",
            "balance_loss", "lm_head", "mtp"}
    assert {profile_ranges.COMPONENT_PREFIX + n for n in want} <= names


def test_off_is_a_shared_no_op():
    profile_ranges.recording(False)
    a, b = profile_ranges.component("moe"), profile_ranges.phase("forward")
    assert a is b   # the one nullcontext: no record_function object, no dispatcher call
    profile_ranges.recording(True)
    try:
        assert isinstance(profile_ranges.micro_batch(0), torch.profiler.record_function)
    finally:
        profile_ranges.recording(False)
