"""The private library APIs the toolkit relies on, pinned: a release that moves one fails here, by name.

Each entry is a place where no public extension point does the job on the pinned releases (setup.cfg states the
ranges, with a comment naming these pins). When a test here fails after an upgrade, the message says which module
of ours to change; the public alternative each could move to is in its comment.
"""

from __future__ import annotations

import inspect

import pytest


def test_peft_recognises_nested_parameter_wrappers_by_class_name():
    """dbrx_tune/modeling/lora.py: our `ParamWrapper` keeps PEFT's class name because PEFT 0.21 walks nested parameter
    wrappers by name when it wraps the second and third expert weight of the same module. Registered through
    `LoraConfig._register_custom_module` (PEFT's custom-module hook, still underscored in 0.21)."""
    from peft import LoraConfig
    from peft.tuners.lora import layer as lora_layer
    from peft.tuners.tuners_utils import BaseTuner

    from dbrx_tune.modeling.lora import ParamWrapper

    assert ParamWrapper.__name__ == lora_layer.ParamWrapper.__name__ == "ParamWrapper"
    assert '__class__.__name__ == "ParamWrapper"' in inspect.getsource(BaseTuner._inject_parameters)
    assert callable(getattr(LoraConfig, "_register_custom_module", None))


@pytest.mark.parametrize(
    "module_name, class_name",
    [("trl.trainer.grpo_trainer", "GRPOTrainer"), ("trl.trainer.rloo_trainer", "RLOOTrainer")],
)
def test_trl_online_trainers_build_their_reference_through_create_model_from_path(module_name, class_name):
    """dbrx_tune/training/online_rl.py swaps this module-level name while the trainer is built, so the KL reference
    comes from the DBRX loader (TRL 1.16 takes no reference model as an argument)."""
    import importlib

    module = importlib.import_module(module_name)
    assert callable(getattr(module, "create_model_from_path", None))
    assert "create_model_from_path(" in inspect.getsource(getattr(module, class_name).__init__)


def test_deepspeed_autoep_registry_takes_presets_and_adapters():
    """dbrx_tune/parallel/autoep.py registers the DBRX preset into AutoEP's registry (DeepSpeed 0.19 has no public
    registration call; `PRESET_MODELS` is public, its adapters table and validator are not)."""
    from deepspeed.module_inject.auto_ep_presets import registry

    assert isinstance(registry.PRESET_MODELS, dict)
    assert isinstance(registry._PRESET_ADAPTERS, dict)
    assert callable(registry._validate_registered_preset_adapters)


def test_transformers_output_recorder_registry_is_a_dict_keyed_by_class():
    """dbrx_tune/parallel/autoep.py retargets DBRX's router-logit recorder to AutoEP's gate through plain `dict`
    methods on transformers' `_CAN_RECORD_REGISTRY` (DeepSpeed's own retargeting crashes on its one-argument `get`)."""
    from transformers.utils import output_capturing

    assert isinstance(output_capturing._CAN_RECORD_REGISTRY, dict)
    assert callable(output_capturing.maybe_install_capturing_hooks)
    assert "layer_name" in inspect.signature(output_capturing.OutputRecorder).parameters


def test_deepspeed_param_coordinator_can_forget_its_trace():
    """dbrx_tune/evals/vibes/generation.py forgets ZeRO-3's recorded fetch order after generating, as TRL does
    (`trl.models.utils`): `is_invalid_trace` is public, `_invalidate_trace` is not."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    assert callable(PartitionedParameterCoordinator.is_invalid_trace)
    assert callable(PartitionedParameterCoordinator._invalidate_trace)


def test_router_class_swap_keeps_state_and_matches_the_stock_router():
    """dbrx_tune/modeling/router.py switches `DbrxRouter` instances to `DbrxJitterRouter` by `__class__` (a module swap
    would re-partition ZeRO-3 weights): that needs the subclass to add no state and compute the stock logits."""
    import torch
    from transformers.models.dbrx.modeling_dbrx import DbrxRouter

    from dbrx_tune.modeling.config import tiny_dbrx_config
    from dbrx_tune.modeling.router import DbrxJitterRouter

    torch.manual_seed(0)
    config = tiny_dbrx_config()
    stock = DbrxRouter(config.ffn_config).eval()
    fresh_attributes = set(vars(DbrxRouter(config.ffn_config)))
    hidden = torch.randn(2, 3, stock.layer.in_features)
    expected = stock(hidden)
    keys = set(stock.state_dict())
    stock.__class__ = DbrxJitterRouter
    assert set(stock.state_dict()) == keys and set(vars(stock)) == fresh_attributes
    torch.testing.assert_close(stock(hidden), expected)


def test_torch_tells_a_forward_inside_a_backward_pass():
    """dbrx_tune/modeling/experts.py `_TokenChunkedExperts` skips the experts in a checkpoint's recompute by asking
    whether a backward pass is running (`torch._C._current_graph_task_id() != -1`, as torch's own module_tracker and
    FSDP2 do); public alternative: none on torch 2.8-2.14."""
    import torch

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(torch._C._current_graph_task_id())
            return grad

    assert torch._C._current_graph_task_id() == -1
    Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert seen and seen[0] != -1
