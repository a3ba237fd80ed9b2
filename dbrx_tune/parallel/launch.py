"""The checks a DBRX launch needs before any GPU time is spent.

`check_parallel_config` (EP size, ZeRO stage / EP combinations), `check_launch_settings` (multi-node addresses),
`expand_nodelist` (SLURM node lists). `python -m dbrx_tune.tools.launch` runs them from the command line for
`scripts/slurm_launch.sh`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from dbrx_tune.parallel.zero3 import zero_stage


class ParallelConfigError(ValueError):
    """A DeepSpeed/accelerate/launch setting that cannot work; the message names the file and key."""


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


def deepspeed_config(value: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The `deepspeed` training argument as a dict: a JSON file's contents (`read_json_config`), a mapping as is."""
    return read_json_config(value) if isinstance(value, str) else value


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
