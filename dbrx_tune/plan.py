"""How many GPUs does a recipe need? A per-GPU memory plan for DBRX fine-tuning.

    python -m dbrx_tune.plan recipes/dbrx_sft.yaml --gpus 16 --gpu-memory 80 [--json]

Reads the recipe (model, method: full / LoRA / QLoRA, DeepSpeed config -> ZeRO stage, offload and EP size, sequence
length, micro-batch, gradient checkpointing) and the model config, and estimates per GPU: parameters, gradients,
optimiser state, activations with and without checkpointing, and the gathered working set (ZeRO-3 gathers a whole MoE
block at a time without EP, only the local experts with EP). It says whether the plan fits and the smallest GPU count
that does. `databricks/dbrx-base` plans offline from the published config values.

The model is bytes per parameter (bf16 weights and gradients, fp32 master weights + Adam moments = 12 bytes,
partitioned over the GPUs by ZeRO stage) plus activations per token and layer; checked against measured peaks in
bench/results/planner_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

GIB = 1024**3
FRAMEWORK_OVERHEAD_GB = 1.5  # CUDA/NCCL workspaces and allocator slack seen by max_memory_allocated
KNOWN_CONFIGS = {
    # databricks/dbrx-base and dbrx-instruct config.json values, so hub ids plan without network access.
    "databricks/dbrx-base": dict(d_model=6144, n_layers=40, n_heads=48, kv_heads=8, vocab=100352, ffn=10752,
                                 experts=16, top_k=4),
    "databricks/dbrx-instruct": dict(d_model=6144, n_layers=40, n_heads=48, kv_heads=8, vocab=100352, ffn=10752,
                                     experts=16, top_k=4),
}


@dataclass
class ModelShape:
    d_model: int
    n_layers: int
    n_heads: int
    kv_heads: int
    vocab: int
    ffn: int
    experts: int
    top_k: int

    @property
    def expert_params_per_layer(self) -> int:
        return 3 * self.experts * self.ffn * self.d_model

    @property
    def dense_params(self) -> int:
        head = self.d_model // self.n_heads
        attn = self.d_model * (self.n_heads + 2 * self.kv_heads) * head + self.d_model * self.d_model
        per_layer = attn + self.experts * self.d_model + 2 * self.d_model
        return self.n_layers * per_layer + 2 * self.vocab * self.d_model + self.d_model

    @property
    def total_params(self) -> int:
        return self.dense_params + self.n_layers * self.expert_params_per_layer


@dataclass
class Plan:
    recipe: str
    method: str
    zero_stage: int
    ep_size: int
    gpus: int
    gpu_memory_gb: float
    seq_len: int
    micro_batch: int
    gradient_checkpointing: bool
    params_gb: float
    gradients_gb: float
    optimizer_gb: float
    working_set_gb: float
    activations_gb: float
    activations_checkpointed_gb: float
    activations_full_gb: float
    overhead_gb: float
    per_gpu_gb: float
    fits: bool
    min_gpus: int | None


def model_shape(name_or_path: str) -> ModelShape:
    """The shape of a DBRX model: a local config.json (via load_dbrx_config) or a known hub id."""
    if not os.path.isdir(name_or_path) and name_or_path in KNOWN_CONFIGS:
        return ModelShape(**KNOWN_CONFIGS[name_or_path])
    from dbrx_tune.modeling.config import load_dbrx_config

    config = load_dbrx_config(name_or_path)
    ffn = config.ffn_config
    return ModelShape(d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
                      kv_heads=config.attn_config.kv_n_heads, vocab=config.vocab_size, ffn=ffn.ffn_hidden_size,
                      experts=ffn.moe_num_experts, top_k=ffn.moe_top_k)


def activation_bytes_per_token_layer(shape: ModelShape) -> int:
    """bf16 activations one token keeps for backward in one layer (attention, routing copies, SwiGLU experts)."""
    head = shape.d_model // shape.n_heads
    attention = 2 * (6 * shape.d_model + (shape.n_heads + 2 * shape.kv_heads) * head)
    experts = 2 * shape.top_k * (3 * shape.ffn + 3 * shape.d_model)
    return attention + experts + 4 * shape.experts


def plan(recipe_values: dict[str, Any], shape: ModelShape, *, gpus: int, gpu_memory_gb: float,
         ds_config: dict[str, Any] | None, recipe: str = "") -> Plan:
    """Per-GPU memory for `recipe_values` on `gpus` GPUs of `gpu_memory_gb` each, and the smallest count that fits."""
    from dbrx_tune.distributed import expert_parallel_size, zero_stage

    method = "qlora" if recipe_values.get("load_in_4bit") else "lora" if recipe_values.get("use_peft") else "full"
    stage = zero_stage(ds_config)
    ep = expert_parallel_size(ds_config)
    zero = (ds_config or {}).get("zero_optimization") or {}
    offload_opt = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    offload_par = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    seq = int(recipe_values.get("max_length") or 1024)
    batch = int(recipe_values.get("per_device_train_batch_size") or 1)
    checkpointing = bool(recipe_values.get("gradient_checkpointing", False))

    def per_gpu(n: int) -> dict[str, float]:
        total, experts_layer = shape.total_params, shape.expert_params_per_layer
        if method == "full":
            weight_bytes = 2 * total
            trainable = total
        else:
            rank = int(recipe_values.get("lora_r") or 16)
            expert_bytes = shape.n_layers * experts_layer * (0.5625 if method == "qlora" else 2)
            weight_bytes = 2 * shape.dense_params + expert_bytes
            lora_per_layer = rank * 4 * shape.d_model * 2 + (
                rank * shape.experts * 3 * (shape.d_model + shape.ffn) if recipe_values.get(
                    "lora_target_experts", True) else 0)
            trainable = shape.n_layers * lora_per_layer
        params = weight_bytes / (n if stage == 3 and not offload_par else 1) * (0 if offload_par else 1)
        grads = 2 * trainable / (n if stage >= 2 else 1)
        optimizer = 0 if offload_opt else 12 * trainable / (n if stage >= 1 else 1)
        if method == "full" and stage < 3:
            optimizer = 12 * trainable / (n if stage >= 1 else 1)
        # ZeRO-3 working set: a gathered MoE block (all experts without EP, local experts with EP) plus its
        # gradient before reduce-scatter, and the prefetched next block.
        working = 0.0
        if stage == 3:
            bytes_per = 2 if method == "full" else (0.5625 if method == "qlora" else 2)
            gathered_experts = experts_layer * bytes_per / ep
            working = (2 + (1 if method == "full" else 0)) * gathered_experts
        tokens = seq * batch
        per_layer = activation_bytes_per_token_layer(shape) * tokens
        logits = 3 * 4 * tokens * shape.vocab  # fp32 logits, their gradient and the log-softmax
        full_acts = shape.n_layers * per_layer + logits
        ckpt_acts = shape.n_layers * 2 * shape.d_model * tokens + per_layer + logits
        return dict(params=params, grads=grads, optimizer=optimizer, working=working,
                    full=full_acts, ckpt=ckpt_acts)

    def total_gb(parts: dict[str, float]) -> float:
        acts = parts["ckpt"] if checkpointing else parts["full"]
        return (parts["params"] + parts["grads"] + parts["optimizer"] + parts["working"] + acts) / GIB + \
            FRAMEWORK_OVERHEAD_GB

    parts = per_gpu(gpus)
    need = total_gb(parts)
    min_gpus = next((n for n in range(1, 4097) if n % ep == 0 and shape.experts % ep == 0
                     and total_gb(per_gpu(n)) <= gpu_memory_gb), None)
    acts = parts["ckpt"] if checkpointing else parts["full"]
    return Plan(recipe=recipe, method=method, zero_stage=stage, ep_size=ep, gpus=gpus, gpu_memory_gb=gpu_memory_gb,
                seq_len=seq, micro_batch=batch, gradient_checkpointing=checkpointing,
                params_gb=round(parts["params"] / GIB, 2), gradients_gb=round(parts["grads"] / GIB, 2),
                optimizer_gb=round(parts["optimizer"] / GIB, 2), working_set_gb=round(parts["working"] / GIB, 2),
                activations_gb=round(acts / GIB, 2),
                activations_checkpointed_gb=round(parts["ckpt"] / GIB, 2),
                activations_full_gb=round(parts["full"] / GIB, 2), overhead_gb=FRAMEWORK_OVERHEAD_GB,
                per_gpu_gb=round(need, 2), fits=need <= gpu_memory_gb, min_gpus=min_gpus)


def plan_recipe(path: str, *, gpus: int, gpu_memory_gb: float) -> Plan:
    """Plan for a recipe file; its `deepspeed:` path is read relative to the working directory."""
    from dbrx_tune.distributed import read_json_config
    from dbrx_tune.recipe import RecipeError, load_yaml_mapping

    values = load_yaml_mapping(path)
    if not values.get("model_name_or_path"):
        raise RecipeError(f"{path}: model_name_or_path is required")
    ds_path = values.get("deepspeed")
    ds_config = read_json_config(ds_path) if isinstance(ds_path, str) else ds_path
    return plan(values, model_shape(values["model_name_or_path"]), gpus=gpus, gpu_memory_gb=gpu_memory_gb,
                ds_config=ds_config, recipe=path)


def _table(result: Plan) -> str:
    rows = [
        ("recipe", result.recipe), ("method", result.method), ("ZeRO stage / EP size", f"{result.zero_stage} / "
                                                                                       f"{result.ep_size}"),
        ("sequence length x micro-batch", f"{result.seq_len} x {result.micro_batch}"),
        ("parameters", f"{result.params_gb:.2f} GB"), ("gradients", f"{result.gradients_gb:.2f} GB"),
        ("optimizer state", f"{result.optimizer_gb:.2f} GB"),
        ("ZeRO-3 gathered working set", f"{result.working_set_gb:.2f} GB"),
        ("activations, checkpointing", f"{result.activations_checkpointed_gb:.2f} GB"),
        ("activations, no checkpointing", f"{result.activations_full_gb:.2f} GB"),
        ("framework overhead", f"{result.overhead_gb:.2f} GB"),
        (f"per GPU (checkpointing {'on' if result.gradient_checkpointing else 'off'})", f"{result.per_gpu_gb:.2f} GB"),
        (f"fits on {result.gpus} x {result.gpu_memory_gb:g} GB", "yes" if result.fits else "no"),
        ("smallest GPU count that fits", str(result.min_gpus) if result.min_gpus else "none up to 4096"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbrx_tune.plan", description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (default 80: H100)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.gpu_memory <= 0:
        parser.error("--gpus and --gpu-memory must be positive")
    try:
        result = plan_recipe(args.recipe, gpus=args.gpus, gpu_memory_gb=args.gpu_memory)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result), indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
