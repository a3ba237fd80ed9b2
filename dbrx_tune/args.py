"""Every argument dataclass a recipe fills, beside TRL's and transformers' own; nothing else.

`dbrx_tune.recipe.parse_recipe` reads a recipe into these plus the stage trainer's config class. The model keys
extend TRL's `ModelConfig`, the data keys TRL's `ScriptArguments`; the vibe-check keys apply to every generating
stage (`--vibe_prompts default --vibe_steps 50`); the online-reward keys name the reward of a GRPO / RLOO run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trl import ModelConfig, ScriptArguments


@dataclass
class ModelArguments(ModelConfig):
    """TRL's `ModelConfig` plus the DBRX-specific keys a recipe may set.

    `model_name_or_path` is a hub id (databricks/dbrx-base) or a local directory in the published DBRX layout
    (safetensors shards, original config.json, tokenizer files when present).
    """

    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; default: the model's own, else the offline DBRX tokenizer."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom code from the model repository. Off unless the recipe asks."}
    )
    random_init: bool = field(
        default=False,
        metadata={"help": "Build the model from its config with random weights (tiny recipes, benchmarks)."},
    )
    experts_implementation: Literal["grouped", "eager"] = field(
        default="grouped",
        metadata={"help": "MoE experts: 'grouped' (grouped GEMM, 3D expert weights) or 'eager' (transformers' loop)."},
    )
    experts_precision: Literal["bf16", "fp8"] = field(
        default="bf16",
        metadata={
            "help": "Expert GEMMs: 'bf16', or 'fp8' (rowwise-scaled FP8 on Hopper GPUs; weights and checkpoints stay "
            "bf16; elsewhere falls back to bf16 with a warning). Needs experts_implementation: grouped."
        },
    )
    moe_loss_weight: float | None = field(
        default=None,
        metadata={"help": "Router load-balancing loss weight; default: the config's ffn_config.moe_loss_weight."},
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "LoRA dropout; must be 0 with expert LoRA (PEFT's parameter LoRA has no dropout)."},
    )
    lora_target_attention: bool = field(
        default=True, metadata={"help": "With use_peft: LoRA on the attention projections Wqkv and out_proj."}
    )
    lora_target_experts: bool = field(
        default=True, metadata={"help": "With use_peft: also put one LoRA per expert on w1/v1/w2."}
    )
    train_router: bool = field(default=False, metadata={"help": "With use_peft: train the MoE router weights too."})
    experts_per_group: int | None = field(
        default=None,
        metadata={"help": "With load_in_4bit: dequantize this many experts at a time (less memory, more launches)."},
    )
    moe_token_chunk: int | None = field(
        default=None,
        metadata={
            "help": "Run the MoE experts over at most this many tokens at a time, each chunk recomputed in backward: "
            "bounds the routed intermediate (tokens x top_k x ffn) at long context. null: all tokens at once."
        },
    )
    sp_size: int = field(
        default=1,
        metadata={
            "help": "Ulysses sequence parallelism (DeepSpeed ALST, SFT under DeepSpeed): split every sequence over "
            "this many ranks; activations per rank fall by as much. 1: off."
        },
    )
    activation_offload: bool = field(
        default=False,
        metadata={
            "help": "With gradient_checkpointing: keep the checkpointed block inputs in pinned host memory "
            "(transformers' activation-checkpointing offload; DBRX blocks are then checkpointed as attention and MoE "
            "halves, two inputs each); refused before loading when host memory is short."
        },
    )


@dataclass
class DataArguments(ScriptArguments):
    """TRL's `ScriptArguments` (dataset_name, dataset_config, splits) plus sample caps for quick runs."""

    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Separate evaluation dataset (file, directory or hub id)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation rows."})
    truncation: bool = field(
        default=True,
        metadata={
            "help": "Truncate samples longer than max_length. When false, such a sample is an error naming the file "
            "and row, raised before training."
        },
    )


@dataclass
class RunArguments:
    """Keys that belong to a run rather than to the model, the data or the trainer."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow writing into a non-empty output_dir that holds something other than this toolkit's runs "
            "(transformers 5 dropped the key of this name; nothing is ever deleted)."
        },
    )
    trust_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint without checking its files against the sha256 manifest this toolkit "
            "writes at each save (for checkpoints written by another tool; their pickled files are loaded as is)."
        },
    )


@dataclass
class OnlineRewardArguments:
    """Recipe keys naming the reward of a GRPO / RLOO run (TRL's configs have none: they take reward objects)."""

    reward_model_path: str | None = field(
        default=None,
        metadata={"help": "A reward_models/train.py output (one-output *ForSequenceClassification), local or hub id."},
    )
    reward_function: str | None = field(
        default=None,
        metadata={"help": "A rule reward, 'rule:NAME[:ARG]' (e.g. rule:contains_answer), alone or beside the model."},
    )


DEFAULT_PROMPTS = "default"


@dataclass
class VibeArguments:
    """When and how the model answers the vibe prompts during training."""

    vibe_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompt file (YAML list or JSONL, see dbrx_tune/evals/vibes/prompts.py), or 'default' for the "
            "bundled set; null switches vibe checks off."
        },
    )
    vibe_steps: int | None = field(
        default=None,
        metadata={
            "help": "Check every N optimizer steps (PPO: updates); null: at each evaluation and each save. "
            "Always also before the first step and after the last."
        },
    )
    vibe_max_new_tokens: int = field(default=64, metadata={"help": "Most tokens generated per answer."})
    vibe_do_sample: bool = field(
        default=False,
        metadata={
            "help": "Sample answers (the model's generation settings: temperature, top-k, top-p) instead of "
            "greedy decoding; greedy answers compare step to step."
        },
    )
    vibe_system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt for prompts whose row names none."}
    )
    vibe_batch_size: int = field(
        default=32,
        metadata={
            "help": "Prompts generated together (left-padded). Under ZeRO-3 each batch costs one all-gather "
            "of the weights per token, so the bundled set fits one batch."
        },
    )

    def __post_init__(self) -> None:
        for name in ("vibe_max_new_tokens", "vibe_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vibe_steps is not None and self.vibe_steps < 1:
            raise ValueError(f"vibe_steps must be >= 1 or null (at each evaluation and save), got {self.vibe_steps}")

    @property
    def enabled(self) -> bool:
        return self.vibe_prompts is not None
