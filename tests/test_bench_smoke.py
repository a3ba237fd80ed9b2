"""The GPU benchmarks' `--smoke` modes run end to end on the CPU, so the scripts do not rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_smoke(script: str, output: str, *extra: str) -> dict:
    completed = subprocess.run(
        [sys.executable, os.path.join("bench", script), "--smoke", "--layers", "1", "--output", output, *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, f"bench/{script} --smoke failed:\n{completed.stderr[-4000:]}"
    with open(output) as handle:
        return json.load(handle)


@pytest.mark.slow
def test_train_step_smoke_times_every_mode_from_the_same_weights(tmp_path):
    result = _run_smoke("train_step.py", str(tmp_path / "train_step.json"))

    for key in (
        "speedup_full",
        "speedup_lora",
        "tokens_per_s_ours",
        "tokens_per_s_stock",
        "gpu",
        "torch",
        "command",
        "date",
    ):
        assert result[key] is not None, key
    modes = result["modes"]
    assert set(modes) == {
        "stock_full",
        "ours_full",
        "peer_full",
        "ours_full_fp8",
        "stock_lora",
        "ours_lora",
        "ours_lora_attention",
        "peer_lora",
        "ours_lora_fp8",
        "ours_full_logits",
    }
    # Same seed and batches: every mode starts from the same model, so the first loss agrees across them.
    first_losses = [row["losses"][0] for row in modes.values()]
    assert all(math.isfinite(loss) for loss in first_losses)
    assert max(first_losses) - min(first_losses) < 1e-3
    # Full fine-tuning trains everything; per-expert LoRA trains more than attention-only LoRA, far less than all.
    assert modes["ours_full"]["trainable_params"] == modes["ours_full"]["total_params"]
    assert modes["stock_lora"]["trainable_params"] == modes["ours_lora_attention"]["trainable_params"]
    assert (
        modes["stock_lora"]["trainable_params"]
        < modes["ours_lora"]["trainable_params"]
        < modes["ours_full"]["trainable_params"]
    )
    # The peer (transformers' experts + PEFT target_parameters) trains attention and every expert, as ours does.
    assert modes["peer_full"]["trainable_params"] == modes["ours_full"]["trainable_params"]
    assert modes["stock_lora"]["trainable_params"] < modes["peer_lora"]["trainable_params"]
    assert modes["ours_lora_fp8"]["trainable_params"] == modes["ours_lora"]["trainable_params"]
    assert result["speedup_lora_vs_peer"] == round(modes["peer_lora"]["step_ms"] / modes["ours_lora"]["step_ms"], 3)
    # TRL's fused LM head and the model's own forward compute the same first loss (checked above across modes)
    assert result["lm_head"] == "fused" and result["peak_gb_ours_logits"] is None  # no CUDA peak on the CPU
    assert result["speedup_full"] == round(modes["stock_full"]["step_ms"] / modes["ours_full"]["step_ms"], 3)


@pytest.mark.slow
def test_qlora_smoke_takes_one_finite_step_on_4bit_experts_and_4bit_attention(tmp_path):
    result = _run_smoke("qlora_132b.py", str(tmp_path / "qlora.json"))

    assert result["n_layers"] == 1 and result["seq_len"] == 32
    assert result["grads_finite"] is True
    assert math.isfinite(result["loss"])
    assert "NF4" in result["attention"]
    assert set(result["weights_breakdown_gb"]) == {"experts_nf4", "attention", "lora", "embeddings_head_norms_routers"}
    for key in ("peak_gb", "weights_gb", "gpu", "torch", "transformers", "peft", "trl", "deepspeed", "command", "date"):
        assert key in result


def test_trace_summary_splits_compute_idle_time_into_nccl_wait_and_empty_gpu():
    """bench/trace_summary.py's reading of a timeline, on a hand-built trace whose answer is known by construction:
    compute kernels on stream 7 at [0, 100), [150, 200), [220, 250) ms; an all-gather on stream 20 at [90, 140);
    the host inside `aten::item` at [135, 165) and a stream sync at [195, 215)."""
    spec = importlib.util.spec_from_file_location("trace_summary", os.path.join(REPO_ROOT, "bench", "trace_summary.py"))
    trace_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace_summary)
    summarize = trace_summary.summarize

    def event(category, name, thread, start_ms, duration_ms, pid=0):
        return {
            "ph": "X",
            "cat": category,
            "name": name,
            "pid": pid,
            "tid": thread,
            "ts": start_ms * 1000,
            "dur": duration_ms * 1000,
        }

    trace = {
        "traceEvents": [
            event("kernel", "sm90_xmma_gemm_bf16", 7, 0, 100),
            event("kernel", "ncclDevKernel_AllGather_RING_LL", 20, 90, 50),
            event("kernel", "flash_fwd_kernel", 7, 150, 50),
            event("kernel", "vectorized_elementwise_kernel", 7, 220, 30),
            event("cpu_op", "aten::item", 1, 135, 30, pid=1),
            event("cuda_runtime", "cudaStreamSynchronize", 1, 195, 20, pid=1),
        ]
    }
    summary = summarize(trace)

    assert summary["compute_stream"] == "7" and summary["wall_ms"] == 250
    assert summary["compute_busy_ms"] == 180 and summary["compute_idle_ms"] == 70
    # Idle [100, 150): the all-gather covers [100, 140), nothing runs in [140, 150); idle [200, 220): GPU empty.
    assert summary["idle_while_nccl_runs_ms"] == 40
    assert summary["idle_while_gpu_empty_ms"] == 30
    assert summary["idle_while_other_streams_busy_ms"] == 0
    assert summary["compute_kernel_ms_by_kind"] == {"gemm": 100, "attention": 50, "elementwise/other": 30}
    # The host was in aten::item for [140, 150) and in the sync for [200, 215) of the empty time.
    assert summary["host_while_gpu_empty_ms"]["cpu_op"] == {"aten::item": 10}
    assert summary["host_while_gpu_empty_ms"]["cuda_runtime"] == {"cudaStreamSynchronize": 15}
    assert summary["nccl_ms_by_kernel"] == {"ncclDevKernel_AllGather_RING_LL": 50}
