"""`VibeArguments`: the recipe keys that switch vibe checks on and shape them.

Every stage script parses these beside its trainer's keys (see `dbrx_tune.recipe.parse_recipe`), so a recipe or a
command line can say `--vibe_prompts default --vibe_steps 50` for SFT, DPO, ORPO, GRPO, RLOO and PPO alike.
Unknown keys and wrong types are reported by the recipe parser; the prompt file itself is checked by
`dbrx_tune.stage.start_stage` before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PROMPTS = "default"


@dataclass
class VibeArguments:
    """When and how the model answers the vibe prompts during training."""

    vibe_prompts: str | None = field(
        default=None,
        metadata={"help": "Prompt file (YAML list or JSONL, see dbrx_tune/vibes/prompts.py), or 'default' for the "
                          "bundled set; null switches vibe checks off."},
    )
    vibe_steps: int | None = field(
        default=None,
        metadata={"help": "Check every N optimizer steps (PPO: updates); null: at each evaluation and each save. "
                          "Always also before the first step and after the last."},
    )
    vibe_max_new_tokens: int = field(default=64, metadata={"help": "Most tokens generated per answer."})
    vibe_do_sample: bool = field(
        default=False,
        metadata={"help": "Sample answers (the model's generation settings: temperature, top-k, top-p) instead of "
                          "greedy decoding; greedy answers compare step to step."},
    )
    vibe_system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt for prompts whose row names none."}
    )
    vibe_batch_size: int = field(
        default=32,
        metadata={"help": "Prompts generated together (left-padded). Under ZeRO-3 each batch costs one all-gather "
                          "of the weights per token, so the bundled set fits one batch."},
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
