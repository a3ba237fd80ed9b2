"""How many GPUs does a recipe need? A per-GPU memory plan for DBRX (and, to compare, dense Llama 2) fine-tuning.

    python -m dbrx_tune.tools.plan recipes/dbrx_sft.yaml --gpus 16 --gpu-memory 80 [--json]

Reads the recipe (model, method: full / LoRA / QLoRA, DeepSpeed config -> ZeRO stage, offload and EP size, sequence
length, micro-batch, gradient checkpointing) and the model config, and estimates per GPU: parameters, gradients,
optimiser state, activations with and without checkpointing, and the gathered working set (ZeRO-3 gathers a whole MoE
block at a time without EP, only the local experts with EP). It says whether the plan fits and the smallest GPU count
that does. `databricks/dbrx-base` and the Llama 2 base models (`meta-llama/Llama-2-{7b,13b,70b}-hf`) plan offline from
their published config values; a local directory plans from its config.json (DBRX, or a dense Llama-style config).

The model is bytes per parameter (bf16 weights and gradients, fp32 master weights + Adam moments = 12 bytes,
partitioned over the GPUs by ZeRO stage) plus activations per token and layer; checked against measured peaks in
bench/results/planner_check.json. LoRA trains exactly the parameters the toolkit's LoRA trains
(`dbrx_tune.build.prepare_for_training`); QLoRA stores every attention and expert/MLP weight in NF4.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

GIB = 1024**3  # all `*_gb` figures are GiB (2^30 bytes), like torch.cuda's memory numbers and GPU datasheets
FRAMEWORK_OVERHEAD_GB = 1.5  # CUDA/NCCL workspaces and allocator slack seen by max_memory_allocated
NF4_BYTES = 0.5 + 4 / 64  # 4-bit values + one fp32 scale per block of 64 (bitsandbytes NF4)
NF4_NESTED_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # scales quantized to 8 bits, one fp32 per 256 blocks
DBRX_132B = dict(
    d_model=6144, n_layers=40, n_heads=48, kv_heads=8, vocab=100352, ffn=10752, experts=16, top_k=4, max_seq_len=32768
)
KNOWN_CONFIGS = {
    # databricks/dbrx-base and dbrx-instruct config.json values, so hub ids plan without network access.
    "databricks/dbrx-base": DBRX_132B,
    "databricks/dbrx-instruct": DBRX_132B,  # the same architecture, instruction-tuned weights
    # meta-llama/Llama-2-*-hf config.json values (dense: the MLP is the one "expert" every token uses).
    "meta-llama/Llama-2-7b-hf": dict(
        d_model=4096, n_layers=32, n_heads=32, kv_heads=32, vocab=32000, ffn=11008, experts=1, top_k=1, max_seq_len=4096
    ),
    "meta-llama/Llama-2-13b-hf": dict(
        d_model=5120, n_layers=40, n_heads=40, kv_heads=40, vocab=32000, ffn=13824, experts=1, top_k=1, max_seq_len=4096
    ),
    "meta-llama/Llama-2-70b-hf": dict(
        d_model=8192, n_layers=80, n_heads=64, kv_heads=8, vocab=32000, ffn=28672, experts=1, top_k=1, max_seq_len=4096
    ),
}
DENSE_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ModelShape:
    """The sizes of a DBRX-layout MoE decoder, or of a dense Llama-layout one.

    A dense model is the special case experts=1, top_k=1: its SwiGLU MLP is the one expert every token uses, and it
    has no router. The layouts differ where LoRA sees them: DBRX fuses q/k/v into `Wqkv` and keeps 3D per-expert
    w1/v1/w2; Llama has separate q/k/v/o and gate/up/down `nn.Linear` layers.
    """

    d_model: int
    n_layers: int
    n_heads: int
    kv_heads: int
    vocab: int
    ffn: int
    experts: int
    top_k: int
    max_seq_len: int | None = None  # the longest context the model was trained for (None: unknown)

    @property
    def is_moe(self) -> bool:
        return self.experts > 1

    @property
    def qkv_out(self) -> int:
        return (self.n_heads + 2 * self.kv_heads) * (self.d_model // self.n_heads)

    @property
    def attention_params_per_layer(self) -> int:
        return self.d_model * self.qkv_out + self.d_model * self.d_model

    @property
    def expert_params_per_layer(self) -> int:
        """All experts' w1/v1/w2 of one layer (a dense model: its MLP's gate/up/down)."""
        return 3 * self.experts * self.ffn * self.d_model

    @property
    def dense_params(self) -> int:
        """Everything outside the experts / MLP: attention, router, norms, embeddings and LM head."""
        router = self.experts * self.d_model if self.is_moe else 0
        per_layer = self.attention_params_per_layer + router + 2 * self.d_model
        return self.n_layers * per_layer + 2 * self.vocab * self.d_model + self.d_model

    @property
    def total_params(self) -> int:
        return self.dense_params + self.n_layers * self.expert_params_per_layer

    @property
    def active_params(self) -> int:
        """Parameters one token passes through: top_k of the experts."""
        return self.dense_params + self.n_layers * self.expert_params_per_layer * self.top_k // self.experts

    def lora_shapes(self) -> dict[str, tuple[int, int, int]]:
        """LoRA target -> (copies per layer, in_features, out_features); a copy gets its own rank-r pair."""
        d, kv = self.d_model, self.kv_heads * (self.d_model // self.n_heads)
        if self.is_moe:
            return {
                "Wqkv": (1, d, self.qkv_out),
                "out_proj": (1, d, d),
                "w1": (self.experts, d, self.ffn),
                "v1": (self.experts, d, self.ffn),
                "w2": (self.experts, self.ffn, d),
            }
        return {
            "q_proj": (1, d, d),
            "k_proj": (1, d, kv),
            "v_proj": (1, d, kv),
            "o_proj": (1, d, d),
            "gate_proj": (1, d, self.ffn),
            "up_proj": (1, d, self.ffn),
            "down_proj": (1, self.ffn, d),
        }

    def lora_params(self, rank: int, targets: Sequence[str]) -> int:
        """Trainable parameters of rank-`rank` LoRA on `targets`: names from `lora_shapes`, or "router" (trained in
        full, not LoRA)."""
        shapes = self.lora_shapes()
        unknown = sorted(set(targets) - set(shapes) - {"router"})
        if unknown:
            raise ValueError(f"no LoRA target {unknown} in this model; targets are {sorted(shapes)}")
        per_layer = sum(
            copies * rank * (fan_in + fan_out) for name, (copies, fan_in, fan_out) in shapes.items() if name in targets
        )
        if "router" in targets:
            per_layer += self.experts * self.d_model
        return self.n_layers * per_layer


def model_shape(name_or_path: str) -> ModelShape:
    """The shape of a model: a known hub id, or a local/hub config.json (DBRX, or a dense Llama-style config)."""
    if not os.path.isdir(name_or_path) and name_or_path in KNOWN_CONFIGS:
        return ModelShape(**KNOWN_CONFIGS[name_or_path])
    from dbrx_tune.modeling.config import NotDbrxConfigError, load_dbrx_config

    try:
        config = load_dbrx_config(name_or_path)
    except NotDbrxConfigError:
        return dense_shape(name_or_path)
    ffn = config.ffn_config
    return ModelShape(
        d_model=config.d_model,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        kv_heads=config.attn_config.kv_n_heads,
        vocab=config.vocab_size,
        ffn=ffn.ffn_hidden_size,
        experts=ffn.moe_num_experts,
        top_k=ffn.moe_top_k,
        max_seq_len=config.max_seq_len,
    )


def dense_shape(name_or_path: str) -> ModelShape:
    """The shape of a dense decoder from its Llama-style config.json (Llama 2, and models with the same keys)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [key for key in keys if not isinstance(getattr(config, key, None), int)]
    if missing or getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise ValueError(
            f"{name_or_path}: model_type {config.model_type!r} is neither DBRX nor a dense Llama-style decoder "
            f"(config lacks {missing or 'nothing, but declares experts'}); the planner knows DBRX and Llama 2 shapes"
        )
    return ModelShape(
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        vocab=config.vocab_size,
        ffn=config.intermediate_size,
        experts=1,
        top_k=1,
        max_seq_len=getattr(config, "max_position_embeddings", None),
    )


def lora_targets(recipe_values: dict[str, Any], shape: ModelShape) -> tuple[str, ...]:
    """What the recipe's LoRA trains, by the toolkit's rules (`dbrx_tune.build.prepare_for_training`).

    DBRX: attention (`lora_target_attention`), every expert (`lora_target_experts`), the router in full
    (`train_router`). A dense model: PEFT on `lora_target_modules`, by default `all-linear` (attention and MLP).
    """
    if shape.is_moe:
        targets = ("Wqkv", "out_proj") if recipe_values.get("lora_target_attention", True) else ()
        targets += ("w1", "v1", "w2") if recipe_values.get("lora_target_experts", True) else ()
        return targets + (("router",) if recipe_values.get("train_router") else ())
    modules = recipe_values.get("lora_target_modules") or "all-linear"
    if modules == "all-linear":
        return DENSE_ATTENTION_TARGETS + DENSE_MLP_TARGETS
    names = (modules,) if isinstance(modules, str) else tuple(modules)
    unknown = sorted(set(names) - set(shape.lora_shapes()))
    if unknown:
        raise ValueError(
            f"lora_target_modules: {unknown} are not Llama linear layers; the planner counts 'all-linear' or a list "
            f"of {', '.join(DENSE_ATTENTION_TARGETS + DENSE_MLP_TARGETS)}"
        )
    return names


def block_bytes_per_token(shape: ModelShape) -> tuple[int, int]:
    """bf16 bytes one token keeps for backward in one block: (attention, norms and router; the routed SwiGLU experts).

    The second part is the routed intermediate (top_k copies of each token through w1, v1 and w2), the one that
    grows to dominate at long context and that `moe_token_chunk` bounds.
    """
    head = shape.d_model // shape.n_heads
    attention = 2 * (6 * shape.d_model + (shape.n_heads + 2 * shape.kv_heads) * head)
    router_logits = 4 * shape.experts if shape.is_moe else 0
    experts = 2 * shape.top_k * (3 * shape.ffn + 3 * shape.d_model)
    return attention + router_logits, experts


def activation_bytes_per_token_layer(shape: ModelShape) -> int:
    """bf16 activations one token keeps for backward in one layer (attention, routing copies, SwiGLU experts / MLP)."""
    return sum(block_bytes_per_token(shape))


def loss_chunk_tokens(shape: ModelShape, tokens: int) -> int:
    """Rows of logits a fused linear cross-entropy holds at once: liger-kernel's chunk, tokens / ceil(vocab / d_model)
    rounded up to a power of two (2048 of 32768 tokens for DBRX)."""
    chunk = -(-tokens // -(-shape.vocab // shape.d_model))
    return min(tokens, 1 << max(chunk - 1, 0).bit_length())


@dataclass
class Activations:
    """Activation bytes on one GPU at the two moments a step peaks, and what activation offload keeps on the host.

    With gradient checkpointing a step peaks either at the loss (every kept block input plus the logits and their
    gradient: `logits_phase`) or in the backward of a block (the kept inputs plus one block's recomputed activations,
    its dequantized 4-bit experts and the trained weights' gradients: `layer_phase`, gradients counted by the caller).
    Full fp32 logits dominate until the fused loss removes them; then the routed MoE intermediate does.
    """

    logits_phase: float
    layer_phase: float
    full: float  # without gradient checkpointing: every block's activations plus the logits
    host: float  # offloaded block inputs, in host memory

    @property
    def checkpointed(self) -> float:
        return max(self.logits_phase, self.layer_phase)


def activations(
    shape: ModelShape,
    tokens: int,
    *,
    fused_loss: bool,
    offload: bool,
    moe_token_chunk: int | None,
    dequant_bytes: float,
) -> Activations:
    """Activation memory for `tokens` tokens per GPU (sequence x micro-batch / sp_size).

    Checked against bench/results/qlora_132b*.json (4k, 16k, 32k tokens: the logits phase, fused_loss off).
    `dequant_bytes` is the transient bf16 copy of one projection's 4-bit experts (0 for bf16 experts).
    """
    attention, experts = block_bytes_per_token(shape)
    chunk = min(tokens, moe_token_chunk or tokens)
    # A chunked MoE recomputes each chunk in backward: a block keeps the chunks' inputs plus one chunk's intermediate.
    block = attention * tokens + (experts * chunk + (2 * shape.d_model * tokens if chunk < tokens else 0))
    if fused_loss:  # the hidden states' gradient plus one chunk of fp32 logits and their gradient
        logits = 2 * shape.d_model * tokens + 2 * 4 * shape.vocab * loss_chunk_tokens(shape, tokens)
    else:  # bf16 logits, their fp32 copy and the fp32 gradient of the log-softmax
        logits = 3 * 4 * shape.vocab * tokens
    from dbrx_tune.training.offload import offloaded_activation_bytes

    # each block's bf16 input; under offload a DBRX block is checkpointed as two halves, each keeping its input
    halves = 2 if offload and shape.is_moe else 1
    kept_inputs = offloaded_activation_bytes(shape.n_layers, shape.d_model, tokens, inputs_per_layer=halves)
    # offloaded: the inputs of the block being recomputed and of the next one are on the GPU, the rest on the host
    on_gpu = min(kept_inputs, 2 * 2 * shape.d_model * tokens) if offload else kept_inputs
    return Activations(
        logits_phase=on_gpu + logits,
        layer_phase=on_gpu + block + dequant_bytes,
        full=shape.n_layers * block + dequant_bytes + logits,
        host=kept_inputs - on_gpu,
    )


@dataclass
class Plan:
    recipe: str
    method: str
    zero_stage: int
    ep_size: int
    sp_size: int
    gpus: int
    gpu_memory_gb: float
    seq_len: int
    micro_batch: int
    gradient_checkpointing: bool
    fused_loss: bool
    activation_offload: bool
    moe_token_chunk: int | None
    params_gb: float
    gradients_gb: float
    optimizer_gb: float
    working_set_gb: float
    activations_gb: float
    activations_checkpointed_gb: float
    activations_full_gb: float
    host_activations_gb: float
    overhead_gb: float
    per_gpu_gb: float
    first_step_gb: float
    fits: bool
    min_gpus: int | None


def recipe_method(recipe_values: dict[str, Any]) -> str:
    return "qlora" if recipe_values.get("load_in_4bit") else "lora" if recipe_values.get("use_peft") else "full"


def sequence_parallel_size(recipe_values: dict[str, Any], ds_config: dict[str, Any] | None) -> int:
    """Ulysses sequence-parallel degree: the recipe's `sp_size`, or DeepSpeed's `sequence_parallel_size`."""
    return int(recipe_values.get("sp_size") or (ds_config or {}).get("sequence_parallel_size") or 1)


def check_sequence_length(recipe_values: dict[str, Any], shape: ModelShape, recipe: str = "") -> int:
    """The recipe's `max_length`, refused when it exceeds the model's `max_seq_len` (naming both)."""
    seq = int(recipe_values.get("max_length") or 1024)
    if shape.max_seq_len and seq > shape.max_seq_len:
        raise ValueError(f"{recipe or 'recipe'}: max_length {seq} exceeds the model's max_seq_len {shape.max_seq_len}")
    return seq


def plan(
    recipe_values: dict[str, Any],
    shape: ModelShape,
    *,
    gpus: int,
    gpu_memory_gb: float,
    ds_config: dict[str, Any] | None,
    recipe: str = "",
) -> Plan:
    """Per-GPU memory for `recipe_values` on `gpus` GPUs of `gpu_memory_gb` each, and the smallest count that fits.

    `per_gpu_gb` (the verdict) is a steady training step: from the second optimizer step on, the optimizer state and
    the accumulated gradients are resident while forward and backward run. `first_step_gb` is the first step, what
    bench/qlora_132b.py measures: no optimizer state until `optimizer.step()`, gradients appearing during backward.
    """
    from dbrx_tune.parallel.zero3 import expert_parallel_size, zero_stage

    method = recipe_method(recipe_values)
    stage = zero_stage(ds_config)
    ep = expert_parallel_size(ds_config)
    sp = sequence_parallel_size(recipe_values, ds_config)
    zero = (ds_config or {}).get("zero_optimization") or {}
    offload_opt = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    offload_par = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    seq = check_sequence_length(recipe_values, shape, recipe)
    batch = int(recipe_values.get("per_device_train_batch_size") or 1)
    checkpointing = bool(recipe_values.get("gradient_checkpointing", False))
    fused_loss = bool(recipe_values.get("fused_loss", True))
    offload_acts = bool(recipe_values.get("activation_offload", False))
    moe_chunk = recipe_values.get("moe_token_chunk") or None

    if ep > 1 and not shape.is_moe:
        raise ValueError(
            f"{recipe or 'recipe'}: the DeepSpeed config asks for expert parallelism (autoep_size {ep}) "
            "but the model is dense; remove the expert_parallel block"
        )
    if seq % sp:
        raise ValueError(f"{recipe or 'recipe'}: max_length {seq} is not divisible by sp_size {sp}")
    if gpus % ep:
        raise ValueError(
            f"{recipe or 'recipe'}: {gpus} GPUs cannot hold expert-parallel size {ep} (autoep_size in the DeepSpeed "
            "config): the GPU count must be a multiple of it"
        )
    total, experts_layer = shape.total_params, shape.expert_params_per_layer
    rank = int(recipe_values.get("lora_r") or 16)
    trainable = total if method == "full" else shape.lora_params(rank, lora_targets(recipe_values, shape))
    # QLoRA keeps attention and experts / MLP in NF4 (DBRX's experts always with double-quantized scales, as
    # DbrxNF4Experts stores them; bitsandbytes' nn.Linear layers as use_bnb_nested_quant says). Embeddings, LM head,
    # norms and router stay bf16. PEFT keeps the adapters in fp32 beside the frozen weights.
    attention, experts = shape.n_layers * shape.attention_params_per_layer, shape.n_layers * experts_layer
    linear_nf4 = NF4_NESTED_BYTES if recipe_values.get("use_bnb_nested_quant") else NF4_BYTES
    attention_bytes_per = linear_nf4 if method == "qlora" else 2
    expert_bytes_per = (NF4_NESTED_BYTES if shape.is_moe else linear_nf4) if method == "qlora" else 2
    weight_bytes = 2 * (total - attention - experts) + attention_bytes_per * attention + expert_bytes_per * experts
    adapter_bytes = 0 if method == "full" else 4 * trainable
    # `experts_per_group` experts (default all) dequantized to bf16 at a time: one projection, or all three when
    # MoE token chunks reuse them for every chunk of a pass
    group = min(int(recipe_values.get("experts_per_group") or shape.experts), shape.experts)
    moments = 2 if "8bit" in str(recipe_values.get("optim") or "") else 8
    projections = 3 if moe_chunk and moe_chunk < seq * batch // sp else 1
    dequant = projections * 2 * group * shape.ffn * shape.d_model if method == "qlora" else 0
    acts = activations(
        shape,
        seq * batch // sp,
        fused_loss=fused_loss,
        offload=offload_acts and checkpointing,
        moe_token_chunk=moe_chunk,
        dequant_bytes=dequant,
    )

    def per_gpu(n: int) -> dict[str, float]:
        params = weight_bytes / (n if stage == 3 and not offload_par else 1) * (0 if offload_par else 1)
        params += adapter_bytes / (n if stage == 3 else 1)
        # bf16 gradients in full fine-tuning; PEFT keeps adapters (and so their gradients) in fp32
        grads = (2 if method == "full" else 4) * trainable / (n if stage >= 2 else 1)
        # Adam: two moments (fp32, or one byte each for bitsandbytes' 8-bit optimizers), plus an fp32 master copy of
        # bf16 weights (full fine-tuning; fp32 adapters need none)
        state = moments + (4 if method == "full" else 0)
        optimizer = 0 if offload_opt else state * trainable / (n if stage >= 1 else 1)
        # ZeRO-3 working set: a gathered MoE block (all experts without EP, local experts with EP; a dense model's
        # MLP) plus, when the experts train, its gradient before reduce-scatter. The next block is not prefetched
        # whole: DeepSpeed's prefetch bucket ("auto": 0.9 * d_model^2 elements, 34M for DBRX) is a hundredth of
        # a DBRX MoE block. Checked against measured peaks in bench/results/planner_check*.json.
        working = 0.0
        if stage == 3:
            gathered_experts = experts_layer * expert_bytes_per / ep
            working = (1 + (1 if method == "full" else 0)) * gathered_experts
        return dict(params=params, grads=grads, optimizer=optimizer, working=working)

    step_acts = acts.checkpointed if checkpointing else acts.full

    def total_gb(parts: dict[str, float]) -> float:
        resident = parts["params"] + parts["grads"] + parts["optimizer"] + parts["working"]
        return (resident + step_acts) / GIB + FRAMEWORK_OVERHEAD_GB

    def first_step_gb(parts: dict[str, float]) -> float:
        forward_backward = (
            max(acts.logits_phase, acts.layer_phase + parts["grads"]) if checkpointing else acts.full + parts["grads"]
        )
        optimizer_step = parts["grads"] + parts["optimizer"]
        peak = parts["params"] + parts["working"] + max(forward_backward, optimizer_step)
        return peak / GIB + FRAMEWORK_OVERHEAD_GB

    parts = per_gpu(gpus)
    need = total_gb(parts)
    min_gpus = next(
        (
            n
            for n in range(1, 4097)
            if n % ep == 0 and n % sp == 0 and shape.experts % ep == 0 and total_gb(per_gpu(n)) <= gpu_memory_gb
        ),
        None,
    )
    return Plan(
        recipe=recipe,
        method=method,
        zero_stage=stage,
        ep_size=ep,
        sp_size=sp,
        gpus=gpus,
        gpu_memory_gb=gpu_memory_gb,
        seq_len=seq,
        micro_batch=batch,
        gradient_checkpointing=checkpointing,
        fused_loss=fused_loss,
        activation_offload=offload_acts,
        moe_token_chunk=moe_chunk,
        params_gb=round(parts["params"] / GIB, 2),
        gradients_gb=round(parts["grads"] / GIB, 2),
        optimizer_gb=round(parts["optimizer"] / GIB, 2),
        working_set_gb=round(parts["working"] / GIB, 2),
        activations_gb=round(step_acts / GIB, 2),
        activations_checkpointed_gb=round(acts.checkpointed / GIB, 2),
        activations_full_gb=round(acts.full / GIB, 2),
        host_activations_gb=round(acts.host / GIB, 2) if checkpointing else 0.0,
        overhead_gb=FRAMEWORK_OVERHEAD_GB,
        per_gpu_gb=round(need, 2),
        first_step_gb=round(first_step_gb(parts), 2),
        fits=need <= gpu_memory_gb,
        min_gpus=min_gpus,
    )


def plan_recipe(path: str, *, gpus: int, gpu_memory_gb: float, overrides: dict[str, Any] | None = None) -> Plan:
    """Plan for a recipe file, with `overrides` replacing its keys as `--key value` would on the command line.

    The `deepspeed:` path is read relative to the working directory; overriding it with None plans without DeepSpeed.
    """
    from dbrx_tune.parallel.launch import deepspeed_config
    from dbrx_tune.recipe import RecipeError, load_yaml_mapping

    values = {**load_yaml_mapping(path), **(overrides or {})}
    if not values.get("model_name_or_path"):
        raise RecipeError(f"{path}: model_name_or_path is required")
    ds_config = deepspeed_config(values.get("deepspeed"))
    return plan(
        values,
        model_shape(values["model_name_or_path"]),
        gpus=gpus,
        gpu_memory_gb=gpu_memory_gb,
        ds_config=ds_config,
        recipe=path,
    )


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _table(result: Plan) -> str:
    rows = [
        ("recipe", result.recipe),
        ("method", result.method),
        ("ZeRO stage / EP size / SP size", f"{result.zero_stage} / {result.ep_size} / {result.sp_size}"),
        ("sequence length x micro-batch", f"{result.seq_len} x {result.micro_batch}"),
        ("fused loss / activation offload", f"{_on(result.fused_loss)} / {_on(result.activation_offload)}"),
        ("MoE token chunk", str(result.moe_token_chunk or "off")),
        ("parameters", f"{result.params_gb:.2f} GiB"),
        ("gradients", f"{result.gradients_gb:.2f} GiB"),
        ("optimizer state", f"{result.optimizer_gb:.2f} GiB"),
        ("ZeRO-3 gathered working set", f"{result.working_set_gb:.2f} GiB"),
        ("activations, checkpointing", f"{result.activations_checkpointed_gb:.2f} GiB"),
        ("activations, no checkpointing", f"{result.activations_full_gb:.2f} GiB"),
        ("activations offloaded to host memory", f"{result.host_activations_gb:.2f} GiB"),
        ("framework overhead", f"{result.overhead_gb:.2f} GiB"),
        (f"per GPU (checkpointing {'on' if result.gradient_checkpointing else 'off'})", f"{result.per_gpu_gb:.2f} GiB"),
        ("first step (no optimizer state yet)", f"{result.first_step_gb:.2f} GiB"),
        (f"fits on {result.gpus} x {result.gpu_memory_gb:g} GiB", "yes" if result.fits else "no"),
        ("smallest GPU count that fits", str(result.min_gpus) if result.min_gpus else "none up to 4096"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbrx_tune.tools.plan", description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=80.0,
        help="GiB per GPU (default 80: an H100 80GB has 79.6 GiB); the plan's figures are GiB too",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    if args.gpus < 1 or not math.isfinite(args.gpu_memory) or args.gpu_memory <= 0:
        parser.error("--gpus and --gpu-memory must be positive (and finite)")
    try:
        result = plan_recipe(args.recipe, gpus=args.gpus, gpu_memory_gb=args.gpu_memory)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result), indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
