"""DPO policies as RewardBench reward models (`run_dpo.py`'s scoring), beside `dbrx_tune.rewards.RewardModelScorer`.

Both scorers take `(prompt messages, assistant response)` pairs and return one float per pair, so the benchmark
code does not care which kind of model produced the number. `DpoRewardScorer` scores with a DPO policy's
implicit reward. With a reference model the reward is
  sum over response tokens of log p_policy - log p_ref (DPO's reward up to the positive factor beta, which no
  ranking depends on); without one, RewardBench's reference-free variants: the mean (`avg`, RewardBench's
  default), the sum, or minus the L2 norm of the response tokens' log-probabilities.

Text goes through the tokenizer's chat template and is truncated from the left, so the response (which the score
is about) survives and the oldest prompt tokens are dropped first. Rows are batched in order of length to keep
padding small; results come back in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dbrx_tune.data.padding import pad_rows
from dbrx_tune.rewards.scorer import Messages, format_conversation, left_truncate, length_order

RefFreeNorm = Literal["avg", "sum", "norm"]


class DpoRewardScorer:
    """Scores conversations with a DPO policy's implicit reward (reference model given) or a reference-free variant."""

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        reference: PreTrainedModel | None = None,
        ref_free_norm: RefFreeNorm = "avg",
        batch_size: int = 8,
        max_length: int = 2048,
    ):
        if ref_free_norm not in ("avg", "sum", "norm"):
            raise ValueError(f"ref_free_norm must be avg, sum or norm; got {ref_free_norm!r}")
        self.policy = policy.eval()
        self.reference = reference.eval() if reference is not None else None
        self.ref_free_norm = ref_free_norm
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[tuple[list[int], int]]:
        """(token ids, number of response tokens at the end) per conversation, left-truncated.

        The prompt is rendered with the generation prompt and the response is the rest of the full conversation's
        text, tokenised on its own, so the response tokens are known exactly.
        """
        rows = []
        for index, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            full = format_conversation(self.tokenizer, prompt, response)
            head = self._prompt_prefix(prompt, full, index)
            prompt_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"]
            response_ids = self.tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
            if not response_ids:
                raise ValueError(f"conversation {index}: the response renders to no tokens")
            ids = left_truncate(prompt_ids + response_ids, self.max_length)
            rows.append((ids, min(len(response_ids), len(ids) - 1)))
        return rows

    def _prompt_prefix(self, prompt: Messages, full: str, index: int) -> str:
        for add_generation_prompt in (True, False):
            head = self.tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            if full.startswith(head):
                return head
        raise ValueError(
            f"conversation {index}: the chat template does not render the prompt as a prefix of the full "
            "conversation, so the response tokens cannot be located for the DPO reward"
        )

    @staticmethod
    def _response_logps(
        model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """(batch, seq - 1) log-probabilities of each next token, zero outside the response, on the CPU.

        Inputs go to the model's device, so policy and reference may sit on different GPUs.
        """
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
        logps = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:].unsqueeze(-1).to(logits.device)).squeeze(-1)
        return logps.cpu() * response_mask[:, 1:]

    @torch.no_grad()
    def score(self, prompts: Sequence[Messages], responses: Sequence[str], desc: str = "DPO reward") -> list[float]:
        """One implicit reward per (prompt, response), in input order."""
        rows = self.encode(prompts, responses)
        order = length_order([len(ids) for ids, _ in rows])
        scores = [0.0] * len(rows)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch"):
            batch = order[start : start + self.batch_size]
            input_ids, attention_mask = pad_rows([rows[i][0] for i in batch], self.tokenizer.pad_token_id)
            response_mask = torch.zeros_like(attention_mask, dtype=torch.float32)
            for j, i in enumerate(batch):
                ids, n_response = rows[i]
                response_mask[j, len(ids) - n_response : len(ids)] = 1.0
            policy_logps = self._response_logps(self.policy, input_ids, attention_mask, response_mask)
            if self.reference is not None:
                ref_logps = self._response_logps(self.reference, input_ids, attention_mask, response_mask)
                values = (policy_logps - ref_logps).sum(-1)
            elif self.ref_free_norm == "sum":
                values = policy_logps.sum(-1)
            elif self.ref_free_norm == "avg":
                values = policy_logps.sum(-1) / response_mask[:, 1:].sum(-1)
            else:
                values = -torch.linalg.vector_norm(policy_logps, ord=2, dim=-1)
            for i, value in zip(batch, values.tolist(), strict=True):
                scores[i] = value
        return scores
