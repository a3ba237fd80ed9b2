"""Our RewardBench numbers and files against allenai's own code (the `rewardbench` 0.1.4 package on PyPI).

Installing the package would change this environment: it pins transformers==4.51.0 and imports fastchat, torch and
the hub client at import. So the wheel is downloaded from the package registry (no install, no dependencies), and
only its pure parts run here: `constants.py` (the example counts and section mapping) executed on its own, and the
functions `calculate_scores_per_section` and `save_to_hub` taken out of `utils.py` by their syntax tree and executed
with only the standard library they use. Nothing of it is copied into the project.
"""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Union

import pytest

from dbrx_tune.evals.rewardbench.export import MODEL_TYPE_CLASSIFIER, write_leaderboard_files
from dbrx_tune.evals.rewardbench.sections import V1_EXAMPLE_COUNTS, V1_SECTIONS, v1_sections

VERSION = "0.1.4"
CACHE = Path(__file__).parent / "artifacts" / f"rewardbench-{VERSION}"


def _wheel() -> Path:
    found = sorted(CACHE.glob("rewardbench-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"rewardbench=={VERSION}", "-d", str(CACHE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = sorted(CACHE.glob("rewardbench-*.whl"))
    if not found:
        message = f"could not download rewardbench=={VERSION} from the package registry: {done.stderr[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI has the registry: a failure there is a failure
        pytest.skip(message)
    return found[0]


@pytest.fixture(scope="module")
def official() -> dict[str, Any]:
    with zipfile.ZipFile(_wheel()) as wheel:
        constants_source = wheel.read("rewardbench/constants.py").decode()
        utils_source = wheel.read("rewardbench/utils.py").decode()
    namespace: dict[str, Any] = {}
    exec(compile(constants_source, "rewardbench/constants.py", "exec"), namespace)
    tree = ast.parse(utils_source)
    wanted = {"calculate_scores_per_section", "save_to_hub"}
    functions = ast.Module(
        body=[node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted],
        type_ignores=[],
    )
    namespace.update(json=json, os=os, Dict=Dict, List=List, Union=Union)
    exec(compile(functions, "rewardbench/utils.py", "exec"), namespace)
    assert wanted <= set(namespace)
    return namespace


def test_all_23_example_counts_and_the_sections_equal_the_official_constants(official):
    assert V1_EXAMPLE_COUNTS == official["EXAMPLE_COUNTS"]
    assert {section: list(members) for section, members in V1_SECTIONS.items()} == official["SUBSET_MAPPING"]


@pytest.mark.parametrize("seed", range(5))
def test_section_scores_equal_the_official_function(official, seed):
    rng = random.Random(seed)
    subsets = list(V1_EXAMPLE_COUNTS)
    present = subsets if seed == 0 else rng.sample(subsets, rng.randint(1, len(subsets)))
    accuracies = {subset: rng.random() for subset in present}
    ours = v1_sections(accuracies).sections
    theirs = official["calculate_scores_per_section"](
        official["EXAMPLE_COUNTS"], official["SUBSET_MAPPING"], accuracies
    )
    for section, score in theirs.items():
        if section in ours:
            assert ours[section] == pytest.approx(score, abs=1e-12), section
        else:  # the official helper reports 0 for a section with no subset present; we leave it out (missing)
            assert score == 0 and not any(s in accuracies for s in official["SUBSET_MAPPING"][section])


def test_our_files_are_byte_identical_to_the_official_writers_output(official, tmp_path, monkeypatch):
    table = {
        "text_chosen": ["a", "b"],
        "text_rejected": ["c", "d"],
        "results": [1, 0],
        "subset": ["hep-go", "hep-go"],
        "id": ["3", "4"],
        "scores_chosen": [0.5, -1.0],
        "scores_rejected": [0.25, 2.0],
    }
    results_path, scores_path = write_leaderboard_files(
        tmp_path / "ours", "org/rm", model_type=MODEL_TYPE_CLASSIFIER, accuracies={"hep-go": 0.5}, scores_table=table
    )
    monkeypatch.chdir(tmp_path)
    for path, target in ((results_path, "eval-set/"), (scores_path, "eval-set-scores/")):
        payload = json.loads(path.read_text())
        official["save_to_hub"](payload, "org/rm", target, local_only=True)
        assert path.read_bytes() == (tmp_path / "results" / target / "org" / "rm.json").read_bytes()
