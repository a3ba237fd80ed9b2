"""DbrxForSequenceClassification: last-token pooling, losses, Auto registration, and checkpoints that load with and
without the dbrx_tune package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, DbrxForCausalLM
from transformers.models.dbrx.modeling_dbrx import load_balancing_loss_func

from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.seq_cls import (
    AUTO_MAP,
    REMOTE_CODE_FILENAME,
    DbrxForSequenceClassification,
    register_dbrx_seq_cls,
    save_reward_model,
)

PAD = 0


def small_config(**overrides):
    values = dict(vocab_size=128, pad_token_id=PAD, bos_token_id=1, eos_token_id=1, num_labels=1)
    values.update(overrides)
    return tiny_dbrx_config(**values)


@pytest.fixture(scope="module")
def model() -> DbrxForSequenceClassification:
    torch.manual_seed(0)
    return DbrxForSequenceClassification(small_config()).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_reward_is_read_at_last_real_token_whatever_the_padding_side(model):
    ids = random_ids(2, 6)
    with torch.no_grad():
        unpadded = model(ids).logits
        pad = torch.full((2, 3), PAD)
        ones, zeros = torch.ones(2, 6), torch.zeros(2, 3)
        right = model(torch.cat([ids, pad], 1), attention_mask=torch.cat([ones, zeros], 1)).logits
        left = model(torch.cat([pad, ids], 1), attention_mask=torch.cat([zeros, ones], 1)).logits
        no_mask_right = model(torch.cat([ids, pad], 1)).logits  # falls back to the pad id
    assert unpadded.shape == (2, 1)
    torch.testing.assert_close(right, unpadded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left, unpadded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(no_mask_right, unpadded, atol=1e-5, rtol=1e-4)


def test_attention_mask_decides_the_scored_token_when_pad_equals_eos():
    torch.manual_seed(0)
    model = DbrxForSequenceClassification(small_config(pad_token_id=1)).eval()  # pad == eos == 1
    ids = torch.cat([random_ids(1, 5, seed=8), torch.tensor([[1]])], 1)  # a real trailing eos
    padded = torch.cat([ids, torch.tensor([[1, 1]])], 1)
    with torch.no_grad():
        unpadded = model(ids, attention_mask=torch.ones_like(ids)).logits
        masked = model(padded, attention_mask=torch.tensor([[1] * 6 + [0] * 2])).logits
        before_eos = model(ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long)).logits
    torch.testing.assert_close(masked, unpadded, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unpadded, before_eos)  # the trailing eos really is a different position to score


def test_mixed_lengths_in_one_batch_score_each_row_at_its_own_last_token(model):
    long, short = random_ids(1, 7, seed=2), random_ids(1, 4, seed=3)
    batch = torch.cat([long, torch.cat([short, torch.full((1, 3), PAD)], 1)])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        together = model(batch, attention_mask=mask).logits
        separately = torch.cat([model(long).logits, model(short).logits])
        hidden = model.transformer(short).last_hidden_state
    torch.testing.assert_close(together, separately, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(separately[1], model.score(hidden[0, -1]), atol=1e-6, rtol=1e-5)


def test_regression_loss_adds_weighted_router_aux_loss(model):
    ids, mask = random_ids(3, 5, seed=4), torch.ones(3, 5, dtype=torch.long)
    labels = torch.tensor([0.5, -1.0, 2.0])
    plain = model(ids, attention_mask=mask, labels=labels)
    assert plain.aux_loss is None
    torch.testing.assert_close(plain.loss, nn.functional.mse_loss(plain.logits.squeeze(-1), labels))

    routed = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    ffn = model.config.ffn_config
    expected_aux = load_balancing_loss_func(routed.router_logits, ffn.moe_num_experts, ffn.moe_top_k, mask)
    assert len(routed.router_logits) == model.config.n_layers
    torch.testing.assert_close(routed.aux_loss, expected_aux)
    torch.testing.assert_close(routed.loss, plain.loss + ffn.moe_loss_weight * expected_aux)
    routed.loss.backward()
    assert model.transformer.blocks[0].ffn.router.layer.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_classification_head_uses_cross_entropy():
    torch.manual_seed(0)
    model = DbrxForSequenceClassification(small_config(num_labels=3)).eval()
    ids, labels = random_ids(2, 5, seed=5), torch.tensor([0, 2])
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))


def test_registration_is_idempotent_and_auto_class_builds_the_head():
    register_dbrx_seq_cls()
    register_dbrx_seq_cls()
    built = AutoModelForSequenceClassification.from_config(small_config())
    assert type(built) is DbrxForSequenceClassification


def test_saved_checkpoint_has_auto_map_modeling_file_and_loads_with_package(model, tmp_path):
    save_reward_model(model, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["architectures"] == ["DbrxForSequenceClassification"]
    assert (tmp_path / "model.safetensors").is_file()
    saved_module = (tmp_path / REMOTE_CODE_FILENAME).read_text()
    assert "dbrx_tune" not in saved_module.replace("`dbrx_tune`", "")  # only prose mentions, no imports
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded) is DbrxForSequenceClassification
    ids = random_ids(2, 6, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_checkpoint_loads_in_a_process_without_the_package_via_remote_code(model, tmp_path):
    checkpoint, elsewhere = tmp_path / "rm", tmp_path / "cwd"
    elsewhere.mkdir()
    save_reward_model(model, None, checkpoint)
    ids = random_ids(2, 6, seed=7)
    with torch.no_grad():
        expected = model(ids).logits.squeeze(-1).tolist()
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        from transformers import AutoModelForSequenceClassification
        try:
            AutoModelForSequenceClassification.from_pretrained({str(checkpoint)!r}, trust_remote_code=False)
            refused = False
        except ValueError:
            refused = True
        model = AutoModelForSequenceClassification.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        with torch.no_grad():
            scores = model(torch.tensor({ids.tolist()})).logits.squeeze(-1).tolist()
        print(json.dumps({{"scores": scores, "refused": refused, "module": type(model).__module__,
                          "package_imported": any(m.startswith("dbrx_tune") for m in sys.modules)}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["refused"], "loading custom code must need an explicit trust_remote_code=True"
    assert not result["package_imported"]
    assert "modeling_dbrx_reward" in result["module"]
    torch.testing.assert_close(torch.tensor(result["scores"]), torch.tensor(expected), atol=1e-6, rtol=1e-5)


def test_causal_lm_checkpoint_loads_backbone_into_seq_cls_head(tmp_path):
    torch.manual_seed(0)
    causal = DbrxForCausalLM(small_config())
    causal.save_pretrained(tmp_path)
    model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1, output_loading_info=True)
    assert type(model) is DbrxForSequenceClassification
    assert info["missing_keys"] == {"score.weight"} or set(info["missing_keys"]) == {"score.weight"}
    backbone, source = model.transformer.state_dict(), causal.transformer.state_dict()
    assert set(backbone) == set(source)
    for name, tensor in source.items():
        torch.testing.assert_close(backbone[name], tensor, msg=f"transformer.{name} did not transfer")
    assert model.score.weight.shape == (1, causal.config.d_model)
    assert model.score.weight.abs().sum() > 0  # initialised, not left at zeros
