"""A PPO trainer for DBRX policies, built on accelerate (and DeepSpeed ZeRO-3 through the `deepspeed` key).

TRL 1.x removed its PPOTrainer; this one follows the same algorithm (Ouyang et al. 2022, as in TRL 0.x) with
DBRX's needs built in. Each update:

1. rollout: sample completions from the policy (under ZeRO-3 with `synced_gpus`, since ranks stop at different
   lengths), cut them after the first stop token, and compute without gradients the sampling log-probs, the
   frozen reference's log-probs, the values, and the scores (minus `missing_eos_penalty` for completions that
   never stopped);
2. per-token rewards = -kl_coef * KL(policy || reference) plus the score on the last token, optionally whitened;
   advantages by GAE, whitened;
3. `num_ppo_epochs` passes over the batch in `num_mini_batches` minibatches: clipped policy loss, clipped value
   loss, and the router load-balancing loss of the trained models (never of the frozen reference or reward).

The policy and the value model are trained together as one module (one optimiser, one DeepSpeed engine). With
LoRA the reference is the policy with its adapters disabled, so no second copy of DBRX is held.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    get_scheduler,
    trainer_pt_utils,
)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from dbrx_tune.data.padding import pad_rows
from dbrx_tune.modeling.moe_loss import router_loss_weight
from dbrx_tune.modeling.value_head import value_backbone
from dbrx_tune.parallel.checkpoint import consolidated_dbrx_state_dict
from dbrx_tune.rewards.scorer import RewardFunction, RewardModelScorer, ScoringBatch
from dbrx_tune.training.ppo.config import PPOConfig
from dbrx_tune.training.ppo.core import (
    apply_missing_eos_penalty,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    masked_mean,
    masked_whiten,
    per_token_kl,
    stop_mask,
    token_rewards,
)

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
VALUE_HEAD_NAME = "value_head.safetensors"


class PolicyAndValue(nn.Module):
    """The two trained models as one module, so one optimiser / DeepSpeed engine drives both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        response_length: int,
        output_router_logits: bool,
    ):
        position_ids = position_ids_from_mask(attention_mask)
        policy_out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=response_length + 1,
            use_cache=False,
            output_router_logits=output_router_logits,
        )
        value_out = value_backbone(self.value_model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_router_logits=output_router_logits,
        )
        return policy_out, value_out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions counted over real tokens only, as `generate` does for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(logits: torch.Tensor, responses: torch.LongTensor, temperature: float) -> torch.Tensor:
    """Log-probs (B, T) of the sampled tokens; `logits` (B, T, V) are those predicting each response token.

    TRL's `selective_log_softmax`: a log-sum-exp per row instead of a (B, T, V) log-softmax copy over the vocabulary.
    """
    return selective_log_softmax(logits.float(), responses, temperature=temperature)


class PPOTrainer:
    """PPO for a causal-LM policy with a token-value model, a frozen reference and a reward.

    Args:
        args: the PPO keys and the usual TrainingArguments.
        processing_class: the policy's tokenizer (pad token and, for conversational prompts, chat template).
        model: the policy (a `DbrxForCausalLM` or a PEFT model wrapping one).
        ref_model: the frozen reference, or None when `model` has LoRA adapters (they are disabled instead).
        value_model: a `DbrxForTokenValue` (possibly with LoRA).
        reward_model / reward_tokenizer: a frozen sequence-classification model and its tokenizer; or
        reward_function: a rule (exactly one of the two kinds).
        train_dataset: rows with a `prompt` (text or messages); other columns reach rule rewards.
    """

    def __init__(
        self,
        args: PPOConfig,
        processing_class: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        value_model: nn.Module,
        train_dataset: Dataset,
        ref_model: PreTrainedModel | None = None,
        reward_model: PreTrainedModel | None = None,
        reward_tokenizer: PreTrainedTokenizerBase | None = None,
        reward_function: RewardFunction | None = None,
    ):
        if (reward_model is None) == (reward_function is None):
            raise ValueError("PPOTrainer needs exactly one of reward_model and reward_function")
        if ref_model is None and not isinstance(model, PeftModel):
            raise ValueError("PPOTrainer needs a ref_model unless the policy has LoRA adapters to disable")
        if processing_class.pad_token_id is None:
            raise ValueError("the policy tokenizer has no pad token; rollouts are padded")
        self.args = args
        self.processing_class = processing_class
        self.accelerator = Accelerator(
            # accelerate drops DeepSpeed when told cpu=True; with `deepspeed` set, `args` has already placed this
            # process on the CPU (as for transformers' Trainer, which never passes cpu)
            cpu=args.use_cpu and args.deepspeed_plugin is None,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            deepspeed_plugin=args.deepspeed_plugin,
            mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            log_with=[name for name in args.report_to if name != "none"] or None,
            # the same place transformers' TensorBoard callback writes to
            project_dir=os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs"),
        )
        self.zero3 = self.accelerator.distributed_type == DistributedType.DEEPSPEED and is_deepspeed_zero3_enabled()
        self.stop_token_ids = self._stop_token_ids(model)

        world = self.accelerator.num_processes
        self.batch_size = args.local_batch_size * world
        self.train_dataset = self._tokenize(train_dataset)
        if len(self.train_dataset) < self.batch_size:
            raise ValueError(
                f"train_dataset has {len(self.train_dataset)} prompts, fewer than one rollout batch of "
                f"{self.batch_size} "
                "(per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches * processes)"
            )
        total_episodes = args.total_episodes or int(args.num_train_epochs * len(self.train_dataset))
        self.num_updates = max(1, total_episodes // self.batch_size)
        num_optimizer_steps = self.num_updates * args.num_ppo_epochs * args.num_mini_batches

        for module in (model, value_model):
            if args.gradient_checkpointing:
                module.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs or {"use_reentrant": False}
                )
        self.model = PolicyAndValue(model, value_model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=args.get_warmup_steps(num_optimizer_steps),
            num_training_steps=num_optimizer_steps,
        )
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            args.hf_deepspeed_config.trainer_config_finalize(args, model, num_optimizer_steps)
        dataloader = DataLoader(
            self.train_dataset,
            batch_size=args.local_batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=self._collate,
            generator=torch.Generator().manual_seed(args.seed),
        )
        self.model, self.optimizer, self.lr_scheduler, self.dataloader = self.accelerator.prepare(
            self.model, optimizer, scheduler, dataloader
        )

        self.ref_model = self._prepare_frozen(ref_model, device=None, offload=args.offload_ref_model)
        self.reward = reward_function
        if reward_model is not None:
            device = torch.device(args.reward_model_device) if args.reward_model_device else self.accelerator.device
            placed = self._prepare_frozen(reward_model, device=device, offload=args.offload_reward_model)
            self.reward = RewardModelScorer(
                placed,
                reward_tokenizer,
                policy_tokenizer=processing_class,
                batch_size=args.local_rollout_forward_batch_size,
                device=device,
                offload=args.offload_reward_model,
            )
        self.aux_coef = router_loss_weight(self._unwrapped().policy)
        self.state = TrainerState(
            max_steps=self.num_updates,
            logging_steps=args.logging_steps,
            save_steps=args.save_steps,
            is_world_process_zero=self.is_world_process_zero(),
        )
        self.control = TrainerControl()
        self.callbacks: list[TrainerCallback] = []
        self.eval_dataset = None  # PPO learns from rollouts; the stage life cycle evaluates nothing here
        self.accelerator.init_trackers(
            "ppo", config={k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))}
        )

    # ------------------------------------------------------------------ setup helpers

    def _unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    @property
    def policy(self) -> PreTrainedModel:
        """The trained policy module (a PeftModel with LoRA; partitioned, not gathered, under ZeRO-3)."""
        return self._unwrapped().policy

    @property
    def model_wrapped(self) -> nn.Module:
        """The module DeepSpeed (or DDP) drives, as `transformers.Trainer.model_wrapped` names it."""
        return self.model

    def is_world_process_zero(self) -> bool:
        return self.accelerator.is_main_process

    # ------------------------------------------------------------------ vibe checks (`dbrx_tune.evals.vibes`)

    def vibe_host(self) -> PPOTrainer:
        """This trainer is its own `VibeHost`: the policy answers, scores and answers go to the trackers."""
        return self

    def generating_model(self) -> PreTrainedModel:
        return self.policy

    def engine(self) -> nn.Module:
        return self.model

    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log_result(self, result: Any) -> None:
        self.accelerator.log({**result.scalars, **result.answer_texts()}, step=result.step)

    def add_callback(self, callback: TrainerCallback) -> None:
        """Register a `transformers.TrainerCallback`: its `on_train_begin`, `on_step_end` (after each PPO update),
        `on_save` and `on_train_end` are called on every rank, as transformers' Trainer calls them."""
        self.callbacks.append(callback)

    def _call_callbacks(self, event: str) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(
                self.args, self.state, self.control, model=self.policy, processing_class=self.processing_class
            )

    def _stop_token_ids(self, model: PreTrainedModel) -> list[int]:
        if self.args.stop_token is None:
            return []
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return eos or [self.processing_class.eos_token_id]

    def _tokenize(self, dataset: Dataset) -> Dataset:
        """Render prompts (chat template with the assistant header for conversations) and refuse long ones."""
        tokenizer, limit = self.processing_class, self.args.max_prompt_length

        def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
            prompt = row["prompt"]
            text = (
                prompt
                if isinstance(prompt, str)
                else tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids or len(ids) > limit:
                raise ValueError(
                    f"train_dataset row {index}: prompt is {len(ids)} tokens; it must be 1 to max_prompt_length={limit}"
                )
            return {"input_ids": ids}

        return dataset.map(encode, with_indices=True, desc="tokenizing prompts")

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Left-pad prompt ids (generation appends on the right); keep the raw rows for rewards."""
        ids, mask = pad_rows([row["input_ids"] for row in rows], self.processing_class.pad_token_id, side="left")
        extras = [{k: v for k, v in row.items() if k not in ("input_ids", "prompt")} for row in rows]
        return {"input_ids": ids, "attention_mask": mask, "prompts": [row["prompt"] for row in rows], "rows": extras}

    def _prepare_frozen(self, model: PreTrainedModel | None, device: torch.device | None, offload: bool):
        """Freeze a reference / reward model and place it: partitioned by DeepSpeed under ZeRO-3, on CPU when
        offloaded, else on `device` (default: this process's)."""
        if model is None:
            return None
        model.requires_grad_(False)
        model.eval()
        if self.zero3:
            import deepspeed

            config = dict(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            config.pop("optimizer", None)
            config.pop("scheduler", None)
            engine, *_ = deepspeed.initialize(model=model, config=config)
            return engine.module.eval()
        return model.to("cpu" if offload else device or self.accelerator.device)

    @contextlib.contextmanager
    def _reference(self):
        """The module whose forward is the frozen reference policy."""
        if self.ref_model is None:
            policy = self._unwrapped().policy
            with policy.disable_adapter():
                yield policy
            return
        if self.args.offload_ref_model:
            self.ref_model.to(self.accelerator.device)
        try:
            yield self.ref_model
        finally:
            if self.args.offload_ref_model:
                self.ref_model.to("cpu")

    # ------------------------------------------------------------------ rollout

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Sample completions for `batch` and compute everything the optimisation phase needs."""
        args, device = self.args, self.accelerator.device
        queries, query_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        context_length = queries.shape[1]
        unwrapped = self._unwrapped()
        unwrapped.eval()
        chunk = args.local_rollout_forward_batch_size
        responses = []
        for start in range(0, queries.shape[0], chunk):
            generated = unwrapped.policy.generate(
                input_ids=queries[start : start + chunk],
                attention_mask=query_mask[start : start + chunk],
                max_new_tokens=args.response_length,
                min_new_tokens=0 if self.stop_token_ids else args.response_length,
                do_sample=True,
                temperature=args.temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=self.processing_class.pad_token_id,
                synced_gpus=self.zero3,
            )
            responses.append(self._pad_response(generated[:, context_length:]))
        responses = torch.cat(responses)
        mask, stopped = stop_mask(responses, self.stop_token_ids)
        responses = responses.masked_fill(~mask, self.processing_class.pad_token_id)
        query_responses = torch.cat([queries, responses], 1)
        attention_mask = torch.cat([query_mask, mask.long()], 1)

        logprobs, ref_logprobs, values, entropy = [], [], [], []
        for start in range(0, queries.shape[0], chunk):
            rows = slice(start, start + chunk)
            policy_out, value_out = unwrapped(
                query_responses[rows], attention_mask[rows], args.response_length, output_router_logits=False
            )
            logits = policy_out.logits[:, :-1]
            logprobs.append(response_logprobs(logits, responses[rows], args.temperature))
            entropy.append(entropy_from_logits(logits.float() / args.temperature))
            values.append(value_out.token_values[:, context_length - 1 : -1])
            with self._reference() as reference:
                ref_out = reference(
                    input_ids=query_responses[rows],
                    attention_mask=attention_mask[rows],
                    position_ids=position_ids_from_mask(attention_mask[rows]),
                    logits_to_keep=args.response_length + 1,
                    use_cache=False,
                    output_router_logits=False,
                )
            ref_logprobs.append(response_logprobs(ref_out.logits[:, :-1], responses[rows], args.temperature))
        logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
        values, entropy = torch.cat(values), torch.cat(entropy)

        completions = self.processing_class.batch_decode(
            [
                r[m & ~torch.isin(r, torch.tensor(self.stop_token_ids or [-1], device=r.device))]
                for r, m in zip(responses, mask)
            ],
            skip_special_tokens=False,
        )
        scores = self.reward(
            ScoringBatch(
                query_ids=queries,
                query_mask=query_mask,
                response_ids=responses,
                response_mask=mask.long(),
                prompts=batch["prompts"],
                completions=completions,
                rows=batch["rows"],
            )
        ).to(device)
        raw_scores = scores.clone()
        if self.stop_token_ids:
            scores = apply_missing_eos_penalty(scores, stopped, args.missing_eos_penalty)

        maskf = mask.float()
        kl = per_token_kl(logprobs, ref_logprobs, args.kl_estimator) * maskf
        rewards = token_rewards(scores, kl, maskf, args.kl_coef)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, maskf, shift_mean=False)
        values = values * maskf
        advantages, returns = compute_gae(rewards, values, maskf, args.gamma, args.lam)
        advantages = masked_whiten(advantages, maskf)
        return {
            "query_responses": query_responses,
            "attention_mask": attention_mask,
            "responses": responses,
            "mask": maskf,
            "logprobs": logprobs,
            "values": values,
            "advantages": advantages,
            "returns": returns,
            "context_length": torch.tensor(context_length),
            "stats": {
                "objective/kl": kl.sum(1).mean(),
                "objective/entropy": (entropy * maskf).sum(1).mean(),
                "objective/non_score_reward": (-args.kl_coef * kl).sum(1).mean(),
                "objective/scores": raw_scores.mean(),
                "objective/rlhf_reward": (scores - args.kl_coef * kl.sum(1)).mean(),
                "val/num_eos_tokens": stopped.float().sum(),
                "val/response_length": maskf.sum(1).mean(),
            },
        }

    def _pad_response(self, response: torch.LongTensor) -> torch.LongTensor:
        """Right-pad a generated chunk to `response_length` (generation ends early when every row stopped)."""
        missing = self.args.response_length - response.shape[1]
        if missing <= 0:
            return response
        return nn.functional.pad(response, (0, missing), value=self.processing_class.pad_token_id)

    # ------------------------------------------------------------------ optimisation

    def optimise(self, data: dict[str, Any]) -> dict[str, float]:
        """`num_ppo_epochs` passes of clipped policy + value updates over one rollout batch."""
        args, accelerator = self.args, self.accelerator
        self.model.train()
        context_length = int(data["context_length"])
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        use_aux = self.aux_coef > 0
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(args.local_batch_size, device=accelerator.device)
            for mb_start in range(0, args.local_batch_size, args.mini_batch_size):
                for micro_start in range(mb_start, mb_start + args.mini_batch_size, args.per_device_train_batch_size):
                    idx = order[micro_start : micro_start + args.per_device_train_batch_size]
                    with accelerator.accumulate(self.model):
                        policy_out, value_out = self.model(
                            data["query_responses"][idx],
                            data["attention_mask"][idx],
                            args.response_length,
                            output_router_logits=use_aux,
                        )
                        logits = policy_out.logits[:, :-1]
                        mask = data["mask"][idx]
                        logprobs = response_logprobs(logits, data["responses"][idx], args.temperature)
                        values = value_out.token_values[:, context_length - 1 : -1]
                        pg = clipped_policy_loss(
                            logprobs, data["logprobs"][idx], data["advantages"][idx], mask, args.cliprange
                        )
                        vf_loss, vf_clipfrac = clipped_value_loss(
                            values, data["values"][idx], data["returns"][idx], mask, args.cliprange_value
                        )
                        loss = pg.loss + args.vf_coef * vf_loss
                        if use_aux:
                            aux = policy_out.aux_loss + value_out.aux_loss
                            loss = loss + self.aux_coef * aux
                            stats["router/aux_loss"].append(aux.detach())
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm:
                            accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad()
                    with torch.no_grad():
                        stats["policy/approxkl_avg"].append(pg.approxkl)
                        stats["policy/clipfrac_avg"].append(pg.clipfrac)
                        stats["loss/policy_avg"].append(pg.loss.detach())
                        stats["loss/value_avg"].append(vf_loss.detach())
                        stats["val/clipfrac_avg"].append(vf_clipfrac)
                        stats["val/ratio"].append(pg.ratio)
                        stats["policy/entropy_avg"].append(
                            masked_mean(entropy_from_logits(logits.detach() / args.temperature), mask)
                        )
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    # ------------------------------------------------------------------ loop, logging, checkpoints

    def _batches(self) -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            if hasattr(self.dataloader, "set_epoch"):
                self.dataloader.set_epoch(epoch)
            yield from self.dataloader
            epoch += 1

    def train(self, resume_from_checkpoint: str | None = None) -> TrainOutput:
        """Run `num_updates` rollout + optimisation rounds; `metrics` of the result are the last update's."""
        args, accelerator = self.args, self.accelerator
        if resume_from_checkpoint:
            self._load_checkpoint(resume_from_checkpoint)
        batches = self._batches()
        for _ in range(self.state.global_step):
            next(batches)  # the prompts the resumed run already trained on
        set_seed(args.seed + accelerator.process_index + self.state.global_step)  # distinct samples per rank
        logger.info(
            "PPO: %d updates of %d prompts (%d per process), %d optimiser steps each",
            self.num_updates,
            self.batch_size,
            args.local_batch_size,
            args.num_ppo_epochs * args.num_mini_batches,
        )
        metrics: dict[str, float] = {}
        self._call_callbacks("on_train_begin")
        while self.state.global_step < self.num_updates:
            start = time.perf_counter()
            data = self.rollout(next(batches))
            rollout_time = time.perf_counter() - start
            train_stats = self.optimise(data)
            step = self.state.global_step = self.state.global_step + 1
            episode = step * self.batch_size
            metrics = self._reduce({**data["stats"], **train_stats})
            metrics.update(
                {
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "episode": episode,
                    "epoch": episode / len(self.train_dataset),
                    "time/rollout_s": rollout_time,
                    "time/optimise_s": time.perf_counter() - start - rollout_time,
                }
            )
            if torch.cuda.is_available():
                metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            if step % max(1, int(args.logging_steps)) == 0 or step == self.num_updates:
                self.log(metrics)
            self.control.should_save = bool(
                args.save_strategy == "steps" and args.save_steps and step % int(args.save_steps) == 0
            )
            self._call_callbacks("on_step_end")
            if self.control.should_save:
                self._save_checkpoint(step)
                self.control.should_save = False
        self._call_callbacks("on_train_end")
        return TrainOutput(self.state.global_step, metrics.get("loss/policy_avg", 0.0), metrics)

    def _reduce(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Average every statistic over processes (sums stay sums of the per-process means)."""
        names = sorted(stats)
        stacked = torch.stack([stats[n].float().to(self.accelerator.device) for n in names])
        return dict(zip(names, self.accelerator.reduce(stacked, reduction="mean").tolist()))

    def log(self, metrics: dict[str, Any]) -> None:
        """To the trackers (tensorboard: numbers as scalars, strings as text), the log and the state's history."""
        step = self.state.global_step
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, str)}
        self.state.log_history.append({**scalars, "step": step})
        self.accelerator.log(metrics, step=step)
        logger.info(
            "update %d/%d: %s",
            step,
            self.num_updates,
            ", ".join(f"{k}={v:.4g}" for k, v in scalars.items() if isinstance(v, float)),
        )

    # transformers' own writers of train_results.json / all_results.json and trainer_state.json
    log_metrics = trainer_pt_utils.log_metrics
    save_metrics = trainer_pt_utils.save_metrics
    save_state = trainer_pt_utils.save_state
    metrics_format = trainer_pt_utils.metrics_format

    def _write_state(self, directory: str) -> None:
        if self.accelerator.is_main_process:
            self.state.save_to_json(os.path.join(directory, TRAINER_STATE_NAME))

    def _save_checkpoint(self, step: int) -> None:
        """Optimiser, scheduler, RNG and both trained models (accelerate's state) plus the trainer state."""
        directory = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        self.accelerator.save_state(directory)
        self._write_state(directory)
        if self.accelerator.is_main_process and self.args.save_total_limit:
            checkpoints = sorted(
                (d for d in os.listdir(self.args.output_dir) if d.startswith(f"{PREFIX_CHECKPOINT_DIR}-")),
                key=lambda name: int(name.rsplit("-", 1)[1]),
            )
            for stale in checkpoints[: -self.args.save_total_limit]:
                shutil.rmtree(os.path.join(self.args.output_dir, stale))
        logger.info("saved checkpoint %s", directory)
        self._call_callbacks("on_save")

    def _load_checkpoint(self, directory: str) -> None:
        state_file = os.path.join(directory, TRAINER_STATE_NAME)
        if not os.path.isfile(state_file):
            raise ValueError(f"resume_from_checkpoint: {directory} has no {TRAINER_STATE_NAME}; not a PPO checkpoint")
        self.accelerator.load_state(directory)
        resumed = TrainerState.load_from_json(state_file)
        self.state.global_step, self.state.log_history = resumed.global_step, resumed.log_history
        logger.info("resumed from %s at update %d", directory, self.state.global_step)

    def save_model(self, output_dir: str) -> None:
        """The policy as a plain HF checkpoint (or adapter) in `output_dir`, the value model in `value_model/`."""
        accelerator = self.accelerator
        # DBRX names and layout also from ZeRO-3 (whose own consolidation skips the 3D experts' state-dict hook)
        state = consolidated_dbrx_state_dict(self.model) if self.zero3 else accelerator.get_state_dict(self.model)
        unwrapped = self._unwrapped()
        if state is None:  # ZeRO-3: only the main process holds the gathered weights
            state = {}
        for name, module, directory in (
            ("policy", unwrapped.policy, output_dir),
            ("value_model", unwrapped.value_model, os.path.join(output_dir, "value_model")),
        ):
            prefix = name + "."
            module_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            module.save_pretrained(directory, state_dict=module_state, is_main_process=accelerator.is_main_process)
            if isinstance(module, PeftModel) and name == "value_model" and accelerator.is_main_process:
                # the trained value head is not part of a LoRA adapter: keep it beside it
                head = {
                    k.rsplit("model.", 1)[-1]: v.contiguous()
                    for k, v in module_state.items()
                    if k.endswith("score.weight")
                }
                save_file(head, os.path.join(directory, VALUE_HEAD_NAME))
        self._write_state(output_dir)
        accelerator.wait_for_everyone()
