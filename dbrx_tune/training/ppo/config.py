"""`PPOConfig`: the keys of a PPO recipe.

It subclasses transformers' `TrainingArguments`, so the keys every stage shares (output_dir, learning_rate, seed,
bf16, logging_steps, save_steps, report_to, deepspeed, gradient_checkpointing, ...) keep their names and their
DeepSpeed "auto" handling. The PPO keys are named like TRL 0.x's `PPOConfig` (removed in TRL 1.x), so recipes
written for it read the same; the reward, value and reference keys and the memory options are this project's.

Batch sizes follow TRL 0.x: one rollout per process holds
`per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches` prompts; each of the
`num_mini_batches` minibatches is one optimiser step, accumulated over `gradient_accumulation_steps` micro-batches
of `per_device_train_batch_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled


@dataclass
class PPOConfig(TrainingArguments):
    """Arguments of `dbrx_tune.training.ppo.PPOTrainer` (see the module docstring for the batch arithmetic)."""

    # Rollouts
    response_length: int = field(default=53, metadata={"help": "Most tokens sampled per completion."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (log-probs use the same)."})
    stop_token: Literal["eos"] | None = field(
        default="eos",
        metadata={"help": "'eos': a completion ends at the first end-of-text or <|im_end|>; None: never stops early."},
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of every completion that did not stop by itself."}
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per no-grad forward (generation, log-probs, values, rewards)."}
    )
    total_episodes: int | None = field(
        default=None, metadata={"help": "Completions to train on in total; default num_train_epochs * dataset size."}
    )
    max_prompt_length: int = field(default=512, metadata={"help": "Prompts longer than this (tokens) are an error."})

    # Optimisation
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Optimiser steps per pass over a rollout batch."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty to the reference."})
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1", metadata={"help": "Per-token KL estimate: k1 = log p - log ref (unbiased), k3 (lower variance)."}
    )
    cliprange: float = field(default=0.2, metadata={"help": "PPO clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards before GAE."})

    # Reward, value and reference models
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model checkpoint (reward_models/train.py output, or a hub id)."}
    )
    reward_function: str | None = field(
        default=None, metadata={"help": "Rule reward instead of a model, e.g. 'rule:contains_answer' (tests, demos)."}
    )
    value_model_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint the value model starts from; default: the reward model, else the policy."},
    )
    ref_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Frozen reference policy; default: the policy's starting checkpoint (with LoRA: the "
            "policy with its adapters disabled, so no second copy is loaded)."
        },
    )

    # Memory
    reward_model_device: str | None = field(
        default=None,
        metadata={"help": "Keep the reward model on this device ('cpu', 'cuda:1', ...) instead of the process's."},
    )
    offload_reward_model: bool = field(
        default=False, metadata={"help": "Keep the reward model on CPU and move it to the device only to score."}
    )
    offload_ref_model: bool = field(
        default=False, metadata={"help": "Keep the reference on CPU and move it to the device only for its forward."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.reward_model_path is None) == (self.reward_function is None):
            raise ValueError("set exactly one of reward_model_path (a reward model) and reward_function (a rule)")
        for name in ("response_length", "num_ppo_epochs", "num_mini_batches", "local_rollout_forward_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (PPO samples), got {self.temperature}")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ValueError(f"total_episodes must be >= 1, got {self.total_episodes}")
        if self.reward_function is not None and (self.offload_reward_model or self.reward_model_device):
            raise ValueError("offload_reward_model / reward_model_device apply to a reward model, not reward_function")
        if (
            self.deepspeed
            and is_deepspeed_zero3_enabled()
            and (self.offload_reward_model or self.offload_ref_model or self.reward_model_device)
        ):
            raise ValueError(
                "under ZeRO-3 the reward and reference models are partitioned like the policy; drop "
                "offload_reward_model / offload_ref_model / reward_model_device, or offload with "
                "recipes/deepspeed/zero3_offload.json"
            )

    @property
    def mini_batch_size(self) -> int:
        """Prompts per optimiser step on one process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def local_batch_size(self) -> int:
        """Prompts per rollout on one process."""
        return self.mini_batch_size * self.num_mini_batches
