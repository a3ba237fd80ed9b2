"""GRPO and RLOO through TRL's trainers: the tiny recipes run end to end on DBRX, the router aux loss is counted
once with DBRX's weight, the reference is the policy's starting point, reward models and rules score, bad reward
settings are refused before weights load, and a warmed-up tiny policy learns to earn a rule reward."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from model_card_checks import check_model_card
from transformers import DbrxForCausalLM
from trl import GRPOConfig, GRPOTrainer

from dbrx_tune.build import set_generation_tokens
from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.moe_loss import sync_moe_config
from dbrx_tune.modeling.seq_cls import DbrxForSequenceClassification, save_reward_model
from dbrx_tune.rewards.loader import RewardModelError
from dbrx_tune.rewards.rules import RuleRewardFunc

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GRPO = os.path.join(REPO_ROOT, "recipes/tiny/dbrx_grpo.yaml")
TINY_RLOO = os.path.join(REPO_ROOT, "recipes/tiny/dbrx_rloo.yaml")
IM_END = 100279
WORDS = [" red", " blue", " green", " gold"]


def train_logs(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        return [h for h in json.load(handle)["log_history"] if "reward" in h and "train_runtime" not in h]


def quick(tmp_path, *overrides: str) -> list[str]:
    return [
        "--output_dir",
        str(tmp_path / "out"),
        "--report_to",
        "none",
        "--max_steps",
        "2",
        "--max_eval_samples",
        "2",
        "--max_completion_length",
        "4",
        *overrides,
    ]


@pytest.fixture(scope="module")
def tiny_reward_model_dir(tmp_path_factory, dbrx_tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm") / "tiny-rm"
    save_reward_model(DbrxForSequenceClassification(tiny_dbrx_config(num_labels=1)), dbrx_tokenizer, str(path))
    return str(path)


@pytest.mark.slow
def test_tiny_grpo_counts_the_dbrx_router_loss_once_with_its_own_weight(tmp_path):
    from rlhf.grpo import main

    # A rule no completion can meet: every group's rewards are equal, the policy-gradient term is zero, and with
    # beta 0 the whole loss is the router loss, weighted by the recipe's moe_loss_weight.
    main(
        [
            TINY_GRPO,
            *quick(tmp_path, "--reward_function", "rule:contains:zqzqzqzq", "--beta", "0", "--moe_loss_weight", "0.3"),
        ]
    )
    logs = train_logs(tmp_path / "out")
    assert len(logs) == 2
    for log in logs:
        assert log["reward"] == 0.0
        assert log["aux_loss"] > 1.0  # top-2 of 4 experts: about 2 when balanced
        assert log["loss"] == pytest.approx(0.3 * log["aux_loss"], rel=1e-3)
    saved = json.load(open(tmp_path / "out" / "config.json", encoding="utf-8"))
    assert saved["output_router_logits"] is False  # the saved policy generates without computing the loss


@pytest.mark.slow
def test_tiny_grpo_reference_starts_as_the_policy_built_by_the_dbrx_loader(tmp_path):
    from rlhf.grpo import main

    main([TINY_GRPO, *quick(tmp_path)])  # beta 0.04: TRL alone would rebuild a random-init policy from a path
    logs = train_logs(tmp_path / "out")
    assert logs[0]["kl"] == 0.0  # same weights, same RoPE, same experts as the policy before its first update
    assert logs[1]["kl"] > 0.0  # and it stays frozen while the policy moves
    assert "rewards/rule:contains_answer/mean" in logs[0]


@pytest.mark.slow
def test_tiny_rloo_runs_with_a_frozen_reference_and_the_router_loss(tmp_path):
    from rlhf.rloo import main

    metrics = main([TINY_RLOO, *quick(tmp_path)])
    logs = train_logs(tmp_path / "out")
    assert logs[0]["kl"] == 0.0 and logs[1]["kl"] != 0.0  # RLOO logs the mean log-ratio, which may be negative
    assert all(log["aux_loss"] > 1.0 for log in logs)
    assert "eval_reward" in metrics
    check_model_card(
        str(tmp_path / "out"),
        "rloo",
        library="transformers",
        base_model=None,
        metrics={"train_loss": metrics["train_loss"]},
    )


@pytest.mark.slow
def test_grpo_scores_completions_with_a_reward_model_checkpoint(tmp_path, tiny_reward_model_dir):
    from rlhf.grpo import main

    main(
        [
            TINY_GRPO,
            *quick(
                tmp_path, "--reward_model_path", tiny_reward_model_dir, "--reward_function", "null", "--max_steps", "1"
            ),
        ]
    )
    log = train_logs(tmp_path / "out")[0]
    name = f"rewards/{os.path.basename(tiny_reward_model_dir)}/mean"
    assert name in log and torch.isfinite(torch.tensor(log[name]))
    assert log["reward_std"] > 0  # a random score head tells the sampled completions apart


@pytest.mark.slow
def test_grpo_refuses_a_causal_lm_as_reward_model_and_a_recipe_without_reward(tmp_path, dbrx_tokenizer):
    from rlhf.grpo import main

    causal_lm = tmp_path / "sft-policy"
    DbrxForCausalLM(sync_moe_config(tiny_dbrx_config())).save_pretrained(str(causal_lm))
    with pytest.raises(RewardModelError, match="is not a reward model.*DbrxForCausalLM"):
        main([TINY_GRPO, *quick(tmp_path, "--reward_model_path", str(causal_lm), "--reward_function", "null")])
    with pytest.raises(RewardModelError, match="set reward_model_path"):
        main([TINY_GRPO, *quick(tmp_path, "--reward_function", "null")])
    with pytest.raises(RewardModelError, match="unknown rule"):
        main([TINY_GRPO, *quick(tmp_path, "--reward_function", "rule:nonsense")])


def test_rule_reward_reads_conversational_completions_and_dataset_columns():
    reward = RuleRewardFunc("rule:contains_answer")
    prompts = [[{"role": "user", "content": "Colour of the sky?"}]] * 2
    completions = [[{"role": "assistant", "content": "It is Blue."}], [{"role": "assistant", "content": "green"}]]
    assert reward(prompts, completions, answer=["blue", "blue"], trainer_state=None) == [1.0, 0.0]
    assert RuleRewardFunc("rule:contains:green")(["q", "q"], ["a green leaf", "red"]) == [1.0, 0.0]


@pytest.mark.slow
def test_grpo_raises_the_rule_reward_of_a_warmed_up_dbrx_policy(tmp_path, dbrx_tokenizer):
    torch.manual_seed(0)
    policy = DbrxForCausalLM(sync_moe_config(tiny_dbrx_config()))
    set_generation_tokens(policy, dbrx_tokenizer)
    # A few SFT steps so the policy answers "Colour:" with one of four words then <|im_end|>: reward about 1/4.
    prompt = dbrx_tokenizer("Colour:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + dbrx_tokenizer(w, add_special_tokens=False)["input_ids"] + [IM_END] for w in WORDS])
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        policy(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()

    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        seed=0,
        max_steps=10,
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=3,
        temperature=1.0,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=RuleRewardFunc("rule:contains:blue"),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["Colour:"] * 64}),
        processing_class=dbrx_tokenizer,
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 10
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert first < 0.5 and last > first + 0.3, rewards
    assert all(h["aux_loss"] > 0 for h in trainer.state.log_history if "aux_loss" in h)
