"""RewardBench evaluation and leaderboard export for DBRX (and any other) reward models.

    python -m dbrx_tune.evals.rewardbench --model PATH --dataset FILE_OR_HUB_ID [--prior-sets FILE ...]
        [--schema v1|v2|auto] [--model-name org/model] [--output-dir DIR]
        [--ref-model PATH | --reference-free] [--batch-size N] [--max-length N] [--device D] [--dtype T]

Scores a sequence-classification reward model (or a DPO policy through its implicit reward) on a RewardBench v1
or RewardBench 2 dataset, prints the section table, and writes `eval-set/<org>/<model>.json` and
`eval-set-scores/<org>/<model>.json` (and `pref-sets*/` for prior sets) under --output-dir, ready to attach to a
leaderboard submission. Datasets and models are read from local paths; hub ids work for users online.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from dbrx_tune.args import ModelArguments
from dbrx_tune.build import DTYPES, load_causal_lm
from dbrx_tune.evals.rewardbench.benchmark_data import load_benchmark, load_prior_sets
from dbrx_tune.evals.rewardbench.evaluation import EvalResult, evaluate_best_of_n, evaluate_pairs
from dbrx_tune.evals.rewardbench.export import (
    MODEL_TYPE_CLASSIFIER,
    MODEL_TYPE_DPO,
    MODEL_TYPE_DPO_REF_FREE,
    format_section_table,
    normalize_model_name,
    write_leaderboard_files,
)
from dbrx_tune.evals.rewardbench.scoring import DpoRewardScorer
from dbrx_tune.evals.rewardbench.sections import SectionReport, v1_sections, v2_sections
from dbrx_tune.rewards.loader import load_eval_tokenizer, load_reward_model
from dbrx_tune.rewards.scorer import RewardModelScorer, check_tokenizer_matches

logger = logging.getLogger("dbrx_tune.evals.rewardbench.cli")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dbrx_tune.evals.rewardbench", description=__doc__.split("\n\n")[2])
    parser.add_argument("--model", required=True, help="reward model (or DPO policy) directory or hub id")
    parser.add_argument(
        "--dataset",
        required=True,
        help="RewardBench data: .json/.jsonl/.parquet file, saved dataset directory, or hub id "
        "(allenai/reward-bench, allenai/reward-bench-2)",
    )
    parser.add_argument(
        "--prior-sets",
        nargs="+",
        default=None,
        metavar="FILE_OR_HUB_ID",
        help="prior preference sets (v1 only; e.g. allenai/pref-test-sets or one file per set)",
    )
    parser.add_argument(
        "--schema",
        choices=("v1", "v2", "auto"),
        default="auto",
        help="dataset layout; auto: v2 when 'chosen' holds lists",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer to use instead of the model's own")
    parser.add_argument(
        "--model-name", default=None, help="leaderboard name org/model (default: --model, normalised to org/model)"
    )
    parser.add_argument("--output-dir", default="results", help="where eval-set/ and eval-set-scores/ are written")
    parser.add_argument("--ref-model", default=None, help="reference model: score --model as a DPO policy")
    parser.add_argument(
        "--reference-free",
        action="store_true",
        help="score --model as a DPO policy without a reference (see --ref-free-norm)",
    )
    parser.add_argument(
        "--ref-free-norm",
        choices=("avg", "sum", "norm"),
        default="avg",
        help="reference-free reward: mean (RewardBench's default), sum or -L2 norm of the response log-probs",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-length",
        type=int,
        default=2048,
        help="tokens per conversation; longer ones lose their oldest tokens (left truncation)",
    )
    parser.add_argument(
        "--device",
        default="auto" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda:N, or auto (spread the model over all visible GPUs)",
    )
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    args = parser.parse_args(argv)
    if args.ref_model and args.reference_free:
        parser.error("--ref-model and --reference-free exclude each other")
    if args.batch_size < 1 or args.max_length < 2:
        parser.error("--batch-size must be >= 1 and --max-length >= 2")
    return args


NOT_A_REWARD_MODEL = (
    "Train a reward model with reward_models/train.py, or score a DPO policy with --ref-model PATH or --reference-free."
)


def load_policy_model(path: str, *, dtype: str, device: str):
    """A causal LM (a DPO policy or its reference) in eval mode, through the toolkit's loader; `device` as for
    `from_pretrained`'s `device_map`."""
    return load_causal_lm(ModelArguments(model_name_or_path=path, dtype=dtype), device_map=device).eval()


def build_scorer(args: argparse.Namespace) -> tuple[RewardModelScorer | DpoRewardScorer, PreTrainedTokenizerBase, str]:
    """(scorer, tokenizer, leaderboard model_type) for the requested kind of model."""
    tokenizer = load_eval_tokenizer(args.model, args.tokenizer)
    if args.ref_model or args.reference_free:
        policy = load_policy_model(args.model, dtype=args.dtype, device=args.device)
        check_tokenizer_matches(tokenizer, policy, args.model)
        reference = None
        if args.ref_model:
            reference = load_policy_model(args.ref_model, dtype=args.dtype, device=args.device)
            check_tokenizer_matches(tokenizer, reference, args.ref_model)
        scorer = DpoRewardScorer(
            policy,
            tokenizer,
            reference=reference,
            ref_free_norm=args.ref_free_norm,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
        return scorer, tokenizer, MODEL_TYPE_DPO if reference is not None else MODEL_TYPE_DPO_REF_FREE
    model = load_reward_model(
        args.model,
        ModelArguments(model_name_or_path=args.model, dtype=args.dtype),
        device_map=args.device,
        hint=NOT_A_REWARD_MODEL,
    )
    check_tokenizer_matches(tokenizer, model, args.model)
    scorer = RewardModelScorer(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    return scorer, tokenizer, MODEL_TYPE_CLASSIFIER


def check_paths(args: argparse.Namespace) -> None:
    """Refuse an --output-dir that cannot take the leaderboard files and local model paths that do not exist, before
    anything is loaded or scored (a missing local model otherwise reaches the hub client as a bad repo id)."""
    output = Path(args.output_dir)
    blocking = next((part for part in (output, *output.parents) if part.exists() and not part.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--output-dir {args.output_dir}: {blocking} is a file, not a directory; choose another")
    for flag, value in (("--model", args.model), ("--ref-model", args.ref_model), ("--tokenizer", args.tokenizer)):
        if value and not os.path.exists(value) and value.startswith((".", os.sep, "~")):
            raise FileNotFoundError(f"{flag} {value}: no such directory")


def run(args: argparse.Namespace) -> SectionReport:
    """Evaluate, write the leaderboard files, print the table; returns the section report."""
    check_paths(args)
    # Data first: a malformed dataset fails before any model is loaded.
    schema, examples = load_benchmark(args.dataset, args.schema)
    if args.prior_sets and schema != "v1":
        raise ValueError("--prior-sets belong to RewardBench v1; the dataset has the v2 layout")
    prior_examples = load_prior_sets(args.prior_sets) if args.prior_sets else []
    model_name = normalize_model_name(args.model_name or args.model)

    scorer, tokenizer, model_type = build_scorer(args)
    if schema == "v1":
        main: EvalResult = evaluate_pairs(scorer, tokenizer, examples)
        prior = evaluate_pairs(scorer, tokenizer, prior_examples, desc="Prior Sets") if prior_examples else None
        report = v1_sections(main.accuracies, prior.accuracies if prior else None)
    else:
        main = evaluate_best_of_n(scorer, tokenizer, examples)
        prior = None
        report = v2_sections(main.accuracies)

    ref_model = args.ref_model
    write_leaderboard_files(
        args.output_dir,
        model_name,
        model_type=model_type,
        accuracies=main.accuracies,
        scores_table=main.table,
        ref_model=ref_model,
    )
    if prior is not None:
        write_leaderboard_files(
            args.output_dir,
            model_name,
            model_type=model_type,
            accuracies=prior.accuracies,
            scores_table=prior.table,
            ref_model=ref_model,
            prior_sets=True,
        )
    if report.unknown:
        logger.warning(
            "subsets outside RewardBench's sections (scored, reported separately): %s", ", ".join(report.unknown)
        )
    if report.missing:
        logger.warning("official subsets missing from the dataset: %s", ", ".join(report.missing))
    title = f"{'RewardBench' if schema == 'v1' else 'RewardBench 2'}: {model_name} ({model_type})"
    print(format_section_table(report, title))
    print(f"\nLeaderboard files under {args.output_dir}/")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as err:  # bad input, missing files, a hub id that cannot be fetched: one line
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
