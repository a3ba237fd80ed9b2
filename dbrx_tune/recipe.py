"""YAML recipes -> typed argument dataclasses, with `--key value` overrides and errors that name the key.

A recipe is one flat YAML mapping, in the style of alignment-handbook: every key is named exactly like a field
of TRL's / transformers' argument dataclasses (`ModelConfig`, `ScriptArguments`, `SFTConfig`, ...), of the
few DBRX-specific fields added here, or of the vibe-check keys (`dbrx_tune.args.VibeArguments`, every
stage). A stage script is launched as

    accelerate launch sft/train.py recipes/dbrx_sft.yaml --learning_rate 1e-5 --num_train_epochs 2

Everything is checked before any model or dataset is touched: malformed YAML, unknown keys (with the closest
valid keys suggested), values of the wrong type, and the dataclasses' own validation are all reported with the
recipe path and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from dbrx_tune.args import DataArguments, ModelArguments, RunArguments, VibeArguments

# Fields that TRL's `ModelConfig` / `ScriptArguments` bring but no stage of this toolkit acts on. Accepting them
# would train something other than what the recipe says, so they are refused like unknown keys.
UNUSED_KEYS = {
    "use_dora": "DoRA is not implemented for the DBRX expert LoRA; remove the key",
    "use_rslora": "rank-stabilised LoRA scaling is not implemented for the DBRX expert LoRA; scale lora_alpha instead",
    "lora_modules_to_save": "DBRX chooses trained modules with lora_target_attention / lora_target_experts / "
    "train_router; a reward model's score head is always trained",
    "lora_task_type": "the task type follows the stage (CAUSAL_LM, or SEQ_CLS for reward models)",
    "load_in_8bit": "8-bit loading is not supported; use load_in_4bit (QLoRA with NF4 experts)",
    "bnb_4bit_quant_storage": "4-bit weights are stored as uint8 (NF4 experts and bitsandbytes attention)",
    "dataset_streaming": "datasets are loaded whole so every row is validated before training",
    "ignore_bias_buffers": "no DBRX module has boolean bias buffers for DDP to ignore",
}


class RecipeError(ValueError):
    """A recipe (or a command-line override) is malformed; the message names the file and key."""


class CommandLineValue(str):
    """An override as typed after the recipe path; read as YAML unless its key wants the text itself.

    `--eval_strategy no` must stay the string "no", which YAML would read as false.
    """


@dataclass
class Recipe:
    """A parsed recipe: one instance of each argument dataclass, plus the effective YAML mapping."""

    path: str
    model: ModelArguments
    data: DataArguments
    run: RunArguments
    training: Any
    values: dict[str, Any]
    stage: Any = None
    vibes: VibeArguments = field(default_factory=VibeArguments)  # vibe checks while training (dbrx_tune.evals.vibes)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice (plain PyYAML keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice (lines {seen[key]} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml_mapping(path: str) -> dict[str, Any]:
    """Read a recipe file; any problem is a `RecipeError` naming the file."""
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no Python objects
    except UnicodeDecodeError as err:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the recipe as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: malformed YAML: {err}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of key: value, got {type(values).__name__}")
    for key in values:
        if not isinstance(key, str):
            raise RecipeError(f"{path}: keys must be strings, got {key!r}")
    return values


def parse_overrides(argv: list[str], source: str = "command line") -> dict[str, Any]:
    """Turn `--key value` / `--key=value` / bare `--flag` into a mapping; values are parsed as YAML scalars."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise RecipeError(f"{source}: expected --key value after the recipe path, got {token!r}")
        key, sep, raw = token[2:].partition("=")
        if not sep:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw = argv[i + 1]
                i += 1
            else:
                raw = "true"  # a bare flag
        overrides[key.replace("-", "_")] = CommandLineValue(raw)
        i += 1
    return overrides


def _accepted_types(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _accepted_types(arg)]
    return [annotation]


def _coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Return (ok, value converted to the annotation) for the plain types recipes use."""
    if isinstance(value, CommandLineValue):
        text = str(value)
        try:
            parsed = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            parsed = text
        ok, converted = _coerce(parsed, annotation)
        return (ok, converted) if ok else _coerce(text, annotation)
    if value is None:
        return True, value  # None means "the library's default behaviour"; the dataclass validates further
    for kind in _accepted_types(annotation):
        origin = typing.get_origin(kind) or kind
        if kind is Any or kind is typing.Any:
            return True, value
        if origin is Literal:
            if value in typing.get_args(kind):
                return True, value
            continue
        if isinstance(origin, type) and issubclass(origin, enum.Enum):
            if value in {member.value for member in origin} or isinstance(value, origin):
                return True, value
            continue
        if origin is bool:
            if isinstance(value, bool):
                return True, value
            continue
        if origin is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True, value
            continue
        if origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True, float(value)
            if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
                try:
                    return True, float(value)
                except ValueError:
                    continue
            continue
        if origin is str:
            if isinstance(value, str):
                return True, value
            continue
        if origin in (list, tuple, dict):
            if isinstance(value, origin) or (origin is tuple and isinstance(value, list)):
                return True, value
            continue
        if isinstance(origin, type) and isinstance(value, origin):
            return True, value
    return False, value


def _describe(annotation: Any) -> str:
    names = []
    for kind in _accepted_types(annotation):
        origin = typing.get_origin(kind) or kind
        if origin is Literal:
            names.append(" | ".join(repr(v) for v in typing.get_args(kind)))
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            names.append(" | ".join(repr(m.value) for m in origin))
        else:
            names.append(getattr(origin, "__name__", str(origin)))
    return " or ".join(dict.fromkeys(names))


def _fields_by_class(classes: list[type]) -> dict[type, dict[str, Any]]:
    fields = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        fields[cls] = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}
    return fields


def parse_recipe(argv: list[str], training_class: type, extra_class: type | None = None) -> Recipe:
    """Parse `RECIPE.yaml [--key value ...]` into a `Recipe` for a stage whose trainer takes `training_class`.

    `extra_class` is an optional stage-specific dataclass (e.g. the PPO reward-model keys).
    """
    if not argv or argv[0].startswith("--"):
        raise RecipeError("usage: <stage script> RECIPE.yaml [--key value ...]: the recipe path comes first")
    path = argv[0]
    values = load_yaml_mapping(path)
    values.update(parse_overrides(argv[1:], source=f"{path} (command-line overrides)"))
    # `resume_from_checkpoint: true` means "the latest checkpoint in output_dir" (transformers types it as str).
    if values.get("resume_from_checkpoint") is True:
        values["resume_from_checkpoint"] = "latest"
    elif values.get("resume_from_checkpoint") is False:
        values["resume_from_checkpoint"] = None

    classes = [ModelArguments, DataArguments, RunArguments, VibeArguments, training_class] + (
        [extra_class] if extra_class else []
    )
    fields = _fields_by_class(classes)
    known = {name for class_fields in fields.values() for name in class_fields} - set(UNUSED_KEYS)
    unknown = sorted(set(values) - known)
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            what = (
                f"key {key!r} is not used by this toolkit: {UNUSED_KEYS[key]}"
                if key in UNUSED_KEYS
                else (f"unknown key {key!r}")
            )
            lines.append(what + hint)
        raise RecipeError(f"{path}: " + "; ".join(lines))

    kwargs: dict[type, dict[str, Any]] = {cls: {} for cls in classes}
    for key, value in values.items():
        for cls, class_fields in fields.items():
            if key not in class_fields:
                continue
            ok, converted = _coerce(value, class_fields[key])
            if not ok:
                hint = " (YAML reads yes/no/on/off as booleans: quote the value)" if isinstance(value, bool) else ""
                raise RecipeError(
                    f"{path}: key {key!r} expects {_describe(class_fields[key])}, "
                    f"got {type(value).__name__} {value!r}{hint}"
                )
            kwargs[cls][key] = converted

    instances = {}
    for cls in classes:
        try:
            instances[cls] = cls(**kwargs[cls])
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{path}: invalid {cls.__name__}: {err}") from err
    check_values(path, instances[ModelArguments], instances[training_class])
    return Recipe(
        path=path,
        model=instances[ModelArguments],
        data=instances[DataArguments],
        run=instances[RunArguments],
        training=instances[training_class],
        values=values,
        stage=instances[extra_class] if extra_class else None,
        vibes=instances[VibeArguments],
    )


def check_values(path: str, model: ModelArguments, training: Any) -> None:
    """Refuse values that would fail (or silently do nothing) only after the model has loaded: one line, the key."""
    problems = []

    def positive(obj: Any, key: str) -> None:
        value = getattr(obj, key, None)
        if value is not None and value < 1:
            problems.append(f"{key} must be at least 1, got {value}")

    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        positive(training, key)
    if getattr(training, "learning_rate", 0) < 0:
        problems.append(f"learning_rate must not be negative, got {training.learning_rate}")
    if getattr(training, "max_steps", -1) == 0 or (
        getattr(training, "max_steps", -1) < 0 and getattr(training, "num_train_epochs", 1) <= 0
    ):
        problems.append(
            f"no training steps (num_train_epochs {getattr(training, 'num_train_epochs', None)}, "
            f"max_steps {getattr(training, 'max_steps', None)}): set num_train_epochs > 0 or max_steps > 0"
        )
    for key in ("max_length", "max_prompt_length", "max_completion_length"):
        value = getattr(training, key, None)
        if value is not None and value <= 0:
            problems.append(f"{key} must be positive, got {value}")
    if model.use_peft:
        positive(model, "lora_r")
        if model.lora_alpha is not None and model.lora_alpha <= 0:
            problems.append(f"lora_alpha must be positive, got {model.lora_alpha}")
    report_to = getattr(training, "report_to", None) or []
    missing = [name for name in report_to if name not in ("none", "all") and name not in _installed_reporters()]
    if missing:
        problems.append(
            f"report_to {missing}: not installed here (installed: {_installed_reporters() or 'none'}); install it "
            "or set report_to: none"
        )
    if model.load_in_4bit and not model.use_peft:
        problems.append("load_in_4bit freezes the base weights: set use_peft: true (QLoRA)")
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems))


def _installed_reporters() -> list[str]:
    from transformers.integrations import get_available_reporting_integrations

    return get_available_reporting_integrations()
