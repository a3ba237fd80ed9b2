"""The reward trainer adds the router load-balancing loss to the Bradley-Terry loss itself, not only to the logs.

TRL 1.16's RewardTrainer never reads `outputs.aux_loss`; `DbrxRewardTrainer.compute_loss` adds
`router_loss_weight * aux_loss`. The check is on the loss and on the router's gradient, so a trainer that only logs
the aux loss (a planted bug the logged-metric test let through) fails here.
"""

import pytest
import torch
from trl import RewardConfig

from dbrx_tune.build import load_sequence_classifier
from dbrx_tune.recipe import parse_recipe
from dbrx_tune.training.stage import load_stage_datasets, load_stage_tokenizer
from dbrx_tune.training.trainers import DbrxRewardTrainer

pytestmark = pytest.mark.slow  # builds a reward trainer on the tiny recipe (~15 s)

RECIPE = "recipes/tiny/dbrx_rm.yaml"


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    recipe = parse_recipe(
        [RECIPE, "--output_dir", str(tmp_path_factory.mktemp("rm")), "--report_to", "none"], RewardConfig
    )
    tokenizer = load_stage_tokenizer(recipe)
    splits = load_stage_datasets(recipe, "preference", tokenizer, max_length=recipe.training.max_length)
    torch.manual_seed(0)
    model = load_sequence_classifier(recipe.model, tokenizer)
    return DbrxRewardTrainer(
        model=model, args=recipe.training, train_dataset=splits["train"], processing_class=tokenizer
    )


def _loss_and_router_grad(trainer, batch, weight: float):
    model = trainer.model
    model.config.router_aux_loss_coef = weight
    model.train()
    model.zero_grad(set_to_none=True)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    loss.backward()
    router = next(p for n, p in model.named_parameters() if "router" in n and p.requires_grad)
    return loss.detach(), outputs, router.grad.detach().clone()


def test_the_router_loss_is_in_the_loss_and_its_gradient(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    weight = trainer.model.config.router_aux_loss_coef
    assert weight > 0
    with_aux, outputs, grad_with = _loss_and_router_grad(trainer, batch, weight)
    without, _, grad_without = _loss_and_router_grad(trainer, batch, 0.0)
    assert outputs.aux_loss is not None
    torch.testing.assert_close(with_aux - without, weight * outputs.aux_loss.detach(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grad_with, grad_without)  # the load-balancing loss reaches the router
