"""Where PPO's scores come from: a frozen reward model, or a rule (tests and demos).

A reward model is only trusted with text it can read: when its tokenizer (vocabulary or chat template) differs
from the policy's, completions are decoded and re-rendered with the reward model's own tokenizer and template
instead of feeding it the policy's token ids, which would score garbage without any error. A checkpoint that is
not a one-output sequence-classification model (a causal LM, say, whose head transformers would silently
initialise at random) is refused before anything is loaded onto a device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, DbrxConfig, PreTrainedModel, PreTrainedTokenizerBase

from dbrx_tune.modeling.loading import finish_model, load_pretrained, require_trained_reward_weights, resolve_dtype
from dbrx_tune.modeling.config import fix_rope_parameters
from dbrx_tune.modeling.moe_loss import sync_moe_config
from dbrx_tune.modeling.seq_cls import DbrxForSequenceClassification
from dbrx_tune.recipe import ModelArguments
from dbrx_tune.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class RewardModelError(ValueError):
    """The reward model (or rule) named by the recipe cannot be used; the message names it and says why."""


@dataclasses.dataclass
class ScoringBatch:
    """One rollout batch as a reward sees it.

    `query_ids` (batch, prompt_len) is left-padded with `query_mask`; `response_ids` (batch, response_length) runs
    up to and including the stop token, `response_mask` marks those tokens. `prompts` are the dataset's prompt
    values (text or messages), `completions` the decoded responses without the stop token, `rows` the other
    columns of each dataset row (e.g. a gold `answer`).
    """

    query_ids: torch.LongTensor
    query_mask: torch.Tensor
    response_ids: torch.LongTensor
    response_mask: torch.Tensor
    prompts: list[Any]
    completions: list[str]
    rows: list[dict[str, Any]]


class RewardFunction(Protocol):
    """Anything that maps a rollout batch to one float score per completion, shape (batch,), on CPU."""

    def __call__(self, batch: ScoringBatch) -> torch.Tensor: ...


# ------------------------------------------------------------------ rule rewards


def contains_answer(completions: list[str], rows: list[dict[str, Any]], argument: str | None) -> list[float]:
    """`rule:contains_answer`: 1 when the row's gold `answer` occurs in the completion (case-insensitive), else 0."""
    scores = []
    for index, (completion, row) in enumerate(zip(completions, rows)):
        answer = row.get("answer")
        if not isinstance(answer, str) or not answer:
            raise RewardModelError(f"rule:contains_answer needs a non-empty string 'answer' column; row {index} has {answer!r}")
        scores.append(float(answer.lower() in completion.lower()))
    return scores


def contains_word(completions: list[str], rows: list[dict[str, Any]], argument: str | None) -> list[float]:
    """`rule:contains:WORD`: 1 when WORD occurs in the completion (case-insensitive), else 0."""
    if not argument:
        raise RewardModelError("reward_function: rule:contains needs a word, e.g. rule:contains:blue")
    return [float(argument.lower() in completion.lower()) for completion in completions]


RULES: dict[str, Callable[[list[str], list[dict[str, Any]], str | None], list[float]]] = {
    "contains_answer": contains_answer,
    "contains": contains_word,
}


@dataclasses.dataclass
class RuleReward:
    """A reward computed from the completion text (and the row's other columns) by a named rule."""

    name: str
    argument: str | None = None

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise RewardModelError(f"reward_function: unknown rule {self.name!r}; known: {', '.join(f'rule:{r}' for r in RULES)}")

    def __call__(self, batch: ScoringBatch) -> torch.Tensor:
        return torch.tensor(RULES[self.name](batch.completions, batch.rows, self.argument), dtype=torch.float32)


def parse_reward_function(spec: str) -> RuleReward:
    """`rule:NAME` or `rule:NAME:ARGUMENT` -> that rule reward."""
    kind, _, rest = spec.partition(":")
    name, _, argument = rest.partition(":")
    if kind != "rule" or not name:
        raise RewardModelError(f"reward_function: expected 'rule:NAME' (e.g. rule:contains_answer), got {spec!r}")
    return RuleReward(name, argument or None)


# ------------------------------------------------------------------ reward models


def check_reward_checkpoint(path: str) -> AutoConfig:
    """Refuse, from its config alone, a checkpoint that is not a one-output sequence-classification model."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise RewardModelError(f"reward_model_path {path!r}: cannot read its config.json ({str(err).splitlines()[0]})") from err
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise RewardModelError(
            f"reward_model_path {path!r} is not a reward model: its architectures are {architectures or 'unset'}, "
            "expected a *ForSequenceClassification with one output. Train one with reward_models/train.py (a "
            "causal-LM checkpoint such as an SFT policy belongs in model_name_or_path or value_model_path)."
        )
    if config.num_labels != 1:
        raise RewardModelError(f"reward_model_path {path!r}: num_labels is {config.num_labels}; a reward model has 1")
    return config


def load_reward_model(path: str, model_args: ModelArguments) -> PreTrainedModel:
    """The frozen reward model at `path`, in eval mode; a missing or untrained score head is an error."""
    config = check_reward_checkpoint(path)
    if isinstance(config, DbrxConfig):
        fix_rope_parameters(config)
        rm_args = dataclasses.replace(model_args, model_name_or_path=path, random_init=False, use_peft=False)
        model, info = load_pretrained(DbrxForSequenceClassification, rm_args, sync_moe_config(config),
                                      output_loading_info=True)
        model = finish_model(model, rm_args)
    else:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=resolve_dtype(model_args.dtype), use_safetensors=True, output_loading_info=True
        )
    try:
        require_trained_reward_weights(path, model, info, hint="Train one with reward_models/train.py.")
    except ValueError as err:
        raise RewardModelError(f"reward_model_path: {err}") from None
    model.requires_grad_(False)
    return model.eval()


def tokenizers_match(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether token ids (and chat-rendered text) mean the same to both tokenizers."""
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template and a.pad_token_id == b.pad_token_id


class RewardModelScorer:
    """Scores completions with a frozen sequence-classification model.

    The caller places the model; `device` is where its inputs go (default: where its parameters are). With
    `offload` the model waits on CPU and visits `device` only while scoring. Rows are scored `batch_size` at a
    time. The reward model's router aux loss is never requested.
    """

    def __init__(self, model: PreTrainedModel, reward_tokenizer: PreTrainedTokenizerBase,
                 policy_tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 64,
                 device: torch.device | str | None = None, offload: bool = False):
        self.model = model
        self.tokenizer = reward_tokenizer
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.offload = offload
        self.same_tokenizer = tokenizers_match(reward_tokenizer, policy_tokenizer)
        if not self.same_tokenizer:
            logger.warning(
                "the reward model's tokenizer differs from the policy's (vocabulary, chat template or pad token): "
                "completions are decoded and re-tokenised with the reward model's tokenizer before scoring"
            )
        if offload:
            self.model.to("cpu")

    @torch.no_grad()
    def __call__(self, batch: ScoringBatch) -> torch.Tensor:
        input_ids, attention_mask = self._inputs(batch)
        with self._on_device():
            scores = []
            for start in range(0, input_ids.shape[0], self.batch_size):
                ids = input_ids[start:start + self.batch_size].to(self.device)
                mask = attention_mask[start:start + self.batch_size].to(self.device)
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                    use_cache=False, output_router_logits=False).logits
                scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores)

    def _inputs(self, batch: ScoringBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.same_tokenizer:
            return (torch.cat([batch.query_ids, batch.response_ids], 1).cpu(),
                    torch.cat([batch.query_mask, batch.response_mask], 1).cpu())
        texts = [self._render(prompt, completion) for prompt, completion in zip(batch.prompts, batch.completions)]
        encoded = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    def _render(self, prompt: Any, completion: str) -> str:
        if isinstance(prompt, str):
            return prompt + completion
        if self.tokenizer.chat_template is None:
            raise RewardModelError(
                "conversational prompts need a reward-model tokenizer with a chat template to re-render completions"
            )
        return self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)

    @contextlib.contextmanager
    def _on_device(self):
        if self.offload:
            self.model.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                self.model.to("cpu")


def load_reward_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The reward model's own tokenizer (with a pad token); the offline DBRX one only for a DBRX checkpoint without one."""
    return load_tokenizer(path)
