"""Scoring with a frozen reward model: the one scorer PPO, GRPO-style rollouts and RewardBench share.

`RewardModelScorer` takes a sequence-classification model (one output) and its tokenizer and scores either
- a PPO rollout batch (`__call__(ScoringBatch)`): the policy's token ids are reused when both tokenizers mean the
  same thing, else the completions are decoded and re-rendered with the reward model's own tokenizer and chat
  template (feeding it the policy's ids would score garbage without any error); or
- (prompt messages, response) pairs (`score`, RewardBench): rendered with the chat template, truncated from the
  left so the response (which the score is about) survives, batched in order of length to keep padding small;
  results come back in input order.
The reward model's router aux loss is never requested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dbrx_tune.data.padding import pad_rows

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


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


def format_conversation(tokenizer: PreTrainedTokenizerBase, prompt: Messages, response: str) -> str:
    """The chat-templated text of `prompt` followed by the assistant's `response` (as RewardBench renders it)."""
    return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)


def tokenizers_match(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether token ids (and chat-rendered text) mean the same to both tokenizers."""
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template and a.pad_token_id == b.pad_token_id


def check_tokenizer_matches(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, model_name: str) -> None:
    """Fail early when `tokenizer` cannot be the model's: ids beyond the embedding, or no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; RewardBench formats every conversation with "
            "it. Pass --tokenizer with the tokenizer the model was trained with."
        )
    highest_id = max(tokenizer.get_vocab().values())
    vocab_size = model.get_input_embeddings().num_embeddings
    if highest_id >= vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has token ids up to {highest_id} but {model_name} embeds only "
            f"{vocab_size}; this is not the model's tokenizer (pass --tokenizer)."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; batched scoring needs one")


def left_truncate(ids: list[int], max_length: int | None) -> list[int]:
    """The last `max_length` ids (all of them when `max_length` is None)."""
    return ids[-max_length:] if max_length is not None and len(ids) > max_length else ids


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices from the longest row to the shortest: batches of similar lengths pad little."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)


class RewardModelScorer:
    """Scores with a frozen sequence-classification reward model (`num_labels == 1`).

    Args:
        model: the reward model; the caller places it. `device` is where its inputs go (default: where its
            parameters are). With `offload` the model waits on CPU and visits `device` only while scoring.
        tokenizer: the reward model's own tokenizer.
        policy_tokenizer: for rollout batches, the policy's tokenizer (ids are reused when the two match).
        batch_size: rows per forward.
        max_length: conversations (`score`) are truncated from the left to this many tokens; None keeps them whole.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        policy_tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        offload: bool = False,
    ):
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model has one output; this model has num_labels={model.config.num_labels}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.offload = offload
        self.same_tokenizer = policy_tokenizer is None or tokenizers_match(tokenizer, policy_tokenizer)
        if not self.same_tokenizer:
            logger.warning(
                "the reward model's tokenizer differs from the policy's (vocabulary, chat template or pad token): "
                "completions are decoded and re-tokenised with the reward model's tokenizer before scoring"
            )
        if offload:
            self.model.to("cpu")

    # ------------------------------------------------------------------ the forward both entry points share

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores (batch,) on CPU of one padded batch; positions count real tokens only, for either padding side."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        moe = {"output_router_logits": False} if hasattr(self.model.config, "output_router_logits") else {}
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **moe
        ).logits
        return logits[:, 0].float().cpu()

    @contextlib.contextmanager
    def _on_device(self):
        if self.offload:
            self.model.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                self.model.to("cpu")

    # ------------------------------------------------------------------ rollout batches (PPO)

    @torch.no_grad()
    def __call__(self, batch: ScoringBatch) -> torch.Tensor:
        """One score per completion of a rollout batch, shape (batch,), on CPU."""
        input_ids, attention_mask = self._rollout_inputs(batch)
        with self._on_device():
            return torch.cat(
                [
                    self._forward(
                        input_ids[start : start + self.batch_size], attention_mask[start : start + self.batch_size]
                    )
                    for start in range(0, input_ids.shape[0], self.batch_size)
                ]
            )

    def _rollout_inputs(self, batch: ScoringBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.same_tokenizer:
            return (
                torch.cat([batch.query_ids, batch.response_ids], 1).cpu(),
                torch.cat([batch.query_mask, batch.response_mask], 1).cpu(),
            )
        texts = [self._render(prompt, completion) for prompt, completion in zip(batch.prompts, batch.completions)]
        encoded = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    def _render(self, prompt: Any, completion: str) -> str:
        if isinstance(prompt, str):
            return prompt + completion
        if self.tokenizer.chat_template is None:
            raise ValueError(
                "conversational prompts need a reward-model tokenizer with a chat template to re-render completions"
            )
        return format_conversation(self.tokenizer, prompt, completion)

    # ------------------------------------------------------------------ conversations (RewardBench)

    def encode(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each templated conversation, left-truncated to `max_length`."""
        texts = [format_conversation(self.tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
        # The chat template already carries any special tokens the model needs (e.g. BOS); adding them again
        # would give a double BOS.
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        truncated = sum(self.max_length is not None and len(ids) > self.max_length for ids in encoded)
        if truncated:
            logger.warning(
                "%d of %d conversations exceed %d tokens and were truncated from the left",
                truncated,
                len(encoded),
                self.max_length,
            )
        return [left_truncate(ids, self.max_length) for ids in encoded]

    @torch.no_grad()
    def score(self, prompts: Sequence[Messages], responses: Sequence[str], desc: str = "reward model") -> list[float]:
        """One reward per (prompt, response), in input order."""
        encoded = self.encode(prompts, responses)
        order = length_order([len(ids) for ids in encoded])
        scores = [0.0] * len(encoded)
        with self._on_device():
            for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch"):
                batch = order[start : start + self.batch_size]
                input_ids, attention_mask = pad_rows([encoded[i] for i in batch], self.tokenizer.pad_token_id)
                for i, value in zip(batch, self._forward(input_ids, attention_mask).tolist(), strict=True):
                    scores[i] = value
        return scores
