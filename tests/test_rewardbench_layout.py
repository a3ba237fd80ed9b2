"""The per-example scores files in the types allenai's writers give each column (run_rm.py, run_dpo.py)."""

import json

from dbrx_tune.evals.rewardbench.export import (
    MODEL_TYPE_CLASSIFIER,
    MODEL_TYPE_DPO_REF_FREE,
    write_leaderboard_files,
)

TABLE = {
    "text_chosen": ["a", "b"],
    "text_rejected": ["c", "d"],
    "results": [True, False],
    "subset": ["alpacaeval-easy", "hep-go"],
    "id": ["30", "4127"],
    "scores_chosen": [0.5, -1.0],
    "scores_rejected": [0.25, 2.0],
}


def test_classifier_scores_file_matches_run_rm(tmp_path):
    _, scores_path = write_leaderboard_files(
        tmp_path, "org/rm", model_type=MODEL_TYPE_CLASSIFIER, accuracies={"hep-go": 0.0}, scores_table=TABLE
    )
    scores = json.loads(scores_path.read_text())
    assert scores["id"] == [30, 4127] and scores["results"] == [1, 0]
    assert scores["scores_chosen"] == [[0.5], [-1.0]] and scores["scores_rejected"] == [[0.25], [2.0]]
    assert scores["model_type"] == "Seq. Classifier"
    assert not scores_path.read_text().endswith("\n")  # json.dumps(indent=4, sort_keys=True), as save_to_hub


def test_dpo_scores_file_matches_run_dpo(tmp_path):
    results_path, scores_path = write_leaderboard_files(
        tmp_path, "org/policy", model_type=MODEL_TYPE_DPO_REF_FREE, accuracies={"hep-go": 0.0}, scores_table=TABLE
    )
    scores = json.loads(scores_path.read_text())
    assert "id" not in scores and scores["scores_chosen"] == [0.5, -1.0] and scores["results"] == [1, 0]
    assert scores["model_type"] == "DPO"  # run_dpo.py writes "DPO" in the scores file, reference-free too
    summary = json.loads(results_path.read_text())
    assert summary["model_type"] == "DPO Ref. Free" and summary["ref_model"] is None
    assert results_path.name == "policy_ref_free.json"


def test_ties_margin_equal_to_the_spread_is_not_preferred_as_upstream():
    """process_single_model compares `margin > spread` strictly: a margin equal to the spread earns neither margin
    term (a planted `>=` passed the earlier tests)."""
    from dbrx_tune.evals.rewardbench.sections import ties_score

    ids, num_correct = ["ref:0", "tied:0"], [1, 2]
    equal = [[3.0, 1.0], [5.0, 3.0, 1.0]]  # ref margin 2; tied margin 3 - 1 = 2 = spread 5 - 3
    assert ties_score(ids, equal, num_correct) == 0.3 + 0.3  # both accurate; tanh(2 / 2 - 1) = 0
    above = [[3.5, 1.0], [5.0, 3.0, 0.5]]  # margins 2.5 > spread 2
    assert ties_score(ids, above, num_correct) > 0.3 + 0.3 + 0.2 + 0.2
