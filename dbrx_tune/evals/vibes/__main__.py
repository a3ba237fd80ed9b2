"""`python -m dbrx_tune.evals.vibes OUTPUT_DIR [OTHER_OUTPUT_DIR ...]` (or `dbrx-vibes`): write the vibe-check
report of one or more runs."""

from __future__ import annotations

import argparse

from dbrx_tune.evals.vibes.report import LAYOUTS, REPORT_FILE, VibesInputError, write_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dbrx_tune.evals.vibes",
        description="Turn the vibes.jsonl of one or more runs into a self-contained HTML page.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="OUTPUT_DIR",
        help="a run's output directory holding vibes.jsonl, or the path of a .jsonl file",
    )
    parser.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help=f"where to write the page (default: {REPORT_FILE} in the first OUTPUT_DIR)",
    )
    parser.add_argument(
        "--by", choices=LAYOUTS, help="columns per step (default for one run) or per run (default for several runs)"
    )
    parser.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="one column per run, showing its check at step N instead of its last check",
    )
    args = parser.parse_args(argv)
    try:
        written = write_report(args.paths, output=args.output, by=args.by, step=args.step)
    except (VibesInputError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    print(written)


if __name__ == "__main__":
    main()
