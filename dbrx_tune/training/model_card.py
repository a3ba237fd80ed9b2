"""The model card (`README.md`) of every directory the toolkit writes a model to: stage outputs and merged models.

One card per directory, built from what the run left there (`dbrx_tune_run.json`, `recipe.yaml`,
`train_results.json`, `trainer_state.json`), so `dbrx-merge` builds the merged model's card from the adapter's run
the same way a stage builds its own. The front matter is `huggingface_hub.ModelCardData` (what the hub reads:
base model, library, tags, datasets, license, pipeline); the body says what was trained on what, how it ended and
how to load it, because several outputs cannot be loaded by a stock tool without being told (reward models, DBRX
expert adapters).

TRL's trainers write their own `README.md` at every intermediate save; theirs names no base model for a local path
and shows text-generation usage for a reward model, so the stage trainers switch it off
(`dbrx_tune.training.trainers`) and this card replaces it. A `README.md` that is not a card of this toolkit is never
overwritten (`may_write_card`): with `overwrite_output_dir` a run writes beside foreign files.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from dbrx_tune.args import DataArguments
from dbrx_tune.training.output_dir import RUN_MARKER, TRAINER_STATE

CARD_NAME = "README.md"
TOOLKIT_TAG = "dbrx-tune"
RESULTS_FILE = "train_results.json"  # what `Trainer.save_metrics("train", ...)` writes

STAGE_TAGS = {"reward_model": "reward-model"}
"""Hub tag of a stage whose name is not already one (the others are tagged with their name: sft, dpo, ...)."""

STAGE_NAMES = {
    "sft": "SFT",
    "reward_model": "reward-model",
    "dpo": "DPO",
    "orpo": "ORPO",
    "ppo": "PPO",
    "grpo": "GRPO",
    "rloo": "RLOO",
}
"""How the card's text names each stage."""

STAGE_SCRIPTS = {"sft": "sft/train.py", "reward_model": "reward_models/train.py"}
"""The script that runs each stage (the others: rlhf/<stage>.py)."""

HEADLINE_METRICS = {
    "sft": ("train_loss", "eval_loss", "eval_mean_token_accuracy"),
    "reward_model": ("train_loss", "eval_loss", "eval_accuracy", "eval_margin"),
    "dpo": ("train_loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "rewards/margins"),
    "orpo": ("train_loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "rewards/margins"),
    "ppo": ("objective/scores", "objective/rlhf_reward", "objective/kl", "loss/policy_avg", "loss/value_avg"),
    "grpo": ("train_loss", "reward", "reward_std", "kl"),
    "rloo": ("train_loss", "reward", "reward_std", "kl"),
}
"""The metrics a reader of each stage's card looks for first, from the final metrics or the last training log."""

LICENSES = {
    "databricks/dbrx-": {
        "license": "other",
        "license_name": "databricks-open-model-license",
        "license_link": "https://www.databricks.com/legal/open-model-license",
    },
    "meta-llama/llama-2-": {"license": "llama2"},
}
"""Licences of the hub bases the recipes start from (by hub-id prefix, lower case); a local base's card says its own."""

LICENSE_KEYS = ("license", "license_name", "license_link")


def read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_toolkit_card(path: str) -> bool:
    """Whether `path` is a model card this toolkit wrote (tagged `dbrx-tune`)."""
    try:
        tags = ModelCard.load(path).data.tags or []
    except (OSError, ValueError, yaml.YAMLError):  # not a card (unreadable, bad front matter): someone else's
        return False
    return TOOLKIT_TAG in tags


def may_write_card(output_dir: str) -> bool:
    """Whether a card may be written to `output_dir`: no README.md there yet, or one this toolkit wrote.

    Call it before anything saves into the directory (PEFT's `save_pretrained` writes a template README.md)."""
    path = os.path.join(output_dir, CARD_NAME)
    return not os.path.exists(path) or is_toolkit_card(path)


def base_lineage(model_name_or_path: str) -> tuple[str | None, dict[str, str]]:
    """The hub base model and licence fields for the front matter.

    A hub id is its own base. A local directory is no hub reference: its own toolkit card's base model and licence
    are carried on (a DPO run on a local SFT output traces back to databricks/dbrx-base), else there is none."""
    if not model_name_or_path:
        return None, {}
    if os.path.isdir(model_name_or_path):
        card_path = os.path.join(model_name_or_path, CARD_NAME)
        if not is_toolkit_card(card_path):
            return None, {}
        data = ModelCard.load(card_path).data
        return data.base_model, {key: data.get(key) for key in LICENSE_KEYS if data.get(key)}
    for prefix, license_fields in LICENSES.items():
        if model_name_or_path.lower().startswith(prefix):
            return model_name_or_path, dict(license_fields)
    return model_name_or_path, {}


def _data_default(name: str) -> Any:
    return next(field.default for field in fields(DataArguments) if field.name == name)


def read_recipe(run_dir: str) -> dict[str, Any]:
    """The run's `recipe.yaml` ({} for a directory no stage of this toolkit wrote, e.g. an adapter from elsewhere)."""
    path = os.path.join(run_dir, "recipe.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def training_data(recipe: dict[str, Any], evaluated: bool) -> list[tuple[str, str]]:
    """(dataset, split) pairs the run read: the train split and, when it was evaluated, the test split."""
    train_name = recipe.get("dataset_name")
    if not train_name:
        return []
    used = [(train_name, recipe.get("dataset_train_split", _data_default("dataset_train_split")))]
    if evaluated:
        eval_name = recipe.get("eval_dataset_name") or train_name
        used.append((eval_name, recipe.get("dataset_test_split", _data_default("dataset_test_split"))))
    return used


def is_hub_dataset(name: str) -> bool:
    return "://" not in name and not os.path.exists(name) and name.count("/") == 1


def last_training_log(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last per-step training log (not an evaluation, not the end-of-training summary)."""
    for entry in reversed(log_history):
        if "train_runtime" not in entry and not any(key.startswith("eval_") for key in entry):
            return entry
    return {}


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: dict[str, Any]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| `{key}` | {_format(value)} |" for key, value in rows.items() if isinstance(value, (int, float))]
    return "\n".join(lines)


def how_to_load(stage: str, adapter: bool, dbrx: bool, base: str, merged: bool) -> str:
    """The loading instructions for this kind of output, in markdown."""
    if stage == "reward_model" and adapter:
        return (
            "This directory holds a LoRA adapter on a 4-bit (QLoRA) reward model in `adapter/`; it is not merged "
            "(the base stays quantized). Load it on the toolkit's reward model:\n\n```python\n"
            "from dbrx_tune.modeling.config import load_dbrx_config\n"
            "from dbrx_tune.modeling.experts import set_experts_implementation\n"
            "from dbrx_tune.modeling.lora import load_expert_adapter\n"
            "from dbrx_tune.modeling.seq_cls import DbrxForSequenceClassification\n\n"
            f'config = load_dbrx_config("{base}", num_labels=1)\n'
            f'model = DbrxForSequenceClassification.from_pretrained("{base}", config=config)\n'
            'model = load_expert_adapter(set_experts_implementation(model, "grouped"), "PATH/adapter")\n```'
        )
    if stage == "reward_model":
        return (
            "A reward model: one scalar score per sequence, read at its last real token. transformers has no DBRX "
            "sequence-classification head, so the modeling file is saved beside the weights and loading needs "
            "`trust_remote_code=True` (or `import dbrx_tune` first, which registers the class and runs no remote "
            "code):\n\n```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            'model = AutoModelForSequenceClassification.from_pretrained("PATH", trust_remote_code=True)\n'
            'tokenizer = AutoTokenizer.from_pretrained("PATH")\n```\n\n'
            "Score a conversation: `ids = tokenizer.apply_chat_template(messages, return_tensors='pt', "
            "return_dict=True)`, then `model(**ids).logits[0, 0]`. `rlhf/ppo.py`, `rlhf/grpo.py` "
            "(`reward_model_path`) and `dbrx-rewardbench --model PATH` load it as is."
        )
    if adapter:
        if not dbrx:
            return (
                "A PEFT LoRA adapter:\n\n```python\nfrom peft import PeftModel\n"
                "from transformers import AutoModelForCausalLM\n\n"
                f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "PATH")\n```'
            )
        return (
            "A PEFT LoRA adapter with one LoRA per DBRX expert (`target_parameters` on the 3D expert weights): load "
            "it on the base with the toolkit's loader, which swaps in the grouped experts the adapter targets and "
            "checks every tensor's shape:\n\n```python\nfrom transformers import DbrxForCausalLM\n"
            "from dbrx_tune.modeling.config import load_dbrx_config\n"
            "from dbrx_tune.modeling.experts import set_experts_implementation\n"
            "from dbrx_tune.modeling.lora import load_expert_adapter\n\n"
            f'base = DbrxForCausalLM.from_pretrained("{base}", config=load_dbrx_config("{base}"))\n'
            'model = load_expert_adapter(set_experts_implementation(base, "grouped"), "PATH")\n```\n\n'
            "For serving (vLLM, TGI, SGLang) merge it into a plain checkpoint first:\n\n"
            f"```\ndbrx-merge --base {base} --adapter PATH --output MERGED_DIR\n```"
        )
    text = (
        "A plain Hugging Face checkpoint (safetensors, config, tokenizer with its chat template, generation config); "
        "stock transformers loads it, without this package:\n\n```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\ntokenizer = AutoTokenizer.from_pretrained("PATH")\n```'
    )
    if merged:
        text += "\n\nServing engines that load DBRX checkpoints (vLLM, TGI, SGLang) take it as is."
    if stage == "ppo":
        text += "\n\nThe trained value model is in `value_model/` (not needed to generate)."
    return text


def build_model_card(
    run_dir: str, *, dbrx: bool, merged_base: str | None = None, output_dir: str | None = None, title: str | None = None
) -> ModelCard:
    """The card of the model a run wrote to `run_dir` (or, with `merged_base`, of its adapter merged into that base).

    Reads the run's marker, recipe, final metrics and trainer state from `run_dir`; `output_dir` (default `run_dir`)
    is where the model files are, to tell a full model from an adapter; `title` defaults to its name."""
    output_dir = output_dir or run_dir
    marker = read_json(os.path.join(run_dir, RUN_MARKER)) or {}
    stage = marker.get("stage", "unknown")
    recipe = read_recipe(run_dir)
    metrics = read_json(os.path.join(run_dir, RESULTS_FILE)) or {}
    last_log = last_training_log((read_json(os.path.join(run_dir, TRAINER_STATE)) or {}).get("log_history", []))
    adapter = merged_base is None and (
        os.path.isfile(os.path.join(output_dir, "adapter_config.json"))
        or (stage == "reward_model" and not os.path.isfile(os.path.join(output_dir, "config.json")))
    )
    started_from = merged_base or recipe.get("model_name_or_path", "")
    base_model, license_fields = base_lineage(started_from)
    data = training_data(recipe, evaluated=any(key.startswith("eval_") for key in metrics))
    stage_tag = STAGE_TAGS.get(stage, stage)
    flags = [
        ("dbrx", dbrx),
        (stage_tag, stage in STAGE_NAMES),
        ("lora", recipe.get("use_peft")),
        ("qlora", recipe.get("load_in_4bit")),
    ]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft" if adapter else "transformers",
        tags=[TOOLKIT_TAG, *(tag for tag, on in flags if on), *(["merged"] if merged_base else [])],
        datasets=sorted({name for name, _ in data if name and is_hub_dataset(name)}) or None,
        pipeline_tag="text-classification" if stage == "reward_model" else "text-generation",
        **license_fields,
    )
    kind = "LoRA adapter" if adapter else "reward model" if stage == "reward_model" else "model"
    origin = f"`{started_from}`"
    if recipe.get("random_init") and not merged_base:
        origin += " (random-init from its config.json: no pretrained weights)"
    if base_model and base_model != started_from:
        origin += f", itself fine-tuned from [{base_model}](https://huggingface.co/{base_model})"
    sections = [
        f"# {title or os.path.basename(os.path.abspath(output_dir))}",
        intro(stage, kind, dbrx),
        f"## Base model\n\n{origin}",
    ]
    if merged_base:
        sections.append(
            f"## Merge\n\nThe LoRA adapter `{os.path.abspath(run_dir)}` folded into `{merged_base}` by `dbrx-merge` "
            "(logits checked against the adapter model's before writing); the recipe, data and metrics below are "
            "the adapter's run."
        )
    sections += [
        recipe_section(marker.get("recipe"), recipe),
        data_section(recipe, data),
        results_section(stage, metrics, last_log),
        "## How to load\n\n`PATH` below is this directory, or its hub id once uploaded.\n\n"
        + how_to_load(stage, adapter, dbrx, started_from, bool(merged_base)),
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def intro(stage: str, kind: str, dbrx: bool) -> str:
    model = f"A {'DBRX ' if dbrx else ''}{kind}"
    if stage not in STAGE_NAMES:  # dbrx-merge of an adapter no run of ours wrote
        return f"{model}: a LoRA adapter merged into its base by `dbrx-merge` (the adapter's training is not recorded)."
    script = STAGE_SCRIPTS.get(stage, f"rlhf/{stage}.py")
    return f"{model} trained by the {STAGE_NAMES[stage]} stage of dbrx-tune (`{script}`)."


def recipe_section(recipe_path: str | None, recipe: dict[str, Any]) -> str:
    if not recipe:
        return "## Recipe\n\nNot recorded: the directory holds no `recipe.yaml` of a dbrx-tune run."
    source = f"`{recipe_path}` with its command-line overrides" if recipe_path else "The recipe"
    body = yaml.safe_dump(recipe, sort_keys=False).rstrip()
    return f"## Recipe\n\n{source}, as run (also saved as `recipe.yaml`):\n\n```yaml\n{body}\n```"


def data_section(recipe: dict[str, Any], data: list[tuple[str, str]]) -> str:
    """The datasets and splits read, and for the online stages (PPO, GRPO, RLOO) what scored the completions."""
    lines = [f"- `{name}`, split `{split}`" for name, split in data]
    rewards = [f"`{recipe[key]}`" for key in ("reward_model_path", "reward_function") if recipe.get(key)]
    if rewards:
        lines.append(f"- rewards: {', '.join(rewards)}")
    return "## Training data\n\n" + ("\n".join(lines) or "Not recorded (no recipe.yaml).")


def results_section(stage: str, metrics: dict[str, Any], last_log: dict[str, Any]) -> str:
    """The stage's headline metrics, then every final metric and the last training log (folded)."""
    headline = {key: metrics.get(key, last_log.get(key)) for key in HEADLINE_METRICS.get(stage, ())}
    headline = {key: value for key, value in headline.items() if value is not None}
    parts = ["## Results"]
    if not metrics and not last_log:
        return "## Results\n\nNot recorded: the directory holds no metrics of a dbrx-tune run."
    if headline:
        parts.append(_table(headline))
    parts.append("<details><summary>All final metrics and the last training log</summary>")
    parts.append(_table(metrics))
    if last_log:
        parts += [f"Last training log (step {last_log.get('step')}):", _table(last_log)]
    parts.append("</details>")
    return "\n\n".join(parts)


def write_model_card(card: ModelCard, output_dir: str) -> str:
    """Save `card` as `output_dir/README.md` and return its path."""
    path = os.path.join(output_dir, CARD_NAME)
    card.save(path)
    return path
