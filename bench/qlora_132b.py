"""QLoRA memory of the full DBRX-132B shape on one GPU: 4-bit NF4 experts, LoRA, one training step.

The bf16 model (about 264 GB) never exists whole. It is built on the meta device, then each of the 40 blocks in
turn is materialised on the GPU with random bf16 weights, its experts are quantized to NF4 (`DbrxNF4Experts`:
per-expert blocks of 64, double-quantized scales) and the bf16 experts freed, so building costs one block's bf16
experts (6.3 GB) above the 4-bit model. Attention (`Wqkv`, `out_proj`) is bitsandbytes `Linear4bit` NF4 (double
quant, bf16 compute) by default, or bf16 with `--attention bf16`; embeddings, LM head, norms and routers stay bf16.
Then `apply_expert_lora` (attention and one LoRA per expert on w1/v1/w2, router frozen), non-reentrant gradient
checkpointing, and `--steps` training steps (default one): forward with labels (router aux loss on), backward,
AdamW step.

Memory is reported in GB (1e9 bytes) and GiB from `torch.cuda.memory_allocated`/`max_memory_allocated`:
    weights_gb       resident model after building and LoRA wrapping (split by kind in `weights_breakdown_gb`)
    activations_gb   peak during forward+backward minus what was resident before it: checkpointed block inputs,
                     one block's recomputed activations, the dequantized bf16 expert weights of one projection,
                     logits and their gradient, LoRA gradients
    optimizer_gb     optimizer state after the first step (torch AdamW fp32, or bitsandbytes' 8-bit AdamW)
    peak_gb          peak over every step (`first_step_peak_gb`: the first alone)

    python bench/qlora_132b.py [--seq-len 4096] [--layers 40] [--attention nf4|bf16] [--lora-r 16]
        [--activation-offload] [--moe-token-chunk N] [--optim adamw|adamw_8bit] [--autocast] [--steps 1]
    python bench/qlora_132b.py --recipe recipes/dbrx_sft_qlora_32k.yaml --steps 3   # a recipe's own settings
    python bench/qlora_132b.py --recipe ... --layers 3 --steps 2 --memory-trace peak.json  # what the peak holds
    python bench/qlora_132b.py --smoke --output /tmp/qlora.json     # tiny model on the CPU, seconds

The model goes through the block steps training applies after loading (`dbrx_tune.build.prepare_dbrx_blocks`):
out-of-place router jitter, LayerNorms outside autocast, and with `--activation-offload` blocks checkpointed by
halves (`--no-checkpoint-halves` to compare); PEFT sees it as bitsandbytes-loaded, so NF4 attention gets PEFT's bnb
LoRA layer. `--recipe` also sets `--autocast` from `bf16: true`: accelerate runs such a recipe's forward under
autocast.

With `--steps N` > 1 the first step and the steady steps are reported apart: the first pays one-off costs (pinned
host buffers for the offload, kernel autotuning) and has no optimizer state yet; `step_s` is the mean of the later
steps and `peak_gb` the peak over all of them (weights + optimizer state + activations), what a long run holds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time

import torch
import yaml
from memory_trace import record_peak_composition
from provenance import provenance, write_result
from torch import nn
from transformers import DbrxConfig, DbrxForCausalLM
from transformers.models.dbrx.modeling_dbrx import DbrxRotaryEmbedding
from trl.trainer.utils import add_fused_lm_head

from dbrx_tune.build import prepare_dbrx_blocks
from dbrx_tune.modeling.config import dbrx_base_config, tiny_dbrx_config
from dbrx_tune.modeling.experts import set_moe_token_chunk
from dbrx_tune.modeling.lora import apply_expert_lora
from dbrx_tune.modeling.moe_loss import sync_moe_config
from dbrx_tune.modeling.quantized_experts import DbrxNF4Experts

logger = logging.getLogger("bench.qlora_132b")

GB = 1e9
GIB = 2**30


def dbrx_132b_config(n_layers: int, seq_len: int) -> DbrxConfig:
    """databricks/dbrx-base's shape (40 layers by default)."""
    config = dbrx_base_config(n_layers, max_seq_len=max(seq_len, 32768))
    return sync_moe_config(config)


@torch.no_grad()
def _random_init_(module: nn.Module, std: float) -> None:
    """Weights of a freshly `to_empty`'d module: LayerNorm weights 1, every other parameter N(0, std)."""
    for child in module.modules():
        for name, param in child.named_parameters(recurse=False):
            if isinstance(child, nn.LayerNorm) and name == "weight":
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)


def _linear_4bit(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """bitsandbytes NF4 (double quant) copy of a materialised `nn.Linear`, quantized on its device."""
    import bitsandbytes as bnb

    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=quantized
    ).to(linear.weight.device)
    return quantized


def build_qlora_base(
    config: DbrxConfig, device: torch.device, dtype: torch.dtype, attention: str, experts_per_group: int | None
) -> DbrxForCausalLM:
    """Random-init DBRX with NF4 experts, materialised and quantized one block at a time on `device`."""
    with torch.device("meta"):
        model = DbrxForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    std = config.initializer_range
    transformer = model.transformer
    for module in (transformer.wte, transformer.norm_f, model.lm_head):
        module.to_empty(device=device)
        _random_init_(module, std)
    with torch.device(device):
        transformer.rotary_emb = DbrxRotaryEmbedding(config)
    for index, block in enumerate(transformer.blocks):
        block.to_empty(device=device)  # bf16 experts of this block only: 6.3 GB at DBRX size
        _random_init_(block, std)
        block.ffn.experts = DbrxNF4Experts.from_experts(
            block.ffn.experts, config.ffn_config, experts_per_group=experts_per_group
        )
        if attention == "nf4":
            attn = block.norm_attn_norm.attn
            attn.Wqkv = _linear_4bit(attn.Wqkv, dtype)
            attn.out_proj = _linear_4bit(attn.out_proj, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("block %d/%d quantized", index + 1, len(transformer.blocks))
    # transformers' bitsandbytes loader marks the model so; PEFT then wraps Linear4bit with its bnb LoRA layer (no
    # fp32 copy of the input under autocast), as in training
    model.is_loaded_in_4bit = attention == "nf4"
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after building: {leftover[:5]}")
    return model


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weights_breakdown(model: nn.Module) -> dict[str, float]:
    """Resident bytes by kind (GB): 4-bit experts, attention, LoRA, and the rest (embeddings, head, norms, routers)."""
    kinds = {"experts_nf4": 0, "attention": 0, "lora": 0, "embeddings_head_norms_routers": 0}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "lora_" in name:
            kind = "lora"
        elif ".ffn.experts." in name:
            kind = "experts_nf4"
        elif ".attn." in name:
            kind = "attention"
        else:
            kind = "embeddings_head_norms_routers"
        kinds[kind] += tensor.numel() * tensor.element_size()
    # bitsandbytes keeps Linear4bit's scales on the weight's quant_state, not as parameters or buffers
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            kinds["attention"] += _bytes([state.absmax, state.code])
            if state.nested:
                kinds["attention"] += _bytes([state.state2.absmax, state.state2.code])
    return {kind: round(size / GB, 3) for kind, size in kinds.items()}


RECIPE_FLAGS = {
    "max_length": "seq_len",
    "lora_r": "lora_r",
    "experts_per_group": "experts_per_group",
    "activation_offload": "activation_offload",
    "moe_token_chunk": "moe_token_chunk",
    "optim": "optim",
    "bf16": "autocast",
}
"""Recipe keys that set this script's flags (`--recipe`); flags given on the command line still win."""

OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_8bit": "adamw_8bit"}
"""Recipe `optim` values this script can reproduce, and the `--optim` each one means."""


def recipe_defaults(path: str) -> dict:
    """The flags a QLoRA recipe implies, so a measurement runs exactly the recipe's memory settings."""
    with open(path, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    if not recipe.get("load_in_4bit"):
        raise SystemExit(f"{path}: not a QLoRA recipe (load_in_4bit is not true)")
    defaults = {flag: recipe[key] for key, flag in RECIPE_FLAGS.items() if recipe.get(key) is not None}
    if "optim" in defaults:
        if defaults["optim"] not in OPTIMIZERS:
            raise SystemExit(f"{path}: optim {defaults['optim']!r} is not one of {sorted(OPTIMIZERS)}")
        defaults["optim"] = OPTIMIZERS[defaults["optim"]]
    return defaults


def make_optimizer(name: str, params: list[nn.Parameter], on_cuda: bool) -> torch.optim.Optimizer:
    """torch AdamW (fp32 moments, 8 bytes a parameter) or bitsandbytes' 8-bit AdamW (2 bytes), as `optim` selects."""
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4, fused=on_cuda)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--attention", choices=("nf4", "bf16"), default="nf4")
    parser.add_argument(
        "--experts-per-group",
        type=int,
        default=None,
        help="experts dequantized at once in the forward (default: all 16)",
    )
    parser.add_argument(
        "--lm-head",
        choices=("fused", "model"),
        default="fused",
        help="TRL's fused LM head, as the SFT stage runs (default), or the model's forward with full logits",
    )
    parser.add_argument(
        "--activation-offload", action="store_true", help="checkpointed block inputs in pinned host memory"
    )
    parser.add_argument("--moe-token-chunk", type=int, default=None, help="experts over this many tokens at a time")
    parser.add_argument("--optim", choices=("adamw", "adamw_8bit"), default="adamw")
    parser.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="forward under torch.autocast(bf16), as accelerate runs a `bf16: true` recipe without DeepSpeed",
    )
    parser.add_argument(
        "--checkpoint-halves",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="checkpoint each block's attention and MoE halves apart (default: with --activation-offload, as training)",
    )
    parser.add_argument("--steps", type=int, default=1, help="training steps; the first is reported apart")
    parser.add_argument("--profile", default=None, help="write the last step's CUDA kernel table (torch.profiler) here")
    parser.add_argument(
        "--memory-trace", default=None, help="write what is alive at the last step's CUDA memory peak here (JSON)"
    )
    parser.add_argument("--recipe", default=None, help="take the memory settings from this QLoRA recipe YAML")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny DBRX on the CPU: checks the script runs")
    parser.add_argument(
        "--output", default=None, help="JSON path (default bench/results/qlora_132b.json; none with --smoke)"
    )
    args = parser.parse_args()
    if args.recipe:
        parser.set_defaults(**recipe_defaults(args.recipe))
        args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.checkpoint_halves is None:
        args.checkpoint_halves = bool(args.activation_offload)

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.bfloat16
        torch.set_num_threads(1)  # tiny matrices: extra threads only spin (seconds per step on a busy machine)
        config = sync_moe_config(
            tiny_dbrx_config(
                n_layers=args.layers if args.layers < 40 else 2,
                vocab_size=1024,
                pad_token_id=1000,
                bos_token_id=1001,
                eos_token_id=1001,
            )
        )
        args.seq_len, args.lora_r = min(args.seq_len, 32), 8
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/qlora_132b.py needs a CUDA GPU (or --smoke for the CPU check)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = dbrx_132b_config(args.layers, args.seq_len)
    output = args.output or (None if args.smoke else "bench/results/qlora_132b.json")
    on_cuda = device.type == "cuda"

    def allocated() -> int:
        return torch.cuda.memory_allocated(device) if on_cuda else 0

    def peak() -> int:
        return torch.cuda.max_memory_allocated(device) if on_cuda else 0

    torch.manual_seed(args.seed)
    began = time.perf_counter()
    model = build_qlora_base(config, device, dtype, args.attention, args.experts_per_group)
    build_peak = peak()
    prepare_dbrx_blocks(model, by_halves=args.checkpoint_halves)  # as dbrx_tune.build.finish_model does
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, offload=args.activation_offload and on_cuda
    )
    if args.moe_token_chunk:
        set_moe_token_chunk(model, args.moe_token_chunk)
    head_kwargs = {}
    if args.lm_head == "fused":
        add_fused_lm_head(model)  # before PEFT, as TRL's SFTTrainer does
        head_kwargs["fused_lm_head"] = True
    model = apply_expert_lora(model, r=args.lora_r, alpha=2 * args.lora_r)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args.optim, trainable, on_cuda)
    build_s = time.perf_counter() - began
    weights = allocated()
    breakdown = weights_breakdown(model)

    input_ids = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(1))
    input_ids = input_ids.to(device)
    step_times, step_peaks, losses = [], [], []
    profiler = None
    for step in range(args.steps):
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        if args.profile and step == args.steps - 1:
            activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * on_cuda
            profiler = torch.profiler.profile(activities=activities)
            profiler.start()
        tracing = args.memory_trace and on_cuda and step == args.steps - 1
        trace = record_peak_composition(args.memory_trace) if tracing else contextlib.nullcontext()
        began = time.perf_counter()
        with trace:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):  # accelerate: forward only
                loss = model(input_ids=input_ids, labels=input_ids, output_router_logits=True, **head_kwargs).loss
            loss.backward()
        if step == 0:
            peak_forward_backward = peak()
            grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in trainable if p.grad is not None)
            before_optimizer = allocated()
        optimizer.step()
        if step == 0:
            optimizer_bytes = allocated() - before_optimizer
        optimizer.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - began)
        step_peaks.append(peak())
        losses.append(loss.item())
    if profiler is not None:
        profiler.stop()
        with open(args.profile, "w", encoding="utf-8") as handle:
            sort_by = "cuda_time_total" if on_cuda else "cpu_time_total"
            handle.write(profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70))
    steady_times = step_times[1:] or step_times
    step_s, step_peak = sum(steady_times) / len(steady_times), max(step_peaks)

    def gb(value: int) -> float:
        return round(value / GB, 2)

    result = {
        "peak_gb": gb(step_peak),
        "peak_gib": round(step_peak / GIB, 2),
        "first_step_peak_gb": gb(step_peaks[0]),
        "peak_reserved_gb": gb(torch.cuda.max_memory_reserved(device)) if on_cuda else 0.0,
        "weights_gb": gb(weights),
        "activations_gb": gb(peak_forward_backward - weights),
        "optimizer_gb": gb(optimizer_bytes),
        "build_peak_gb": gb(build_peak),
        "weights_breakdown_gb": breakdown,
        "seq_len": args.seq_len,
        "lm_head": args.lm_head,
        "batch": 1,
        "n_layers": config.n_layers,
        "attention": "bitsandbytes Linear4bit NF4 (double quant)" if args.attention == "nf4" else "bf16",
        "experts": "DbrxNF4Experts NF4 (block 64, double quant)",
        "experts_per_group": args.experts_per_group or config.ffn_config.moe_num_experts,
        "fused_loss": args.lm_head == "fused",  # TRL's fused LM head; else lm_head logits + fp32 cross-entropy
        "activation_offload": args.activation_offload,
        "moe_token_chunk": args.moe_token_chunk,
        "lora": {
            "r": args.lora_r,
            "alpha": 2 * args.lora_r,
            "targets": "Wqkv, out_proj, per-expert w1/v1/w2",
            "trainable_params": sum(p.numel() for p in trainable),
            "dtype": str(trainable[0].dtype),
        },
        "total_params": sum(p.numel() for p in model.parameters()),
        "optim": args.optim,
        "autocast": args.autocast,
        "attention_lora_layer": next(
            f"{type(m).__module__}.{type(m).__name__}" for n, m in model.named_modules() if n.endswith("attn.Wqkv")
        ),
        "checkpoint_halves": args.checkpoint_halves,
        "steps": args.steps,
        "loss": round(losses[0], 4),
        "losses": [round(value, 4) for value in losses],
        "grads_finite": grads_finite,
        "step_s": round(step_s, 2),
        "first_step_s": round(step_times[0], 2),
        "build_s": round(build_s, 1),
        "fits_h200_141gb": step_peak < 141 * GB,
        "fits_h100_80gb": step_peak < 80 * GB,
        **provenance(torch.cuda.get_device_name(device) if on_cuda else "cpu"),
    }
    if output:
        write_result(output, result)
    print(
        f"layers {config.n_layers}, seq {args.seq_len}, attention {args.attention}, LoRA r {args.lora_r}: "
        f"loss {result['loss']}, grads finite {grads_finite}, step {result['step_s']} s"
    )
    print(f"{'weights':12} {result['weights_gb']:8} GB  {breakdown}")
    print(f"{'activations':12} {result['activations_gb']:8} GB")
    print(f"{'optimizer':12} {result['optimizer_gb']:8} GB")
    print(f"{'peak':12} {result['peak_gb']:8} GB ({result['peak_gib']} GiB); build peak {result['build_peak_gb']} GB")


if __name__ == "__main__":
    main()
