"""Helpers for notebooks/dbrx_vs_llama2.ipynb: real-size accounting, memory plans, measured SFT runs and plots.

Kept out of the notebook so its cells stay short; nothing here is part of the toolkit's API. Every number comes from
the toolkit itself: models built by transformers on the meta device and wrapped by the toolkit's LoRA, the memory
planner (`dbrx_tune.tools.plan`), and `sft/train.py` run as a user runs it.

Run as a script, this file is the child process of `run_sft`: it runs `sft/train.py`'s `main` and records peak memory.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import resource
import subprocess
import sys
from collections import Counter
from typing import Any

import pandas as pd
import torch
import yaml
from torch import nn
from transformers import DbrxConfig, DbrxForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from dbrx_tune.args import ModelArguments
from dbrx_tune.modeling.config import dbrx_base_config, tiny_dbrx_config
from dbrx_tune.recipe import load_yaml_mapping
from dbrx_tune.tools.plan import (
    DENSE_ATTENTION_TARGETS,
    KNOWN_CONFIGS,
    ModelShape,
    lora_targets,
    model_shape,
    plan_recipe,
)

REAL_MODELS = {
    "DBRX 132B": "databricks/dbrx-base",
    "Llama 2 70B": "meta-llama/Llama-2-70b-hf",
    "Llama 2 7B": "meta-llama/Llama-2-7b-hf",
}
DBRX_EP_RECIPE, DBRX_ZERO3_RECIPE = "recipes/dbrx_sft.yaml", "recipes/dbrx_sft_zero3.yaml"
DBRX_LORA_RECIPE, DBRX_QLORA_RECIPE = "recipes/dbrx_sft_lora.yaml", "recipes/dbrx_sft_qlora.yaml"
# The recipe keys that choose the fine-tuning method and mean the same for both models.
METHOD_KEYS = (
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "load_in_4bit",
    "bnb_4bit_quant_type",
    "use_bnb_nested_quant",
    "deepspeed",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- real sizes


def real_config(hub_id: str) -> DbrxConfig | LlamaConfig:
    """The published shape of a model the planner knows offline, as the transformers config that builds it."""
    k = KNOWN_CONFIGS[hub_id]
    if k["experts"] > 1:
        return dbrx_base_config(n_layers=k["n_layers"])
    return LlamaConfig(
        hidden_size=k["d_model"],
        num_hidden_layers=k["n_layers"],
        num_attention_heads=k["n_heads"],
        num_key_value_heads=k["kv_heads"],
        intermediate_size=k["ffn"],
        vocab_size=k["vocab"],
        tie_word_embeddings=False,
    )


def build_on_meta(config: DbrxConfig | LlamaConfig, model_args: ModelArguments | None = None) -> PreTrainedModel:
    """The real-size model with no storage (shapes and module types only, built in a second).

    With `model_args`, the toolkit then prepares it for training exactly as `sft/train.py` does (grouped experts,
    LoRA on the targets the recipe keys choose), so trainable counts are those of a real run.
    """
    from dbrx_tune.build import finish_model, prepare_for_training

    with torch.device("meta"):
        model = (DbrxForCausalLM if isinstance(config, DbrxConfig) else LlamaForCausalLM)(config)
        if model_args is not None:
            model = prepare_for_training(finish_model(model, model_args), model_args)
    return model


def model_facts(model: PreTrainedModel) -> dict[str, Any]:
    """Architecture, parameters, parameters one token passes through (top_k of the experts) and the bf16 size."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    if not experts:
        return {
            "architecture": "dense",
            "parameters": total,
            "active per token": total,
            "share in experts": 0.0,
            "bf16 weights (GB)": 2 * total / 1e9,
        }
    ffn = model.config.ffn_config
    return {
        "architecture": f"MoE, {ffn.moe_num_experts} experts, top-{ffn.moe_top_k}",
        "parameters": total,
        "active per token": total - experts + experts * ffn.moe_top_k // ffn.moe_num_experts,
        "share in experts": experts / total,
        "bf16 weights (GB)": 2 * total / 1e9,
    }


def parameter_groups(model: nn.Module) -> Counter:
    """Parameter counts by what stock bitsandbytes 4-bit loading does with them.

    bnb converts `nn.Linear` modules except the LM head (kept in high precision by transformers' default);
    everything else (embeddings, norms, and DBRX's fused expert parameters) stays bf16.
    """
    head = model.get_output_embeddings()
    groups: Counter = Counter()
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if not own:
            continue
        if module is head:
            groups["lm_head (Linear, skipped)"] += own
        elif isinstance(module, nn.Linear):
            groups["nn.Linear (4-bit)"] += own
        elif "experts" in name:
            groups["fused experts (stay bf16)"] += own
        else:
            groups["embeddings / norms (stay bf16)"] += own
    return groups


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_methods() -> dict[str, dict[str, dict[str, Any]]]:
    """method -> {"moe": recipe keys for DBRX, "dense": for Llama}: attention only, then attention + MLP/experts."""
    return {
        "LoRA, attention": {
            "moe": {"lora_target_experts": False},
            "dense": {"lora_target_modules": list(DENSE_ATTENTION_TARGETS)},
        },
        "LoRA, attention + experts / MLP": {"moe": {}, "dense": {}},  # DBRX: every expert; Llama: all-linear
    }


def trainable_table(rank: int) -> pd.DataFrame:
    """Trainable parameters per model and method at real size: counted on the meta device after the toolkit's
    LoRA, next to the planner's analytic count of the same targets (a cross-check: they must agree)."""
    rows = []
    for label, hub_id in REAL_MODELS.items():
        config, shape = real_config(hub_id), ModelShape(**KNOWN_CONFIGS[hub_id])
        total = sum(p.numel() for p in build_on_meta(config).parameters())
        rows.append(dict(model=label, method="full", trainable=total, planner=shape.total_params, total=total))
        for method, keys in lora_methods().items():
            values = {"use_peft": True, "lora_r": rank, **keys["moe" if shape.is_moe else "dense"]}
            model = build_on_meta(config, ModelArguments(model_name_or_path=hub_id, **values))
            rows.append(
                dict(
                    model=label,
                    method=method,
                    trainable=trainable_parameters(model),
                    planner=shape.lora_params(rank, lora_targets(values, shape)),
                    total=total,
                )
            )
    table = pd.DataFrame(rows)
    table["share of model"] = table.trainable / table.total
    return table


def method_overrides(method_recipe: str) -> dict[str, Any]:
    """The method keys of a shipped DBRX LoRA/QLoRA recipe, to give Llama 2 the same method (no DeepSpeed if none)."""
    values = load_yaml_mapping(method_recipe)
    return {key: values.get(key) for key in METHOD_KEYS if key in values or key == "deepspeed"}


def memory_plans() -> list[dict[str, Any]]:
    """Every plan: DBRX's shipped recipes; Llama 2's recipe with the method keys of DBRX's LoRA / QLoRA recipe."""
    plans = [
        dict(model="DBRX 132B", method="full", recipe=DBRX_ZERO3_RECIPE),
        dict(model="DBRX 132B", method="full + EP 8", recipe=DBRX_EP_RECIPE),
        dict(model="DBRX 132B", method="LoRA", recipe=DBRX_LORA_RECIPE),
        dict(model="DBRX 132B", method="QLoRA", recipe=DBRX_QLORA_RECIPE),
    ]
    for label in ("Llama 2 70B", "Llama 2 7B"):
        model = {"model_name_or_path": REAL_MODELS[label]}
        plans.append(dict(model=label, method="full", recipe="recipes/llama2_sft.yaml", overrides=model))
        for method, method_recipe in (("LoRA", DBRX_LORA_RECIPE), ("QLoRA", DBRX_QLORA_RECIPE)):
            plans.append(
                dict(
                    model=label,
                    method=method,
                    recipe="recipes/llama2_sft.yaml",
                    overrides={**model, **method_overrides(method_recipe)},
                    shown=f"recipes/llama2_sft.yaml + method keys of {method_recipe}",
                )
            )
    return plans


def memory_table(gpus: int, gpu_memory_gb: float) -> pd.DataFrame:
    """The planner's per-GPU memory on `gpus` GPUs and smallest GPU count, for every plan of `memory_plans`."""
    rows = []
    for entry in memory_plans():
        result = plan_recipe(entry["recipe"], gpus=gpus, gpu_memory_gb=gpu_memory_gb, overrides=entry.get("overrides"))
        rows.append(
            {
                "model": entry["model"],
                "method": entry["method"],
                "recipe": entry.get("shown", entry["recipe"]),
                "ZeRO / EP": f"{result.zero_stage} / {result.ep_size}",
                f"GB per GPU on {gpus}": result.per_gpu_gb,
                f"fits {gpus} x {gpu_memory_gb:g} GB": result.fits,
                f"min GPUs ({gpu_memory_gb:g} GB)": result.min_gpus,
            }
        )
    table = pd.DataFrame(rows)
    table[f"min GPUs ({gpu_memory_gb:g} GB)"] = table[f"min GPUs ({gpu_memory_gb:g} GB)"].astype("Int64")
    return table


# ---------------------------------------------------------------- recipes


def recipe_lines(path: str) -> list[str]:
    """The recipe's `key: value` lines, comments and blank lines removed."""
    with open(path, encoding="utf-8") as handle:
        lines = [line.split("#", 1)[0].rstrip() for line in handle]
    return [line for line in lines if line]


def recipe_diff(path_a: str, path_b: str) -> tuple[int, int, list[str]]:
    """(setting lines of a, lines changed between a and b, the unified diff of the setting lines)."""
    a, b = recipe_lines(path_a), recipe_lines(path_b)
    diff = list(difflib.unified_diff(a, b, path_a, path_b, n=0, lineterm=""))
    changed = sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))
    return len(a), changed, diff


def recipe_keys_differing(path_a: str, path_b: str) -> dict[str, tuple]:
    """key -> (value in a, value in b) for every key whose value differs (absent = None)."""
    with open(path_a, encoding="utf-8") as handle:
        a = yaml.safe_load(handle)
    with open(path_b, encoding="utf-8") as handle:
        b = yaml.safe_load(handle)
    return {key: (a.get(key), b.get(key)) for key in dict.fromkeys([*a, *b]) if a.get(key) != b.get(key)}


def dbrx_needs() -> pd.DataFrame:
    """What DBRX needs that Llama 2 does not, with the recipe settings that ask for it, read from the recipes."""
    from dbrx_tune.parallel.launch import read_json_config
    from dbrx_tune.parallel.zero3 import expert_parallel_size, zero_stage

    ep, zero3, lora = (load_yaml_mapping(path) for path in (DBRX_EP_RECIPE, DBRX_ZERO3_RECIPE, DBRX_LORA_RECIPE))
    rows = [
        (
            "RoPE base 500000",
            "load_dbrx_config copies attn_config.rope_theta into rope_parameters",
            "nothing: every DBRX load is corrected",
            "stock (rope_theta at the top level)",
            "2(a)",
        ),
        (
            "router load-balancing loss",
            "sync_moe_config gives TRL the MoE names it reads",
            f"moe_loss_weight: {ep.get('moe_loss_weight')}",
            "no router",
            "2(b)",
        ),
        (
            "ZeRO-3 leaf modules",
            "the loader registers DbrxFFN as a ZeRO-3 leaf",
            f"deepspeed: {zero3['deepspeed']} (ZeRO stage {zero_stage(read_json_config(zero3['deepspeed']))}), "
            f"in {DBRX_ZERO3_RECIPE}",
            "not needed (dense layers)",
            "2(e)",
        ),
        (
            "LoRA on the experts",
            "grouped 3D experts, one LoRA per expert",
            f"experts_implementation: {lora.get('experts_implementation')}, lora_target_experts: "
            f"{lora.get('lora_target_experts')}, in {DBRX_LORA_RECIPE}",
            "PEFT all-linear",
            "2(d), 4",
        ),
        (
            "expert parallelism",
            "DeepSpeed AutoEP with the toolkit's DBRX preset",
            f"deepspeed: {ep['deepspeed']} (autoep_size {expert_parallel_size(read_json_config(ep['deepspeed']))}), "
            f"in {DBRX_EP_RECIPE}",
            "no experts",
            "5",
        ),
    ]
    return pd.DataFrame(rows, columns=["DBRX needs", "dbrx_tune does", "recipe setting", "Llama 2", "part"])


def readable(value: Any) -> str:
    """A table cell for people: thousands separators, a few significant decimals."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"


# ---------------------------------------------------------------- the measured run

# SIZE="small": a DBRX-shaped model wide enough for the experts to dominate (16 experts, top-4, DBRX's ffn/d_model
# ratio 1.75), about 0.9B parameters and 0.4B active, and its Llama twin: for a GPU, in bf16.
SMALL_DBRX = dict(
    d_model=1024,
    n_heads=16,
    n_layers=8,
    max_seq_len=2048,
    attn_config={"clip_qkv": 8.0, "kv_n_heads": 4, "rope_theta": 500000.0},
    ffn_config={
        "ffn_hidden_size": 1792,
        "moe_num_experts": 16,
        "moe_top_k": 4,
        "moe_jitter_eps": 0.0,
        "moe_loss_weight": 0.05,
        "moe_normalize_expert_weights": 1.0,
    },
)
RUN_ARGS = {  # the same trainer overrides for both models: shorter than the recipes' two epochs
    "tiny": [
        "--max_steps",
        "20",
        "--logging_steps",
        "1",
        "--warmup_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--max_eval_samples",
        "16",
    ],
    "small": [
        "--max_steps",
        "100",
        "--logging_steps",
        "2",
        "--warmup_steps",
        "10",
        "--per_device_train_batch_size",
        "32",
        "--learning_rate",
        "5.0e-4",
    ],
}
QUIET = ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
DEVICE_ARGS = {"cpu": [], "cuda": ["--use_cpu", "false", "--bf16", "true", "--dtype", "bfloat16"]}


def resolve_device(device: str, size: str) -> str:
    """ "auto" -> "cuda" when a GPU is present, else "cpu"; refuse what cannot run (with what to do instead)."""
    if size not in RUN_ARGS:
        raise ValueError(f"SIZE={size!r}: choose one of {sorted(RUN_ARGS)}")
    resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if resolved not in DEVICE_ARGS:
        raise ValueError(f"DEVICE={device!r}: choose auto, cpu or cuda")
    if resolved == "cuda" and not torch.cuda.is_available():
        raise ValueError("DEVICE='cuda' but torch sees no GPU; use DEVICE='auto' or 'cpu'")
    if size != "tiny" and resolved == "cpu":
        raise ValueError(f"SIZE={size!r} trains a ~1B-parameter model: run it with a GPU, or use SIZE='tiny' on a CPU")
    return resolved


def matched_llama_config(dbrx: DbrxConfig) -> LlamaConfig:
    """A Llama 2-shaped twin of a DBRX config with the same *active* parameters: same attention, vocabulary and depth,
    and one MLP as wide as the top_k experts a token passes through (intermediate = top_k * ffn)."""
    ffn = dbrx.ffn_config
    return LlamaConfig(
        hidden_size=dbrx.d_model,
        num_hidden_layers=dbrx.n_layers,
        num_attention_heads=dbrx.n_heads,
        num_key_value_heads=dbrx.attn_config.kv_n_heads,
        intermediate_size=ffn.moe_top_k * ffn.ffn_hidden_size,
        vocab_size=dbrx.vocab_size,
        max_position_embeddings=dbrx.max_seq_len,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=dbrx.pad_token_id,
        bos_token_id=dbrx.bos_token_id,
        eos_token_id=dbrx.eos_token_id,
    )


def run_models(size: str, work_dir: str) -> dict[str, str]:
    """Model directory per name: the shipped tiny twins, or the "small" pair written under `work_dir`."""
    if size == "tiny":
        return {"DBRX": "recipes/tiny/dbrx-tiny", "Llama 2": "recipes/tiny/llama2-tiny"}
    dbrx = tiny_dbrx_config(**SMALL_DBRX)
    dirs = {"DBRX": os.path.join(work_dir, "dbrx-small"), "Llama 2": os.path.join(work_dir, "llama2-small")}
    dbrx.save_pretrained(dirs["DBRX"])
    matched_llama_config(dbrx).save_pretrained(dirs["Llama 2"])
    return dirs


def run_sft(recipe: str, model_dir: str, output_dir: str, size: str, device: str) -> dict[str, Any]:
    """Run `sft/train.py recipe` in a fresh Python process, as a user would, and return what it measured.

    A process of its own gives each model a clean peak-memory reading. Returns the trainer's metrics plus
    `peak_memory_mb` and `memory_measure` (what that number is on this device).
    """
    result_path = output_dir + ".measured.json"
    # Vibe checks generate text before the first step and after the last: off, so the timing is training alone.
    no_vibes = ["--vibe_prompts", "null"] if load_yaml_mapping(recipe).get("vibe_prompts") else []
    command = [
        sys.executable,
        os.path.abspath(__file__),
        device,
        result_path,
        recipe,
        "--model_name_or_path",
        model_dir,
        "--output_dir",
        output_dir,
        *RUN_ARGS[size],
        *QUIET,
        *no_vibes,
        *DEVICE_ARGS[device],
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if device == "cuda":
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one process, one GPU: TRL refuses nn.DataParallel over several
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"sft/train.py {recipe} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(result_path, encoding="utf-8") as handle:
        return json.load(handle)


def _measure_sft(device: str, result_path: str, argv: list[str]) -> None:
    """The child side of `run_sft`: peak memory around `sft/train.py`'s `main(argv)`.

    CPU: peak resident memory (ru_maxrss) of this process during training minus its peak before it, i.e. model,
    optimizer state, activations, data and tokenizer, without the ~0.5 GB of Python and libraries already loaded.
    GPU: torch.cuda.max_memory_allocated, the usual number for GPU training memory.
    """
    spec = importlib.util.spec_from_file_location("sft_train", os.path.join(ROOT, "sft", "train.py"))
    sft_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft_train)
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_unit
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    metrics = sft_train.main(argv)
    if device == "cuda":
        peak, measure = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_unit - before
        measure = "peak RSS of the training process above its peak after imports"
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump({**metrics, "peak_memory_mb": peak / 2**20, "memory_measure": measure}, handle)


def vibe_check_trained(runs: dict[str, str], device: str, max_new_tokens: int = 16) -> str:
    """Answer the bundled vibe prompts once with each trained model, as the vibe check at its last step would, and
    write the page that compares them (`python -m dbrx_tune.evals.vibes` does the same); returns the page's path.

    The timed runs have vibe checks off (see `run_sft`), so this check runs after training, from the saved models.
    """
    from dbrx_tune.args import VibeArguments
    from dbrx_tune.build import load_causal_lm
    from dbrx_tune.evals.vibes.check import VibeChecker
    from dbrx_tune.evals.vibes.prompts import load_vibe_prompts
    from dbrx_tune.evals.vibes.report import write_report
    from dbrx_tune.tokenizer import load_tokenizer

    settings = VibeArguments(vibe_prompts="default", vibe_max_new_tokens=max_new_tokens)
    prompts = load_vibe_prompts(settings.vibe_prompts)
    dtype = "bfloat16" if device == "cuda" else "float32"
    for output_dir in runs.values():
        tokenizer = load_tokenizer(output_dir)
        model = load_causal_lm(ModelArguments(model_name_or_path=output_dir, dtype=dtype), tokenizer).to(device)
        with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
            step = json.load(handle)["global_step"]
        VibeChecker(prompts, tokenizer, settings, output_dir, stage="sft").run(
            model, step, is_main=True, every_rank=False
        )
    page = os.path.join(os.path.dirname(next(iter(runs.values()))), "vibes.html")
    return str(write_report(list(runs.values()), output=page))


def lm_losses(output_dir: str) -> tuple[dict[int, float], float | None]:
    """(step -> training LM loss, eval LM loss) of a finished run, from its trainer_state.json and config.json.

    TRL adds DBRX's router term (router_aux_loss_coef x aux_loss) to the loss it logs; it is taken off here, so
    both models are compared on the same language-modelling loss. Exact, since TRL averages the logged loss and
    aux_loss over the same steps; a dense model logs no aux_loss and nothing is taken off.
    """
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    with open(os.path.join(output_dir, "config.json"), encoding="utf-8") as handle:
        coef = json.load(handle).get("router_aux_loss_coef") or 0.0
    train = {e["step"]: e["loss"] - coef * e.get("aux_loss", 0.0) for e in history if "loss" in e}
    evals = [e["eval_loss"] - coef * e.get("eval_aux_loss", 0.0) for e in history if "eval_loss" in e]
    return train, (evals[-1] if evals else None)


def trained_tokens(output_dir: str) -> int:
    """Tokens the run trained on (prompt and completion, no padding): TRL's `num_tokens` at the last log."""
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    return int(max(e["num_tokens"] for e in history if "num_tokens" in e))


def run_table(model_dirs: dict[str, str], runs: dict[str, str], measured: dict[str, dict]) -> pd.DataFrame:
    """The side-by-side table of the measured runs, one column per model."""
    columns = {}
    for name, output_dir in runs.items():
        shape, metrics = model_shape(model_dirs[name]), measured[name]
        train, eval_loss = lm_losses(output_dir)
        tokens = trained_tokens(output_dir)
        steps = sorted(train)
        columns[name] = {
            "parameters (M)": shape.total_params / 1e6,
            "active parameters per token (M)": shape.active_params / 1e6,
            "optimizer steps": steps[-1],
            "tokens trained": tokens,
            "train time (s)": metrics["train_runtime"],
            "tokens / s": tokens / metrics["train_runtime"],
            "peak memory (MiB)": metrics["peak_memory_mb"],
            "first / last train LM loss": f"{train[steps[0]]:.3f} / {train[steps[-1]]:.3f}",
            "eval LM loss": eval_loss,
        }
    return pd.DataFrame(columns)


# ---------------------------------------------------------------- plots


def plot_trainable(table: pd.DataFrame, rank: int):
    """Grouped bars of trainable parameters (log scale) per method, one group per model."""
    pivot = table.pivot(index="model", columns="method", values="trainable").loc[list(REAL_MODELS)]
    pivot = pivot[list(dict.fromkeys(table.method))]
    ax = pivot.plot.bar(logy=True, rot=0, figsize=(9, 4))
    ax.set_ylabel("trainable parameters (log)")
    ax.set_title(f"Trainable parameters at real size (LoRA r={rank})")
    return ax.figure


def plot_memory(table: pd.DataFrame, gpus: int, gpu_memory_gb: float):
    """Left: planner GiB per GPU on `gpus` GPUs against one GPU's memory; right: the smallest GPU count that fits."""
    import matplotlib.pyplot as plt

    per_gpu, min_gpus = f"GB per GPU on {gpus}", f"min GPUs ({gpu_memory_gb:g} GB)"
    labels = [f"{model}, {method}" for model, method in zip(table.model, table.method)]
    colors = [f"C{list(REAL_MODELS).index(model)}" for model in table.model]
    counts = [0 if pd.isna(n) else int(n) for n in table[min_gpus]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    left.barh(labels, table[per_gpu], color=colors)
    left.axvline(gpu_memory_gb, color="black", linestyle="--", linewidth=1, label=f"one {gpu_memory_gb:g} GB GPU")
    left.set_xlabel(f"GiB per GPU with {gpus} GPUs"), left.legend(loc="lower right")
    right.barh(labels, counts, color=colors)
    for y, n in enumerate(counts):
        right.annotate(f" {n}" if n else " does not fit one GPU", (n, y), va="center", fontsize=8)
    right.set_xlabel(f"smallest number of {gpu_memory_gb:g} GB GPUs")
    left.invert_yaxis()
    fig.suptitle("Memory planner (dbrx_tune.tools.plan) at real sizes: 4096 tokens, micro-batch 1")
    fig.tight_layout()
    return fig


def plot_losses(losses: dict[str, dict[int, float]], eval_losses: dict[str, float | None], title: str):
    """Training LM loss per step for every model on one axes, the final eval loss as a marker."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for index, (name, history) in enumerate(losses.items()):
        ax.plot(list(history), list(history.values()), label=f"{name} train", color=f"C{index}")
        if eval_losses.get(name) is not None:
            ax.scatter([max(history)], [eval_losses[name]], marker="*", s=150, color=f"C{index}", label=f"{name} eval")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("language-modelling loss"), ax.set_title(title), ax.legend()
    return fig


def plot_run_bars(table: pd.DataFrame, memory_measure: str):
    """Tokens per second and peak memory of each model's run, side by side."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, row, label in (
        (axes[0], "tokens / s", "tokens / s (higher is faster)"),
        (axes[1], "peak memory (MiB)", f"peak memory, MiB\n({memory_measure})"),
    ):
        values = table.loc[row].astype(float)
        ax.bar(values.index, values.values, color=[f"C{i}" for i in range(len(values))])
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    _measure_sft(sys.argv[1], sys.argv[2], sys.argv[3:])
