"""The GPU kernel breakdown of the end-to-end stages (fastflamingo.bench.breakdown): kernel names
sorted into kinds, off without its environment variable or on a CPU, its summary line."""
from fastflamingo.bench import breakdown


def test_kernel_kinds():
    cases = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTT": "matmul",
        "_fwd_kernel": "fastflamingo triton",
        "_nf4_matmul_kernel": "fastflamingo triton",
        "triton_poi_fused_add_0": "inductor (fused)",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
        "pytorch_flash::flash_fwd_kernel": "attention",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>": "norm / softmax",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>": "copy / cast",
        "void at::native::elementwise_kernel<128, 2>": "elementwise",
        "some_kernel_nobody_knows": "other",
    }
    assert {n: breakdown.kind_of(n) for n in cases} == cases


def test_record_is_off_without_the_variable_or_a_gpu(tmp_path, monkeypatch):
    calls = []
    monkeypatch.delenv(breakdown.ENV, raising=False)
    breakdown.record("g", "e", "prefill", lambda: calls.append(1), "cuda")
    monkeypatch.setenv(breakdown.ENV, str(tmp_path))
    breakdown.record("g", "e", "prefill", lambda: calls.append(1), "cpu")
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_summary_line():
    result = {"group": "tiny", "entrant": "fastflamingo", "stage": "prefill", "wall_ms_profiled": 12.5,
              "gpu_kernel_ms": 10.0, "kernels": 30,
              "by_kind": {"matmul": {"ms": 8.0, "count": 20}, "attention": {"ms": 2.0, "count": 10}}}
    line = breakdown.summary(result)
    assert line.startswith("tiny | fastflamingo | prefill: wall 12.50 ms") and "matmul 8.00 ms (20)" in line
    assert "profile failed: RuntimeError" in breakdown.summary({"group": "g", "entrant": "e", "stage": "s",
                                                               "error": "RuntimeError: x"})
