"""Writing results in the RewardBench leaderboard's layout, and printing the section table.

The layout is the one RewardBench's runners save and upload (github.com/allenai/reward-bench, `scripts/run_rm.py`,
`scripts/run_v2.py`, `scripts/run_dpo.py`, `rewardbench/utils.py::save_to_hub`):
- `eval-set/<org>/<model>.json`: one object with `model`, `model_type`, `chat_template` (plus `ref_model` for DPO)
  and one accuracy per subset; `pref-sets/...` likewise for the prior sets.
- `eval-set-scores/<org>/<model>.json`: the per-example table as columns (`datasets.Dataset.to_dict()`), in the
  writers' types (`official_scores_layout`): v1 classifiers have `text_chosen`, `text_rejected`, int `results`,
  `subset`, int `id`, `scores_chosen` and `scores_rejected` as one-element lists; DPO has no `id` and float scores;
  v2 has `text`, `scores` (per completion a one-element list, chosen first), `results` (null for Ties rows),
  `subset`, string `id`, `num_correct`; plus `model`, `model_type`, `chat_template`.
Files are JSON with indent 4 and sorted keys, as RewardBench writes them. Reference-free DPO results get the
`_ref_free` suffix RewardBench uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dbrx_tune.evals.rewardbench.sections import SectionReport

logger = logging.getLogger(__name__)

MODEL_TYPE_CLASSIFIER = "Seq. Classifier"
MODEL_TYPE_DPO = "DPO"
MODEL_TYPE_DPO_REF_FREE = "DPO Ref. Free"
REF_FREE_SUFFIX = "_ref_free"
CHAT_TEMPLATE_FROM_TOKENIZER = "tokenizer"
DEFAULT_ORG = "local"


def normalize_model_name(name: str) -> str:
    """`org/model` as the leaderboard expects it; other shapes are repaired with a warning.

    No slash (a bare name) gets the org `local`; more than one slash (a filesystem path) keeps its last two parts.
    """
    parts = [p for p in name.strip().replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"model name {name!r} is empty; pass --model-name org/model")
    if len(parts) == 2 and name.count("/") == 1:
        return name
    fixed = f"{DEFAULT_ORG}/{parts[0]}" if len(parts) == 1 else f"{parts[-2]}/{parts[-1]}"
    logger.warning(
        "model name %r is not of the form org/model; results are saved as %r (set --model-name to choose)", name, fixed
    )
    return fixed


def _write(path: Path, payload: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=4, sort_keys=True))
    logger.info("wrote %s", path)
    return path


def _dataset_id(value: Any) -> Any:
    """RewardBench v1's ids are the dataset's ints; ids of other data (strings) are kept as they are."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def official_scores_layout(table: Mapping[str, list], model_type: str) -> dict[str, list]:
    """The per-example table with the types RewardBench's writers give each column.

    run_rm.py (classifiers): int `id`, int `results`, each score a one-element list (`[[0.3], ...]`: its pipeline
    returns one list per example); run_dpo.py: no `id` column, float scores; run_v2.py (a `text` column): string
    `id`, each completion's score a one-element list."""
    out = dict(table)
    if "text" in out:  # v2
        out["scores"] = [[[score] for score in row] for row in out["scores"]]
        out["id"] = [str(value) for value in out["id"]]
        return out
    out["results"] = [int(result) for result in out["results"]]
    if model_type == MODEL_TYPE_CLASSIFIER:
        out["id"] = [_dataset_id(value) for value in out["id"]]
        for key in ("scores_chosen", "scores_rejected"):
            out[key] = [[score] for score in out[key]]
    else:
        out.pop("id", None)
    return out


def leaderboard_paths(
    output_dir: str | Path, model_name: str, *, prior_sets: bool = False, ref_free: bool = False
) -> tuple[Path, Path]:
    """(accuracies file, per-example scores file) for `model_name` (already normalised)."""
    stem = model_name + (REF_FREE_SUFFIX if ref_free else "")
    results_dir, scores_dir = ("pref-sets", "pref-sets-scores") if prior_sets else ("eval-set", "eval-set-scores")
    root = Path(output_dir)
    return root / results_dir / f"{stem}.json", root / scores_dir / f"{stem}.json"


def write_leaderboard_files(
    output_dir: str | Path,
    model_name: str,
    *,
    model_type: str,
    accuracies: Mapping[str, float],
    scores_table: Mapping[str, list],
    ref_model: str | None = None,
    prior_sets: bool = False,
) -> tuple[Path, Path]:
    """Write the accuracies and the per-example scores of one run; returns both paths."""
    header: dict[str, Any] = {
        "model": model_name,
        "model_type": model_type,
        "chat_template": CHAT_TEMPLATE_FROM_TOKENIZER,
    }
    if model_type != MODEL_TYPE_CLASSIFIER:
        header["ref_model"] = ref_model
    clash = set(header) & set(accuracies)
    if clash:
        raise ValueError(f"subset name(s) {sorted(clash)} collide with the leaderboard's metadata keys")
    results_path, scores_path = leaderboard_paths(
        output_dir, model_name, prior_sets=prior_sets, ref_free=model_type == MODEL_TYPE_DPO_REF_FREE
    )
    _write(results_path, {**header, **accuracies})
    scores_header = {k: header[k] for k in ("model", "model_type", "chat_template")}
    if model_type != MODEL_TYPE_CLASSIFIER:
        scores_header["model_type"] = MODEL_TYPE_DPO  # run_dpo.py writes "DPO" in the scores file, ref-free too
    _write(scores_path, {**official_scores_layout(scores_table, model_type), **scores_header})
    return results_path, scores_path


def format_section_table(report: SectionReport, title: str) -> str:
    """A plain-text table: per-subset accuracy under each section, section scores, then the overall score."""
    lines = [title, "=" * len(title)]
    width = max([len(s) for s in report.subsets] + [len("Overall"), 12]) + 2
    for name, score in report.sections.items():
        lines.append(f"{name:<{width}}{100 * score:6.2f}")
    if report.overall is not None:
        lines.append(f"{'Overall':<{width}}{100 * report.overall:6.2f}")
    lines.append("")
    lines.append("Per subset")
    for name, score in report.subsets.items():
        if name not in report.unknown:
            lines.append(f"  {name:<{width}}{100 * score:6.2f}")
    if report.unknown:
        lines.append("Unknown subsets (scored, not in any section or the overall score)")
        for name, score in report.unknown.items():
            lines.append(f"  {name:<{width}}{100 * score:6.2f}")
    if report.missing:
        lines.append(
            "Not in the dataset (scores are not comparable with the leaderboard): " + ", ".join(report.missing)
        )
    return "\n".join(lines)
