"""The life cycle every stage script shares: parse and check, build, train, save.

Stage scripts (`sft/train.py`, `reward_models/train.py`, `rlhf/*.py`) stay a page long by calling these in order;
the TRL trainers and the toolkit's PPO trainer go through the same `train_and_save`.
Everything that can be checked without a model (recipe, output directory, vibe prompt file, dataset schema and
lengths) is checked by `start_stage` / `load_stage_datasets` before any weights are loaded. `train_and_save`
attaches the recipe's vibe checks (`dbrx_tune.evals.vibes`) to the trainer, so every generating stage gets them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable

import datasets
import transformers
import yaml
from peft import PeftModel
from transformers import PretrainedConfig, PreTrainedTokenizerBase, Trainer, set_seed
from trl import RewardConfig

from dbrx_tune.build import check_experts_precision, is_dbrx, load_model_config
from dbrx_tune.data import load_splits
from dbrx_tune.data.validation import (
    check_assistant_only_loss,
    check_lengths,
    validate_preference_dataset,
    validate_prompt_dataset,
    validate_sft_dataset,
)
from dbrx_tune.evals.vibes.callback import VibeCallback
from dbrx_tune.evals.vibes.check import VibeChecker
from dbrx_tune.evals.vibes.prompts import load_vibe_prompts
from dbrx_tune.modeling.lora import base_model_copy
from dbrx_tune.modeling.weight_files import check_weight_files
from dbrx_tune.parallel.launch import ParallelConfigError, check_parallel_config, deepspeed_config
from dbrx_tune.parallel.zero3 import expert_parallel_size, zero_stage
from dbrx_tune.recipe import Recipe, RecipeError, parse_recipe
from dbrx_tune.tokenizer import load_tokenizer
from dbrx_tune.training.disk_space import check_free_space, checkpoint_bytes, naming_a_full_disk, parameter_shapes
from dbrx_tune.training.manifest import ManifestCallback
from dbrx_tune.training.model_card import build_model_card, may_write_card, write_model_card
from dbrx_tune.training.offload import check_long_context_settings
from dbrx_tune.training.output_dir import OutputDirError, check_output_dir, mark_output_dir, resolve_resume_checkpoint
from dbrx_tune.training.sequence_parallel import check_sequence_parallel

logger = logging.getLogger("dbrx_tune")

RANDOM_BASE_DIR = "base"  # OUTPUT_DIR/base: the random-init base of a LoRA run (`save_random_init_base`)

VALIDATORS = {
    "sft": validate_sft_dataset,
    "preference": validate_preference_dataset,
    "prompt": validate_prompt_dataset,
}


def setup_logging(main_process: bool) -> None:
    """INFO on the main process, WARNING elsewhere, for us and the libraries we drive."""
    level = logging.INFO if main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)


def start_stage(argv: list[str] | None, training_class: type, stage_class: type | None = None) -> Recipe:
    """Parse the recipe, check the output directory, the model config and the parallel settings.

    Exits with a one-line message naming the file and key on bad input, before anything is loaded or written.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        recipe = parse_recipe(argv, training_class, stage_class)
    except RecipeError as err:
        raise SystemExit(f"error: {err}") from None
    args = recipe.training
    setup_logging(args.process_index == 0)
    # Seed before anything is built: a random-init model (tiny recipes, benchmarks) gets the same weights on every
    # run of the recipe; the trainers only seed later, in their constructors.
    set_seed(args.seed)
    try:
        check_output_dir(
            args.output_dir, overwrite=recipe.run.overwrite_output_dir, resume=bool(args.resume_from_checkpoint)
        )
        # resolved and checked against its manifest once, here, before anything unpickles it; train_and_save
        # resumes from this path
        args.resume_from_checkpoint = resolve_resume_checkpoint(
            args.output_dir, args.resume_from_checkpoint, trust=recipe.run.trust_checkpoint
        )
        config = load_model_config(recipe.model)
        shapes = parameter_shapes(config)
        check_free_space(args.output_dir, checkpoint_bytes(shapes, recipe.model, deepspeed=bool(args.deepspeed)))
        if not recipe.model.random_init:
            check_weight_files(recipe.model.model_name_or_path)
        if args.resume_from_checkpoint is not None:
            check_weight_files(args.resume_from_checkpoint)
        check_experts_precision(recipe.model, args.deepspeed)
        if args.deepspeed:
            check_parallelism(recipe, config)
        check_long_context_settings(recipe, config)
        check_sequence_parallel(recipe, config, training_class)
        check_vibe_settings(recipe, training_class)
        check_random_init_adapter(recipe)
    except (OutputDirError, ParallelConfigError, OSError, ValueError) as err:
        raise SystemExit(f"error: {recipe.path}: {err}") from None
    return recipe


def check_random_init_adapter(recipe: Recipe) -> None:
    """Refuse LoRA on a random-init model under ZeRO-3: its base is saved beside the adapter from whole weights
    (`save_random_init_base`), and ZeRO-3 partitions them at construction."""
    model_args, ds_config = recipe.model, recipe.training.deepspeed
    if not (model_args.random_init and model_args.use_peft and ds_config):
        return
    if zero_stage(deepspeed_config(ds_config)) == 3:
        raise ValueError(
            "random_init with use_peft under ZeRO-3: the random base weights, saved beside the adapter so that it can "
            "be loaded and merged, are partitioned; use ZeRO stage 0-2, or train from a saved base checkpoint"
        )


def save_random_init_base(trainer: Trainer, recipe: Recipe) -> None:
    """Write the base of a LoRA run on a random-init model to OUTPUT_DIR/base and point the adapters at it.

    Without it the adapter's `base_model_name_or_path` is the config-only directory the model was built from, and
    loading or merging the adapter (`python -m dbrx_tune.tools.merge --base OUTPUT_DIR/base --adapter OUTPUT_DIR`)
    has no weights to start from. It is written before training (LoRA freezes the base), so every `checkpoint-N`
    adapter points at it too; with 4-bit experts it holds their dequantized values, the weights the adapter trained on.
    """
    if not recipe.model.random_init:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not isinstance(model, PeftModel):
        return
    base_dir = os.path.abspath(os.path.join(trainer.args.output_dir, RANDOM_BASE_DIR))
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_dir
    if trainer.is_world_process_zero():
        base = base_model_copy(model)
        base.config.output_router_logits = False
        base.save_pretrained(base_dir)
        logger.info("random-init base saved to %s (the adapters' base_model_name_or_path)", base_dir)


def check_vibe_settings(recipe: Recipe, training_class: type) -> None:
    """Refuse vibe checks for a stage that cannot generate, and a prompt file with a bad row (named)."""
    if not recipe.vibes.enabled:
        return
    if issubclass(training_class, RewardConfig):
        raise ValueError("vibe_prompts: a reward model does not generate text; remove vibe_prompts from this recipe")
    load_vibe_prompts(recipe.vibes.vibe_prompts)


def build_vibe_checker(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, stage: str) -> VibeChecker | None:
    """The recipe's vibe checker for a run of `stage` ("sft", "dpo", ...), or None when vibe checks are off."""
    if not recipe.vibes.enabled:
        return None
    return VibeChecker(
        load_vibe_prompts(recipe.vibes.vibe_prompts),
        tokenizer,
        recipe.vibes,
        output_dir=recipe.training.output_dir,
        stage=stage,
    )


def add_vibe_checks(trainer: Trainer, recipe: Recipe, stage: str) -> None:
    """Attach the recipe's vibe checks to a transformers/TRL trainer (nothing when `vibe_prompts` is unset)."""
    checker = build_vibe_checker(recipe, trainer.processing_class, stage)
    if checker is not None:
        trainer.add_callback(VibeCallback(trainer, checker, recipe.vibes.vibe_steps))


def check_parallelism(recipe: Recipe, config: PretrainedConfig) -> None:
    """Refuse DeepSpeed / expert-parallel settings that cannot run on this launch, before any weights load."""
    ds_config = recipe.training.deepspeed
    source = ds_config if isinstance(ds_config, str) else "deepspeed"
    ds_config = deepspeed_config(ds_config)
    model_args = recipe.model
    if not is_dbrx(config):
        if expert_parallel_size(ds_config) > 1:
            raise ParallelConfigError(
                f"{source}: expert_parallel needs a mixture-of-experts model, not {config.model_type}"
            )
        return
    check_parallel_config(
        ds_config,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        num_experts=config.ffn_config.moe_num_experts,
        experts_implementation=model_args.experts_implementation,
        use_peft=model_args.use_peft,
        load_in_4bit=model_args.load_in_4bit,
        source=source,
    )


def load_stage_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The tokenizer shipped with the model, else the offline DBRX tokenizer."""
    model_args = recipe.model
    return load_tokenizer(
        model_args.model_name_or_path,
        tokenizer_name_or_path=model_args.tokenizer_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )


def load_stage_datasets(
    recipe: Recipe, kind: str, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
) -> datasets.DatasetDict:
    """Load train/test splits and validate them for a stage of `kind` ("sft", "preference" or "prompt").

    Every prompt must leave room for a completion under `max_length`, and with the recipe's `truncation: false`
    every whole row must fit; errors name the file and row.
    """
    data = recipe.data
    if not data.dataset_name:
        raise SystemExit(f"error: {recipe.path}: dataset_name is required")
    try:
        return _load_and_validate(recipe, kind, tokenizer, max_length)
    except (OSError, ValueError) as err:  # missing files, schema and length errors name the file and row
        raise SystemExit(f"error: {recipe.path}: {err}") from None


def _load_and_validate(
    recipe: Recipe, kind: str, tokenizer: PreTrainedTokenizerBase, max_length: int | None
) -> datasets.DatasetDict:
    data = recipe.data
    splits = load_splits(
        data.dataset_name,
        config=data.dataset_config,
        train_split=data.dataset_train_split,
        test_split=data.dataset_test_split,
        eval_dataset_name=data.eval_dataset_name,
        require_test=recipe.training.eval_strategy != "no",
        max_train_samples=data.max_train_samples,
        max_eval_samples=data.max_eval_samples,
        seed=recipe.training.seed,
    )
    for split, dataset in splits.items():
        source = (
            f"{data.eval_dataset_name if split != 'train' and data.eval_dataset_name else data.dataset_name} [{split}]"
        )
        VALIDATORS[kind](dataset, source)
        if kind == "sft" and getattr(recipe.training, "assistant_only_loss", False):
            check_assistant_only_loss(dataset, source)
        if max_length is not None:
            check_lengths(dataset, tokenizer, max_length, source, allow_truncation=data.truncation)
    return splits


def train_and_save(
    trainer: Trainer, recipe: Recipe, stage: str, save_model: Callable[[Trainer, str], None] | None = None
) -> dict:
    """Train (resuming from the checkpoint `start_stage` resolved and checked) with the recipe's vibe checks and a
    sha256 manifest written into each checkpoint, then save a plain HF checkpoint (or adapter, with a random-init base
    beside it), the resolved recipe, the metrics and the model card (`README.md`, unless a README.md of someone
    else's is already there).

    `save_model(trainer, output_dir)` replaces the default `trainer.save_model(output_dir)` (the stage trainers of
    `dbrx_tune.training.trainers` write DBRX's original names and layout also from ZeRO-3 or expert-parallel training).
    """
    args = trainer.args
    card_allowed = may_write_card(args.output_dir)  # asked before PEFT's save writes its template README.md
    if trainer.is_world_process_zero():
        mark_output_dir(args.output_dir, stage, recipe.path)
    save_random_init_base(trainer, recipe)
    add_vibe_checks(trainer, recipe, stage)
    trainer.add_callback(ManifestCallback())
    with naming_a_full_disk(args.output_dir):  # checkpoints during training and the final save
        result = trainer.train(resume_from_checkpoint=recipe.training.resume_from_checkpoint)  # start_stage's pick
        metrics = dict(result.metrics)
        if trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())
        # TRL switches router logits on for training; a saved model must generate without computing the loss
        # (PPO's policy-and-value module has no config: it asks for router logits per forward)
        trained = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(trained, "config"):
            trained.config.output_router_logits = False
        if save_model is not None:
            save_model(trainer, args.output_dir)
        else:
            trainer.save_model(args.output_dir)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if trainer.is_world_process_zero():
        processing_class = trainer.processing_class
        if processing_class is not None:
            processing_class.save_pretrained(args.output_dir)
        save_recipe(recipe, args.output_dir)
        if card_allowed:
            write_model_card(
                build_model_card(args.output_dir, dbrx=is_dbrx(load_model_config(recipe.model))), args.output_dir
            )
        else:
            logger.warning("%s/README.md was not written by dbrx_tune: left as is, no model card", args.output_dir)
        logger.info("saved %s model, tokenizer, recipe, metrics and model card to %s", stage, args.output_dir)
    for tracker in trainer.accelerator.trackers:  # trainers logging through accelerate (PPO): flush and close
        tracker.finish()
    return metrics


def save_recipe(recipe: Recipe, output_dir: str) -> None:
    """Write the effective recipe (file values plus overrides) as `recipe.yaml`, re-runnable as is."""
    values = json.loads(json.dumps(recipe.values, default=str))  # enums and paths as plain strings
    with open(os.path.join(output_dir, "recipe.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(values, handle, sort_keys=False)
