"""DeepSpeed ZeRO-3 and expert parallelism for DBRX, and the checks a launch needs before any GPU time is spent.

Under ZeRO-3 every parameter is partitioned and gathered by hooks on the module that uses it. A MoE block only
touches the experts its tokens were routed to, so ranks routing differently would gather different parameters
and deadlock (or index empty partitions). Registering the whole MoE block (`DbrxFFN`) as a ZeRO-3 *leaf module*
makes DeepSpeed gather all of its parameters at once on every rank. No TRL trainer does this.

With expert parallelism (DeepSpeed AutoEP, `"expert_parallel": {"enabled": true, ...}` in the DeepSpeed config)
the MoE blocks are instead replaced at `deepspeed.initialize` by AutoEP layers whose experts are partitioned over
the expert-data-parallel group; `dbrx_tune.autoep_dbrx` supplies the DBRX preset. `prepare_for_deepspeed` picks
one of the two for a built model; `apply_experts_implementation` swaps the experts also when ZeRO-3 has already
partitioned them (models built with the HF DeepSpeed config active are partitioned at construction).

Launch helpers: `check_parallel_config` (EP size, ZeRO stage / EP combinations), `check_launch_settings`
(multi-node addresses), `expand_nodelist` (SLURM node lists), and a CLI used by `scripts/slurm_launch.sh`:

    python -m dbrx_tune.distributed check --accelerate-config recipes/accelerate/multi_node.yaml --num-machines 4 \
        --main-process-ip node01 --main-process-port 29500
    python -m dbrx_tune.distributed nodes "node[01-04]"
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled
from transformers.models.dbrx.modeling_dbrx import DbrxFFN

logger = logging.getLogger(__name__)

MOE_LEAF_MODULE_CLASSES: tuple[type[nn.Module], ...] = (DbrxFFN,)


class ParallelConfigError(ValueError):
    """A DeepSpeed/accelerate/launch setting that cannot work; the message names the file and key."""


def expert_parallel_size(ds_config: Mapping[str, Any] | None) -> int:
    """The AutoEP size a DeepSpeed config asks for; 1 when expert parallelism is off."""
    block = (ds_config or {}).get("expert_parallel") or {}
    if not block.get("enabled", False):
        return 1
    return block.get("autoep_size", 1)


def zero_stage(ds_config: Mapping[str, Any] | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when absent)."""
    return int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0))


def prepare_for_deepspeed(model: nn.Module, ds_config: Mapping[str, Any] | None = None) -> str:
    """Get a built DBRX model ready for `deepspeed.initialize`; returns "autoep", "zero3_leaf" or "none".

    `ds_config` defaults to the HF DeepSpeed config active in this process (set by TrainingArguments with
    `deepspeed: ...`). With `expert_parallel.enabled` the DBRX AutoEP preset is registered and the MoE blocks are
    made detectable; otherwise, under ZeRO-3, the MoE blocks become leaf modules.
    """
    if ds_config is None and is_deepspeed_zero3_enabled():
        ds_config = deepspeed_config()
    if expert_parallel_size(ds_config) > 1 or ((ds_config or {}).get("expert_parallel") or {}).get("enabled"):
        from dbrx_tune.autoep_dbrx import prepare_dbrx_for_autoep, register_dbrx_autoep_preset

        register_dbrx_autoep_preset()
        count = prepare_dbrx_for_autoep(model)
        logger.info("AutoEP: %d DBRX MoE blocks will be replaced by expert-parallel layers", count)
        return "autoep"
    if zero_stage(ds_config) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        leaves = set_z3_leaf_modules(model, list(MOE_LEAF_MODULE_CLASSES))
        logger.info("ZeRO-3: registered %d DBRX MoE blocks as leaf modules", len(leaves))
        return "zero3_leaf"
    return "none"


def _is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(param, "ds_id") for param in module.parameters())


def apply_experts_implementation(model: nn.Module, implementation: str) -> nn.Module:
    """`set_experts_implementation`, also for a model whose parameters ZeRO-3 has already partitioned.

    A model built with the HF DeepSpeed config active (`from_pretrained` or `_from_config`) holds empty partitions;
    the swap then gathers one MoE block's experts at a time, builds the new experts from the full values, and
    partitions them again with `deepspeed.zero.Init(module=...)`.
    """
    from dbrx_tune.modeling.experts import IMPLEMENTATIONS, DbrxGroupedExperts, set_experts_implementation

    if not _is_partitioned(model):
        return set_experts_implementation(model, implementation)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"experts_implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
    import deepspeed

    ffn_config = model.config.ffn_config
    want_grouped = implementation == "grouped"
    for ffn in [module for module in model.modules() if isinstance(module, DbrxFFN)]:
        experts = ffn.experts
        if isinstance(experts, DbrxGroupedExperts) == want_grouped:
            continue
        with deepspeed.zero.GatheredParameters(list(experts.parameters()), modifier_rank=None):
            swapped = DbrxGroupedExperts.from_stock(experts, ffn_config) if want_grouped else experts.to_stock(ffn_config)
            for param in swapped.parameters():
                param.data = param.data.clone()  # own storage: the gathered buffers are released on exit
        deepspeed.zero.Init(module=swapped, config_dict_or_path=deepspeed_config())
        ffn.experts = swapped
    logger.info("experts_implementation=%s applied to a ZeRO-3 partitioned model", implementation)
    return model


# Settings DeepSpeed 0.19.8 rejects for AutoEP together with ZeRO-3 (runtime/engine.py,
# _validate_zero3_moe_compatibility), checked here before launch: (path in the config, allowed value, reason).
_AUTOEP_ZERO3_UNSUPPORTED = (
    (("zero_optimization", "zero_quantized_gradients"), False, "ZeRO++ quantized gradients (qgZ)"),
    (("zero_optimization", "zero_hpz_partition_size"), 1, "ZeRO++ hierarchical partitioning (hpZ)"),
    (("sequence_parallel_size",), 1, "Ulysses sequence parallelism"),
    (("expert_parallel", "expert_tensor_parallel_size"), 1, "expert tensor parallelism"),
)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_parallel_config(
    ds_config: Mapping[str, Any],
    *,
    world_size: int,
    num_experts: int,
    experts_implementation: str = "grouped",
    use_peft: bool = False,
    load_in_4bit: bool = False,
    source: str = "DeepSpeed config",
) -> None:
    """Reject DeepSpeed settings that cannot run for DBRX on `world_size` processes, before launch.

    Expert parallelism (AutoEP) needs: an EP size dividing both the expert count and the world size; the 3D experts
    (`experts_implementation: grouped`); full fine-tuning (AutoEP replaces the expert modules, so LoRA adapters or
    4-bit experts on them would be dropped); and, with ZeRO-3, none of the features DeepSpeed 0.19.8 does not
    support with AutoEP under ZeRO-3 (qgZ, hpZ, sequence parallelism, expert tensor parallelism).
    """
    stage = zero_stage(ds_config)
    if stage not in (0, 1, 2, 3):
        raise ParallelConfigError(f"{source}: zero_optimization.stage={stage}; DeepSpeed has stages 0-3")
    block = ds_config.get("expert_parallel") or {}
    if not block.get("enabled", False):
        return
    ep = block.get("autoep_size", 1)
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ParallelConfigError(f"{source}: expert_parallel.autoep_size must be a positive integer, got {ep!r}")
    if num_experts % ep:
        raise ParallelConfigError(
            f"{source}: expert_parallel.autoep_size={ep} does not divide the model's {num_experts} experts; "
            f"use one of {_divisors(num_experts)}"
        )
    if world_size % ep:
        raise ParallelConfigError(
            f"{source}: expert_parallel.autoep_size={ep} does not divide the world size {world_size} "
            f"(EP groups tile the processes); use one of {[d for d in _divisors(world_size) if num_experts % d == 0]}"
        )
    preset = block.get("preset_model")
    if preset not in (None, "dbrx"):
        raise ParallelConfigError(f"{source}: expert_parallel.preset_model={preset!r}; DBRX needs 'dbrx' (or unset)")
    if block.get("load_balance_coeff") is not None:
        raise ParallelConfigError(
            f"{source}: expert_parallel.load_balance_coeff is not supported by AutoEP for DBRX; DBRX balances "
            "experts with its router loss (moe_loss_weight). Remove the key."
        )
    if experts_implementation != "grouped":
        raise ParallelConfigError(
            f"{source}: expert parallelism needs experts_implementation: grouped (3D expert weights), "
            f"got {experts_implementation!r}"
        )
    if use_peft or load_in_4bit:
        raise ParallelConfigError(
            f"{source}: expert parallelism replaces the expert modules and is for full fine-tuning; it cannot be "
            "combined with use_peft or load_in_4bit (remove expert_parallel, or use recipes/deepspeed/zero3.json)"
        )
    if stage == 3:
        for path, allowed, feature in _AUTOEP_ZERO3_UNSUPPORTED:
            value: Any = ds_config
            for key in path:
                value = value.get(key) if isinstance(value, Mapping) else None
            if value is not None and value != allowed:
                raise ParallelConfigError(
                    f"{source}: {'.'.join(path)}={value!r}: DeepSpeed does not support {feature} with AutoEP under "
                    f"ZeRO-3; set it to {allowed!r} or remove it"
                )


def read_json_config(path: str) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict; errors name the file."""
    if not os.path.isfile(path):
        raise ParallelConfigError(f"DeepSpeed config not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except json.JSONDecodeError as err:
        raise ParallelConfigError(f"{path}: malformed JSON: {err}") from err
    if not isinstance(values, dict):
        raise ParallelConfigError(f"{path}: expected a JSON object")
    return values


def check_launch_settings(settings: Mapping[str, Any], source: str = "accelerate config") -> None:
    """Check an accelerate launch configuration (the YAML mapping plus command-line values) before launching.

    Multi-node runs need `main_process_ip` (host name or IP) and `main_process_port`, a `machine_rank` below
    `num_machines`, `num_processes` (all nodes together) divisible by `num_machines`, and a known `rdzv_backend`.
    A DeepSpeed run needs its `deepspeed_config.deepspeed_config_file` to exist.
    """
    num_machines = settings.get("num_machines", 1)
    num_processes = settings.get("num_processes", 1)
    for key, value in (("num_machines", num_machines), ("num_processes", num_processes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ParallelConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    if num_processes % num_machines:
        raise ParallelConfigError(
            f"{source}: num_processes={num_processes} (all machines together) is not a multiple of "
            f"num_machines={num_machines}"
        )
    rdzv = settings.get("rdzv_backend", "static")
    if rdzv not in ("static", "c10d", "etcd", "etcd-v2"):
        raise ParallelConfigError(f"{source}: rdzv_backend={rdzv!r}; expected static, c10d, etcd or etcd-v2")
    if settings.get("distributed_type") == "DEEPSPEED":
        ds_file = (settings.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file and not os.path.isfile(ds_file):
            raise ParallelConfigError(f"{source}: deepspeed_config.deepspeed_config_file={ds_file!r} does not exist")
    if num_machines == 1:
        return
    ip = settings.get("main_process_ip")
    if not ip or not isinstance(ip, str) or not _is_host(ip):
        raise ParallelConfigError(
            f"{source}: num_machines={num_machines} needs main_process_ip (the first node's host name or IP), "
            f"got {ip!r}"
        )
    port = settings.get("main_process_port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ParallelConfigError(
            f"{source}: num_machines={num_machines} needs main_process_port (1-65535), got {port!r}"
        )
    rank = settings.get("machine_rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < num_machines:
        raise ParallelConfigError(
            f"{source}: machine_rank must be an integer in [0, {num_machines}) on each node, got {rank!r}"
        )


def _is_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value) is not None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list ("gpu[01-03,07],login1") into host names, in order (`scontrol show hostnames`)."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            start, _, end = item.partition("-")
            if not start.isdigit() or (end and not end.isdigit()):
                raise ParallelConfigError(f"node list {nodelist!r}: cannot expand range {item!r}")
            width = len(start)
            for number in range(int(start), int(end or start) + 1):
                hosts.append(f"{prefix}{number:0{width}d}{suffix}")
    if not hosts:
        raise ParallelConfigError(f"node list {nodelist!r} names no nodes")
    return hosts


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbrx_tune.distributed", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    nodes = commands.add_parser("nodes", help="print the host names of a SLURM node list, one per line")
    nodes.add_argument("nodelist")
    check = commands.add_parser("check", help="check an accelerate config (and its DeepSpeed config) before launch")
    check.add_argument("--accelerate-config", required=True)
    for flag, kind in (("num-machines", int), ("num-processes", int), ("machine-rank", int),
                       ("main-process-ip", str), ("main-process-port", int), ("num-experts", int)):
        check.add_argument(f"--{flag}", type=kind)
    args = parser.parse_args(argv)
    try:
        if args.command == "nodes":
            print("\n".join(expand_nodelist(args.nodelist)))
            return 0
        from dbrx_tune.recipe import load_yaml_mapping

        settings = load_yaml_mapping(args.accelerate_config)
        for key in ("num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"):
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        check_launch_settings(settings, source=args.accelerate_config)
        ds_file = (settings.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file and args.num_experts:
            check_parallel_config(
                read_json_config(ds_file), world_size=settings.get("num_processes", 1),
                num_experts=args.num_experts, source=ds_file,
            )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
