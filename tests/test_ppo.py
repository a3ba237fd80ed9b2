"""PPO: the arithmetic (GAE, whitening, clipped losses, stop handling), the reward plumbing, the frozen reference,
bad input, and that a tiny DBRX policy learns to earn a rule reward with a bounded KL."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from datasets import Dataset
from model_card_checks import check_model_card
from safetensors.torch import load_file
from transformers import DbrxForCausalLM

from dbrx_tune.build import set_generation_tokens
from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.moe_loss import sync_moe_config
from dbrx_tune.modeling.seq_cls import DbrxForSequenceClassification, save_reward_model
from dbrx_tune.modeling.value_head import DbrxForTokenValue
from dbrx_tune.rewards.loader import RewardModelError, load_reward_model
from dbrx_tune.rewards.rules import parse_reward_function
from dbrx_tune.rewards.scorer import RewardModelScorer, ScoringBatch
from dbrx_tune.training.ppo import PPOConfig, PPOTrainer
from dbrx_tune.training.ppo.core import (
    apply_missing_eos_penalty,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    masked_whiten,
    stop_mask,
    token_rewards,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IM_END = 100279
WORDS = [" red", " blue", " green", " gold"]


def tiny_policy(tokenizer, seed: int = 0) -> DbrxForCausalLM:
    torch.manual_seed(seed)
    model = DbrxForCausalLM(sync_moe_config(tiny_dbrx_config()))
    set_generation_tokens(model, tokenizer)
    return model


def zero_value_model(seed: int = 0) -> DbrxForTokenValue:
    torch.manual_seed(seed)
    model = DbrxForTokenValue(sync_moe_config(tiny_dbrx_config()))
    model.score.weight.data.zero_()
    return model


def ppo_args(tmp_path, **overrides) -> PPOConfig:
    values = dict(
        output_dir=str(tmp_path / "ppo"),
        use_cpu=True,
        report_to="none",
        reward_function="rule:contains:blue",
        per_device_train_batch_size=16,
        num_ppo_epochs=2,
        response_length=4,
        temperature=1.0,
        learning_rate=3e-3,
        kl_coef=0.05,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        lr_scheduler_type="constant",
        missing_eos_penalty=1.0,
    )
    values.update(overrides)
    return PPOConfig(**values)


# ------------------------------------------------------------------ arithmetic


def test_gae_matches_a_plain_per_row_loop_over_valid_tokens():
    torch.manual_seed(0)
    gamma, lam = 0.9, 0.8
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    lengths = [5, 3, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for row, n in enumerate(lengths):
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_value = values[row, t + 1].item() if t + 1 < n else 0.0
            running = rewards[row, t].item() + gamma * next_value - values[row, t].item() + gamma * lam * running
            expected[t] = running
        assert advantages[row, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert returns[row, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[row, :n].tolist())], abs=1e-5
        )
        assert advantages[row, n:].abs().sum() == 0


def test_masked_whiten_normalises_valid_tokens_only():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    whitened = masked_whiten(values, mask)
    picked = whitened[mask.bool()]
    assert picked.tolist() == pytest.approx(((valid - valid.mean()) / valid.std()).tolist(), abs=1e-4)
    assert whitened[~mask.bool()].abs().sum() == 0
    kept_mean = masked_whiten(values, mask, shift_mean=False)[mask.bool()]
    assert kept_mean.mean().item() == pytest.approx(valid.mean().item(), abs=1e-4)


def test_clipped_policy_loss_stops_gradient_beyond_the_clip_range():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratios e^0.5 = 1.65 and e^-0.5 = 0.61
    advantages = torch.tensor([[1.0, 1.0]])
    out = clipped_policy_loss(new, old, advantages, torch.ones(1, 2), cliprange=0.2)
    ratio_low = torch.exp(torch.tensor(-0.5)).item()
    # token 0: ratio above 1.2 with a positive advantage -> clipped objective 1.2, no gradient
    # token 1: ratio below 0.8 with a positive advantage -> the unclipped (smaller) objective keeps its gradient
    assert out.loss.item() == pytest.approx(-(1.2 + ratio_low) / 2, abs=1e-6)
    out.loss.backward()
    assert new.grad[0, 0].item() == 0
    assert new.grad[0, 1].item() == pytest.approx(-ratio_low / 2, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(0.5)


def test_clipped_value_loss_takes_the_worse_of_clipped_and_unclipped():
    old, returns = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]])
    values = torch.tensor([[2.0, 0.1]])
    loss, clipfrac = clipped_value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.5)
    # token 0: unclipped (2-1)^2=1, clipped (0.5-1)^2=0.25 -> 1; token 1: unclipped 1.21, clipped (0.1+1)^2=1.21
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.21) / 2, abs=1e-6)
    assert clipfrac.item() == 0


def test_stop_mask_keeps_tokens_through_the_first_stop_and_flags_missing_ones():
    responses = torch.tensor([[5, IM_END, 7, IM_END], [5, 6, 7, 8], [100257, 9, 9, 9]])
    mask, stopped = stop_mask(responses, [100257, IM_END])
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert stopped.tolist() == [True, False, True]


def test_missing_eos_penalty_hits_only_completions_that_never_stopped():
    scores = torch.tensor([1.0, 1.0, 0.5])
    penalised = apply_missing_eos_penalty(scores, torch.tensor([True, False, False]), 2.0)
    assert penalised.tolist() == [1.0, -1.0, -1.5]
    assert apply_missing_eos_penalty(scores, torch.tensor([False] * 3), None).tolist() == scores.tolist()


def test_token_rewards_put_the_score_on_the_last_valid_token():
    kl = torch.ones(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = token_rewards(torch.tensor([5.0, 7.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.1, 4.9, 0.0], [-0.1, -0.1, 6.9]]))


# ------------------------------------------------------------------ rewards and bad input


def test_rule_rewards_score_completion_text():
    batch = ScoringBatch(
        torch.zeros(2, 1),
        torch.ones(2, 1),
        torch.zeros(2, 1),
        torch.ones(2, 1),
        ["q", "q"],
        ["The sky is Blue.", "green"],
        [{"answer": "blue"}, {"answer": "blue"}],
    )
    assert parse_reward_function("rule:contains_answer")(batch).tolist() == [1.0, 0.0]
    assert parse_reward_function("rule:contains:green")(batch).tolist() == [0.0, 1.0]
    with pytest.raises(RewardModelError, match="unknown rule"):
        parse_reward_function("rule:nonsense")


@pytest.fixture(scope="module")
def tiny_reward_model_dir(tmp_path_factory, dbrx_tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm") / "tiny-rm"
    model = DbrxForSequenceClassification(tiny_dbrx_config(num_labels=1))
    save_reward_model(model, dbrx_tokenizer, str(path))
    return str(path)


def test_reward_model_rescored_from_text_when_its_tokenizer_differs(tiny_reward_model_dir, dbrx_tokenizer):
    model = load_reward_model(tiny_reward_model_dir, tiny_args_model())
    prompt = "Colour:"
    query = torch.tensor([dbrx_tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    response = torch.tensor([dbrx_tokenizer(" blue sky", add_special_tokens=False)["input_ids"]])
    batch = ScoringBatch(
        query, torch.ones_like(query), response, torch.ones_like(response), [prompt], [" blue sky"], [{}]
    )
    direct = RewardModelScorer(model, dbrx_tokenizer, policy_tokenizer=dbrx_tokenizer)
    other = copy.deepcopy(dbrx_tokenizer)
    other.chat_template = dbrx_tokenizer.chat_template + "{# another template #}"
    retokenised = RewardModelScorer(model, other, policy_tokenizer=dbrx_tokenizer)
    assert direct.same_tokenizer and not retokenised.same_tokenizer
    assert retokenised(batch).item() == pytest.approx(direct(batch).item(), abs=1e-5)


def tiny_args_model():
    from dbrx_tune.args import ModelArguments

    return ModelArguments(model_name_or_path="unused", dtype="float32")


def test_ppo_recipe_pointing_at_a_causal_lm_as_reward_model_is_refused(tmp_path, dbrx_tokenizer):
    from rlhf.ppo import main

    causal_lm = tmp_path / "sft-policy"
    tiny_policy(dbrx_tokenizer).save_pretrained(str(causal_lm))
    with pytest.raises(RewardModelError, match="is not a reward model.*DbrxForCausalLM"):
        main(
            [
                os.path.join(REPO_ROOT, "recipes/tiny/dbrx_ppo.yaml"),
                "--reward_model_path",
                str(causal_lm),
                "--reward_function",
                "null",
                "--output_dir",
                str(tmp_path / "out"),
                "--report_to",
                "none",
            ]
        )


# ------------------------------------------------------------------ trainer


def test_reference_is_frozen_gets_no_grads_and_is_never_asked_for_router_aux_loss(tmp_path, dbrx_tokenizer):
    policy = tiny_policy(dbrx_tokenizer)
    ref = copy.deepcopy(policy)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}
    router_flags = []
    original_forward = ref.forward

    def spy(*args, **kwargs):
        router_flags.append(kwargs.get("output_router_logits"))
        return original_forward(*args, **kwargs)

    ref.forward = spy
    trainer = PPOTrainer(
        args=ppo_args(tmp_path, total_episodes=16, num_ppo_epochs=1),
        processing_class=dbrx_tokenizer,
        model=policy,
        ref_model=ref,
        value_model=zero_value_model(),
        train_dataset=Dataset.from_dict({"prompt": ["Colour:"] * 16}),
        reward_function=parse_reward_function("rule:contains:blue"),
    )
    metrics = trainer.train().metrics
    assert router_flags and all(flag is False for flag in router_flags)
    assert all(not p.requires_grad and p.grad is None for p in ref.parameters())
    assert all(torch.equal(v, ref_before[k]) for k, v in ref.state_dict().items())
    assert any(not torch.equal(v, policy_before[k]) for k, v in policy.state_dict().items())
    assert metrics["router/aux_loss"] > 0  # the trained policy's router loss is on


def sft_warmup(policy, tokenizer, steps: int = 30) -> None:
    """A few SFT steps so the policy answers "Colour:" with one of four words then <|im_end|>."""
    prompt = tokenizer("Colour:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + tokenizer(w, add_special_tokens=False)["input_ids"] + [IM_END] for w in WORDS] * 4)
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = policy(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.slow
def test_ppo_raises_the_reward_of_sampled_completions_with_bounded_kl(tmp_path, dbrx_tokenizer):
    policy = tiny_policy(dbrx_tokenizer)
    sft_warmup(policy, dbrx_tokenizer)
    trainer = PPOTrainer(
        args=ppo_args(tmp_path, total_episodes=16 * 10),
        processing_class=dbrx_tokenizer,
        model=policy,
        ref_model=copy.deepcopy(policy),
        value_model=zero_value_model(),
        train_dataset=Dataset.from_dict({"prompt": ["Colour:"] * 64}),
        reward_function=parse_reward_function("rule:contains:blue"),
    )
    trainer.train()
    history = trainer.state.log_history
    scores = [h["objective/scores"] for h in history]
    kls = [h["objective/kl"] for h in history]
    assert len(history) == 10
    first, last = sum(scores[:2]) / 2, sum(scores[-3:]) / 3
    assert first < 0.5 and last > first + 0.4, scores
    # Collapsing onto one of the four words the reference spreads over costs about log 4 nats per completion.
    assert max(kls[-3:]) < 3.0, kls
    assert all(h["val/num_eos_tokens"] > 0 for h in history)


@pytest.mark.slow
def test_training_resumes_from_a_checkpoint_at_the_saved_update(tmp_path, dbrx_tokenizer):
    def make_trainer():
        policy = tiny_policy(dbrx_tokenizer)
        return PPOTrainer(
            args=ppo_args(tmp_path, total_episodes=16 * 2, num_ppo_epochs=1, save_strategy="steps", save_steps=1),
            processing_class=dbrx_tokenizer,
            model=policy,
            ref_model=copy.deepcopy(policy),
            value_model=zero_value_model(),
            train_dataset=Dataset.from_dict({"prompt": ["Colour:"] * 32}),
            reward_function=parse_reward_function("rule:contains:blue"),
        )

    first = make_trainer()
    first.train()
    checkpoint = tmp_path / "ppo" / "checkpoint-1"
    assert (checkpoint / "trainer_state.json").is_file() and (tmp_path / "ppo" / "checkpoint-2").is_dir()
    resumed = make_trainer()
    resumed._load_checkpoint(str(checkpoint))
    saved = load_file(str(checkpoint / "model.safetensors"))
    current = resumed._unwrapped().state_dict()
    assert saved and all(torch.equal(current[k], v) for k, v in saved.items())
    resumed.train()
    steps = [h["step"] for h in resumed.state.log_history]
    assert steps == [1, 2]  # update 1 restored from the checkpoint's history, only update 2 trained again


@pytest.mark.slow
def test_ppo_stage_answers_the_vibe_prompts_at_start_saves_and_end(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dbrx_tune.evals.vibes.prompts import load_vibe_prompts
    from dbrx_tune.evals.vibes.schema import CATEGORY_METRIC, VIBES_FILE
    from rlhf.ppo import main

    out = tmp_path / "out"
    # 2 updates of 4 prompts, a checkpoint after each; the tiny recipe has vibe checks on (at each save)
    main(
        [
            os.path.join(REPO_ROOT, "recipes/tiny/dbrx_ppo.yaml"),
            "--output_dir",
            str(out),
            "--report_to",
            "tensorboard",
            "--per_device_train_batch_size",
            "4",
            "--num_mini_batches",
            "1",
            "--num_ppo_epochs",
            "1",
            "--total_episodes",
            "8",
            "--max_train_samples",
            "8",
            "--save_steps",
            "1",
            "--response_length",
            "4",
            "--vibe_max_new_tokens",
            "4",
        ]
    )
    records = [json.loads(line) for line in (out / VIBES_FILE).read_text().splitlines()]
    ids = [prompt.id for prompt in load_vibe_prompts("default")]
    assert [(r["step"], r["prompt_id"]) for r in records] == [(step, i) for step in (0, 1, 2) for i in ids]
    assert {(r["stage"], r["run"], r["error"]) for r in records} == {("ppo", "out", None)}
    # scores and answers go to the trackers; the log history keeps the PPO updates only
    accumulator = EventAccumulator(str(out / "runs" / "ppo"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    for category, metric in CATEGORY_METRIC.items():
        assert [event.step for event in accumulator.Scalars(f"vibes/{category}/{metric}")] == [0, 1, 2]
    assert f"vibes/answers/{ids[0]}/text_summary" in accumulator.Tags()["tensors"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history] == [1, 2]
    final = json.loads((out / "train_results.json").read_text())
    shown = {key: final[key] for key in ("objective/scores", "objective/kl")}
    card = check_model_card(str(out), "ppo", library="transformers", base_model=None, metrics=shown)
    assert "`rule:contains_answer`" in card.text and "value_model/" in card.text
