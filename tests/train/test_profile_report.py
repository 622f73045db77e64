"""train/profile_report.py on a hand-built GPU trace: every kernel reaches its phase, micro-batch
and component through its launch (correlation id), the trainer's phase ranges (by time, for
autograd's thread too) and the forward-backward links; what cannot be attributed is labelled."""
import pytest

from train.profile_report import (LOST, UNLINKED_BACKWARD, UNRANGED_FORWARD, attribute, group_of, kernel_kind,
                                  render)

MAIN, AUTOGRAD, LOADER, GPU = (1, 1), (1, 2), (1, 3), (0, 7)


def _x(thread, cat, name, ts, end, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": thread[0], "tid": thread[1], "ts": ts,
            "dur": end - ts, "args": args}


def _flow(ph, fid, thread, ts):
    return {"ph": ph, "cat": "fwdbwd", "name": "fwdbwd", "id": fid, "pid": thread[0], "tid": thread[1], "ts": ts}


def _launch(thread, corr, ts):
    return _x(thread, "cuda_runtime", "cudaLaunchKernel", ts, ts + 1, correlation=corr)


def _kernel(corr, ts, dur):
    return _x(GPU, "kernel", f"k{corr}", ts, ts + dur, correlation=corr)


@pytest.fixture
def events():
    ua = "user_annotation"
    return [
        _x(MAIN, ua, "micro:0", 0, 250),
        _x(MAIN, ua, "phase:forward", 0, 100),
        _x(MAIN, ua, "model:moe", 10, 50),
        _x(MAIN, ua, "model:router", 10, 20),
        _x(MAIN, "cpu_op", "aten::mm", 11, 19), _flow("s", 1, MAIN, 11), _launch(MAIN, 1, 12),
        _x(MAIN, "cpu_op", "aten::add", 30, 40), _launch(MAIN, 2, 31),
        _x(MAIN, "cpu_op", "aten::sum", 60, 70), _launch(MAIN, 3, 61),      # outside the model's ranges
        _x(MAIN, ua, "phase:backward", 100, 250),
        # autograd's device thread: the mm's backward (linked to aten::mm), then an AccumulateGrad
        _x(AUTOGRAD, "cpu_op", "autograd::engine::evaluate_function: MmBackward0", 110, 140),
        _x(AUTOGRAD, "cpu_op", "MmBackward0", 111, 139, **{"External id": 44}), _flow("f", 1, AUTOGRAD, 111),
        _launch(AUTOGRAD, 4, 112),
        # a call whose host clock put it outside its op: the op its External id names stands in
        {**_launch(AUTOGRAD, 8, 141), "args": {"correlation": 8, "External id": 44}},
        _x(AUTOGRAD, "cpu_op", "autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 150, 160),
        _launch(AUTOGRAD, 5, 151),
        _x(LOADER, "cpu_op", "aten::copy_", 120, 130),                       # another thread: no phase
        _x(MAIN, ua, "phase:optimizer", 250, 300),
        _x(MAIN, ua, "Optimizer.step#Muon.step", 260, 290), _launch(MAIN, 6, 261),
        _launch(MAIN, 7, 295),                                               # DeepSpeed's part
        _kernel(1, 20, 10), _kernel(2, 40, 20), _kernel(3, 70, 5), _kernel(4, 120, 40),
        _kernel(5, 170, 3), _kernel(6, 270, 7), _kernel(7, 300, 1), _kernel(8, 165, 4),
        _kernel(99, 310, 2),                                                 # its launch is not in the trace
    ]


def test_kernels_by_phase(events):
    a = attribute(events)
    assert a.device
    got = {p: (round(r.us, 6), r.count) for p, r in a.phases.items()}
    assert got == {"forward": (35, 3), "backward": (47, 3), "optimizer.step": (7, 1), "optimizer": (1, 1),
                   LOST: (2, 1)}
    assert a.total.us == 92 and a.total.count == 9
    # each phase's own wall time: the optimizer's minus the client optimizer's range inside it
    assert dict(a.phase_wall_us) == {"forward": 100, "backward": 150, "optimizer": 20, "optimizer.step": 30}
    assert {k: r.us for k, r in a.micro.items()} == {(0, "forward"): 35, (0, "backward"): 47}


def test_kernels_by_component(events):
    a = attribute(events)
    got = {k: r.us for k, r in a.components.items()}
    assert got == {("moe/router", "forward"): 10, ("moe", "forward"): 20, (UNRANGED_FORWARD, "forward"): 5,
                   ("moe/router", "backward"): 44,   # MmBackward0 -> aten::mm inside model:router
                   (UNLINKED_BACKWARD, "backward"): 3}
    assert a.unattributed_ops["forward: aten::sum"].us == 5
    # the loader thread's op is host time of "other threads", never a phase's
    assert a.phase_host_us["(other threads)"] == 10


def test_render_is_self_explaining(events):
    text = render(attribute(events))
    assert "## Time by phase: device time (kernel durations)" in text
    assert "| forward | 0.04 | 38.0% | 3 | 0.10 |" in text            # 35 us of 92
    assert "| optimizer.step | 0.01 | 7.6% | 1 |" in text
    assert "- optimizer.step: the client optimizer's update" in text   # the legend
    # components: 74 of the 82 us of forward+backward kernels in moe, 8 us unattributed
    assert "Attributed to a component: 90.2%" in text and "unattributed: 9.8%" in text
    assert "| MoE (router, experts, shared, balance loss) | 0.03 | 0.04 | 0.00 | 0.07 | 90.2% |" in text


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9x", "matmul"),   # mangled: not Triton
    ("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize64x128x8", "matmul"),
    ("_rope", "Triton"), ("_sparse_attn_bwd_q", "Triton"), ("triton_poi_fused_add_0", "Triton"),
    ("_scores_fwd", "Triton"), ("_gather_selected", "Triton"),   # a Triton name with 'gather' in it stays Triton
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)",
     "copy / cast"),
    ("Memcpy DtoD (Device -> Device)", "copy / cast"),
    ("void at::native::radixSortKVInPlace<2, -1, 32, 32, float, long, unsigned int>", "sort / top-k"),
    ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>>", "reduction"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::TensorListMetadata<2>>",
     "multi-tensor"),
    ("Memset (Device)", "fill / memset"),
])
def test_kernel_kind(name, kind):
    assert kernel_kind(name).startswith(kind)


def test_glue_by_kind_and_component(events):
    """Kernel kinds over all phases; the glue table holds only the model phases' non-matmul,
    non-Triton kernels, each under its component (backward ones through the forward link)."""
    names = {1: "nvjet_sm90_tst_128x128", 2: "void at::native::vectorized_elementwise_kernel<4, add>",
             3: "void at::native::reduce_kernel<512, 1>", 4: "void at::native::unrolled_elementwise_kernel<"
             "direct_copy_kernel_cuda>", 5: "void at::native::vectorized_elementwise_kernel<4, add_>",
             6: "_muon_update", 7: "void at::native::reduce_kernel<norm>", 8: "nvjet_sm90_tst_64x64",
             99: "_lost"}
    for e in events:
        if e["cat"] == "kernel":
            e["name"] = names[e["args"]["correlation"]]
    a = attribute(events)
    assert {k: (r.us, r.count) for k, r in a.kinds.items()} == {
        "matmul (cuBLAS / CUTLASS)": (14, 2), "elementwise": (23, 2), "reduction": (6, 2), "copy / cast": (40, 1),
        "Triton": (9, 2)}
    assert {k: r.us for k, r in a.glue.items()} == {
        ("forward", "moe", "aten::add"): 20, ("forward", UNRANGED_FORWARD, "aten::sum"): 5,
        ("backward", "moe/router", "MmBackward0 > MmBackward0"): 40,   # (node > op, as the unattributed list)
        ("backward", UNLINKED_BACKWARD, "autograd::engine::evaluate_function: torch::autograd::AccumulateGrad"): 3}
    text = render(a)
    assert "PyTorch's glue between them: 0.07 ms, 75.0% of device time." in text   # 69 of 92 us
    assert "| backward | moe/router | MmBackward0 > MmBackward0 | 0.04 | 1 |" in text


@pytest.mark.parametrize("path, group", [
    ("mtp/moe/experts/mlp", "MoE"), ("mtp", "MTP's own"), ("mtp/mhc.head", "mHC"), ("mhc.pre", "mHC"),
    ("attn.csa/indexer", "attention, CSA"), ("moe/router", "MoE"), ("lm_head", "LM head")])
def test_groups(path, group):
    assert group_of(path).startswith(group)


def test_recomputation_keeps_its_ranges(tmp_path):
    """Activation checkpointing: the recomputed forward runs inside backward, inside the same
    component ranges; the report puts it (and the nodes' own work) in the backward column."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from model import profile_ranges
    from model.config import ModelConfig
    from model.transformer import Transformer
    from train.profile_report import load_events

    cfg = ModelConfig.from_preset("micro")
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model.activation_checkpointing = True
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    profile_ranges.recording(True)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with profile_ranges.phase("forward"):
                loss = model(ids, labels=ids).loss
            with profile_ranges.phase("backward"):
                loss.backward()
    finally:
        profile_ranges.recording(False)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    a = attribute(load_events(tmp_path / "trace.json"))
    # every block's forward ran twice: once in forward, once recomputed in backward
    assert sum(1 for e in prof.events() if e.name == "model:moe") == 2 * len(model.blocks())
    backward = {c for (c, d), r in a.components.items() if d == "backward" and r.us > 0}
    assert {"moe/experts/mlp", "attn.csa/indexer", "mhc.pre", "mtp/moe/router"} <= backward
    for direction in ("forward", "backward"):
        in_table = sum(r.us for (_, d), r in a.components.items() if d == direction)
        assert in_table == pytest.approx(a.phases[direction].us)
    model_us = sum(r.us for r in a.components.values())
    unattributed = sum(r.us for (c, _), r in a.components.items() if c.startswith("("))
    assert unattributed < 0.05 * model_us   # measured ~1% (AccumulateGrad)
