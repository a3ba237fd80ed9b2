"""Check a launch before any GPU time is spent; expand SLURM node lists. Used by `scripts/slurm_launch.sh`:

    python -m dbrx_tune.tools.launch check --accelerate-config recipes/accelerate/multi_node.yaml --num-machines 4 \
        --main-process-ip node01 --main-process-port 29500
    python -m dbrx_tune.tools.launch nodes "node[01-04]"
"""

from __future__ import annotations

import argparse
import sys

from dbrx_tune.parallel.launch import check_launch_settings, check_parallel_config, expand_nodelist, read_json_config
from dbrx_tune.recipe import load_yaml_mapping


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbrx_tune.tools.launch", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    nodes = commands.add_parser("nodes", help="print the host names of a SLURM node list, one per line")
    nodes.add_argument("nodelist")
    check = commands.add_parser("check", help="check an accelerate config (and its DeepSpeed config) before launch")
    check.add_argument("--accelerate-config", required=True)
    for flag, kind in (
        ("num-machines", int),
        ("num-processes", int),
        ("machine-rank", int),
        ("main-process-ip", str),
        ("main-process-port", int),
        ("num-experts", int),
    ):
        check.add_argument(f"--{flag}", type=kind)
    args = parser.parse_args(argv)
    try:
        if args.command == "nodes":
            print("\n".join(expand_nodelist(args.nodelist)))
            return 0
        settings = load_yaml_mapping(args.accelerate_config)
        for key in ("num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"):
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        check_launch_settings(settings, source=args.accelerate_config)
        ds_file = (settings.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file and args.num_experts:
            check_parallel_config(
                read_json_config(ds_file),
                world_size=settings.get("num_processes", 1),
                num_experts=args.num_experts,
                source=ds_file,
            )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
