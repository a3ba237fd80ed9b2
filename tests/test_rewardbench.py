"""RewardBench evaluation: section arithmetic, win and tie rules, RewardBench 2 scoring, the leaderboard file layout,
bad input, and the CLI end to end on the bundled samples with a tiny random DBRX reward model."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import DbrxForCausalLM, PreTrainedTokenizerFast

from dbrx_tune.evals.rewardbench import cli as rewardbench
from dbrx_tune.evals.rewardbench.benchmark_data import PairExample, load_benchmark, load_prior_sets
from dbrx_tune.evals.rewardbench.evaluation import evaluate_pairs
from dbrx_tune.evals.rewardbench.export import format_section_table, normalize_model_name, write_leaderboard_files
from dbrx_tune.evals.rewardbench.scoring import DpoRewardScorer
from dbrx_tune.evals.rewardbench.sections import (
    V1_EXAMPLE_COUNTS,
    V1_SECTIONS,
    best_of_n_result,
    pairwise_result,
    ties_score,
    v1_sections,
    v2_sections,
)
from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.seq_cls import DbrxForSequenceClassification, save_reward_model
from dbrx_tune.rewards.loader import load_reward_model
from dbrx_tune.rewards.scorer import RewardModelScorer, check_tokenizer_matches, format_conversation

SAMPLES = Path(__file__).resolve().parents[1] / "dbrx_tune" / "data" / "samples"
V1_SAMPLE = SAMPLES / "rewardbench_v1_sample.jsonl"
V2_SAMPLE = SAMPLES / "rewardbench_v2_sample.jsonl"
PRIOR_SAMPLE = SAMPLES / "rewardbench_prior_sets_sample.jsonl"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 320  # byte-level test tokenizer: 256 bytes + 4 specials, padded up


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level tokenizer with DBRX's special-token names and a ChatML template (no downloads)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML,
    )


def tiny_config(tokenizer, **overrides):
    values = dict(
        vocab_size=VOCAB,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
        n_layers=1,
    )
    values.update(overrides)
    return tiny_dbrx_config(**values)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_rm")
    save_reward_model(DbrxForSequenceClassification(tiny_config(tokenizer)), tokenizer, path)
    return path


@pytest.fixture(scope="module")
def causal_lm_dirs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(f"tiny_lm{seed}")
        DbrxForCausalLM(tiny_config(tokenizer)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


# --- section arithmetic -------------------------------------------------------------------------------------------


def test_v1_sections_weight_subsets_by_official_example_counts():
    report = v1_sections({"alpacaeval-easy": 1.0, "mt-bench-easy": 0.5, "math-prm": 1.0, "hep-python": 0.0})
    assert report.sections["Chat"] == pytest.approx((1.0 * 100 + 0.5 * 28) / (100 + 28))
    # math-prm counts 984 (upweighted from 447 to equal the six code subsets of 164)
    assert report.sections["Reasoning"] == pytest.approx(984 / (984 + 164))
    assert set(report.sections) == {"Chat", "Reasoning"}
    assert report.overall == pytest.approx((report.sections["Chat"] + report.sections["Reasoning"]) / 2)
    assert "refusals-dangerous" in report.missing and "alpacaeval-easy" not in report.missing


def test_v1_official_constants_cover_23_subsets_in_four_sections():
    members = [s for subsets in V1_SECTIONS.values() for s in subsets]
    assert sorted(members) == sorted(V1_EXAMPLE_COUNTS) and len(members) == 23
    assert V1_EXAMPLE_COUNTS["math-prm"] == sum(
        V1_EXAMPLE_COUNTS[f"hep-{lang}"] for lang in ("cpp", "go", "java", "js", "python", "rust")
    )


def test_prior_sets_are_the_plain_mean_of_four_sets_and_weigh_half_a_section():
    full = {s: 1.0 for s in V1_EXAMPLE_COUNTS}
    prior = {"anthropic_helpful": 1.0, "anthropic_hhh": 0.5, "shp": 0.0, "summarize": 0.5, "anthropic_harmless": 0.0}
    report = v1_sections(full, prior)
    assert report.sections["Prior Sets"] == pytest.approx(0.5)  # anthropic_harmless is not part of it
    assert report.overall == pytest.approx((4 * 2 * 1.0 + 1 * 0.5) / 9)
    assert report.missing == [] and report.unknown == {}


def test_strict_win_rule_counts_ties_as_losses():
    assert pairwise_result(1.0, 0.5) == 1
    assert pairwise_result(0.5, 0.5) == 0
    assert pairwise_result(0.4, 0.5) == 0

    class Constant:
        def score(self, prompts, responses, desc=""):
            return [3.0] * len(responses)

    pairs = [
        PairExample(
            id=str(i), subset="alpacaeval-easy", prompt=[{"role": "user", "content": "q"}], chosen="a", rejected="b"
        )
        for i in range(3)
    ]
    result = evaluate_pairs(Constant(), byte_tokenizer(), pairs)
    assert result.accuracies == {"alpacaeval-easy": 0.0}


def test_v2_best_of_four_credit_is_shared_among_tied_maxima():
    assert best_of_n_result([2.0, 1.0, 0.0, -1.0]) == 1.0
    assert best_of_n_result([2.0, 2.0, 0.0, -1.0]) == 0.5
    assert best_of_n_result([2.0, 2.0, 2.0, 2.0]) == 0.25
    assert best_of_n_result([1.0, 2.0, 0.0, -1.0]) == 0.0


def test_ties_score_combines_accuracy_and_margins_as_rewardbench2():
    ids = ["ref:0", "tied:0", "ref:1", "tied:1"]
    scores = [[5.0, 1.0, 2.0, 3.0], [5.0, 4.0, 1.0, 2.0], [1.0, 3.0, 0.0], [3.0, 1.0, 2.0]]
    num_correct = [1, 2, 1, 2]
    # prompt 0: ref margin 5-3=2 (accurate); tied margin 4-2=2 > spread 5-4=1 (accurate, preferred, hard-preferred)
    # prompt 1: ref margin 1-3=-2; tied margin 1-2=-1, spread 2: nothing holds
    expected = 0.3 * 0.5 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * (math.tanh(2 / 1 - 1) + math.tanh(-2 / 2 - 1)) / 2
    assert ties_score(ids, scores, num_correct) == pytest.approx(expected)


def test_ties_rows_need_ref_or_tied_ids():
    with pytest.raises(ValueError, match="id='prompt-3'"):
        ties_score(["prompt-3"], [[1.0, 0.0]], [1])


def test_v2_overall_is_the_mean_of_the_six_subsets_and_unknown_subsets_stay_out():
    accuracies = {
        "Factuality": 0.2,
        "Precise IF": 0.4,
        "Math": 0.6,
        "Safety": 0.8,
        "Focus": 1.0,
        "Ties": 0.0,
        "my-extra": 1.0,
    }
    report = v2_sections(accuracies)
    assert report.overall == pytest.approx((0.2 + 0.4 + 0.6 + 0.8 + 1.0 + 0.0) / 6)
    assert report.unknown == {"my-extra": 1.0} and "my-extra" not in report.sections


def test_unknown_v1_subsets_are_scored_and_reported_separately():
    report = v1_sections({"alpacaeval-easy": 1.0, "my-domain": 0.0})
    assert report.unknown == {"my-domain": 0.0}
    assert report.subsets["my-domain"] == 0.0
    assert report.sections == {"Chat": 1.0} and report.overall == 1.0
    table = format_section_table(report, "t")
    assert "Unknown subsets" in table and "my-domain" in table.split("Unknown subsets")[1]


# --- leaderboard files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected", "warns"),
    [
        ("databricks/dbrx-rm", "databricks/dbrx-rm", False),
        ("dbrx-rm", "local/dbrx-rm", True),
        ("outputs/runs/dbrx-rm", "runs/dbrx-rm", True),
        ("/abs/path/to/rm/", "to/rm", True),
    ],
)
def test_model_names_are_normalised_to_org_slash_model(given, expected, warns, caplog):
    with caplog.at_level(logging.WARNING, logger="dbrx_tune.evals.rewardbench.export"):
        assert normalize_model_name(given) == expected
    assert bool(caplog.records) == warns


def test_leaderboard_files_have_rewardbench_layout_and_key_names(tmp_path):
    table = {
        "text_chosen": ["c"],
        "text_rejected": ["r"],
        "results": [1],
        "subset": ["hep-go"],
        "id": ["7"],
        "scores_chosen": [0.3],
        "scores_rejected": [0.1],
    }
    results_path, scores_path = write_leaderboard_files(
        tmp_path, "org/rm", model_type="Seq. Classifier", accuracies={"hep-go": 1.0}, scores_table=table
    )
    assert results_path == tmp_path / "eval-set" / "org" / "rm.json"
    assert scores_path == tmp_path / "eval-set-scores" / "org" / "rm.json"
    results = json.loads(results_path.read_text())
    assert results == {"model": "org/rm", "model_type": "Seq. Classifier", "chat_template": "tokenizer", "hep-go": 1.0}
    scores = json.loads(scores_path.read_text())
    assert set(scores) == set(table) | {"model", "model_type", "chat_template"}
    assert results_path.read_text().startswith('{\n    "chat_template"')  # indent 4, sorted keys as RewardBench

    dpo_results, dpo_scores = write_leaderboard_files(
        tmp_path, "org/rm", model_type="DPO Ref. Free", accuracies={"hep-go": 1.0}, scores_table=table, prior_sets=True
    )
    assert dpo_results == tmp_path / "pref-sets" / "org" / "rm_ref_free.json"
    assert dpo_scores == tmp_path / "pref-sets-scores" / "org" / "rm_ref_free.json"
    assert json.loads(dpo_results.read_text())["ref_model"] is None


# --- bad input ----------------------------------------------------------------------------------------------------


def test_missing_columns_are_reported_with_file_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*missing column\(s\) \['subset'\]"):
        load_benchmark(str(path))


def test_bad_row_is_reported_with_row_and_id(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "subset": "hep-go", "id": 1},
        {"prompt": "", "chosen": "a", "rejected": "b", "subset": "hep-go", "id": 2},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 1 \(id=2\).*empty prompt"):
        load_benchmark(str(path))


def test_schema_mismatch_is_an_error():
    with pytest.raises(ValueError, match="--schema v2 given"):
        load_benchmark(str(V1_SAMPLE), "v2")


def test_bundled_samples_load_in_both_schemas():
    schema1, pairs = load_benchmark(str(V1_SAMPLE))
    schema2, best_of_n = load_benchmark(str(V2_SAMPLE))
    assert (schema1, schema2) == ("v1", "v2")
    assert {p.subset for p in pairs} == set(V1_EXAMPLE_COUNTS)
    assert {e.subset for e in best_of_n} == {"Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties"}
    prior = load_prior_sets([str(PRIOR_SAMPLE)])
    assert {p.subset for p in prior} == {"anthropic_helpful", "anthropic_hhh", "shp", "summarize"}
    assert any(len(p.prompt) == 3 for p in prior)  # a multi-turn prompt


def test_prior_sets_saved_with_one_split_per_set_take_the_split_name(tmp_path):
    import datasets

    def split(subsubset):
        return datasets.Dataset.from_list(
            [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", "subset": subsubset}]
        )

    datasets.DatasetDict({"shp": split("askscience"), "summarize": split("tldr")}).save_to_disk(tmp_path / "prefs")
    assert sorted(p.subset for p in load_prior_sets([str(tmp_path / "prefs")])) == ["shp", "summarize"]


def test_missing_dataset_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_benchmark(str(tmp_path / "nope.jsonl"))


def test_malformed_jsonl_line_is_reported_with_file_and_line_number(tmp_path):
    lines = V1_SAMPLE.read_text().splitlines()
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join([*lines[:3], '{"prompt": "cut off', *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 4 is not valid JSON"):
        load_benchmark(str(path))
    path.write_text("\n".join([*lines[:2], "[1, 2]"]) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 3 is a JSON list, not an object"):
        load_benchmark(str(path))


def test_cli_refuses_an_output_dir_that_is_a_file_before_scoring(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(rewardbench, "build_scorer", lambda args: pytest.fail("a model was loaded"))
    taken = tmp_path / "results"
    taken.write_text("not a directory")
    code = rewardbench.main(["--model", str(tmp_path), "--dataset", str(V1_SAMPLE), "--output-dir", str(taken)])
    assert code == 2
    assert f"--output-dir {taken}: {taken} is a file, not a directory" in caplog.text
    assert taken.read_text() == "not a directory"


def test_cli_names_a_missing_model_directory_in_one_line(tmp_path, caplog):
    missing = tmp_path / "no-such-model"
    code = rewardbench.main(["--model", str(missing), "--dataset", str(V1_SAMPLE), "--output-dir", str(tmp_path)])
    assert code == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert errors == [f"--model {missing}: no such directory"]


def test_model_without_score_head_is_rejected(causal_lm_dirs):
    with pytest.raises(ValueError, match=r"is not a reward model: its architectures are \['DbrxForCausalLM'\]"):
        load_reward_model(str(causal_lm_dirs[0]))


def test_reward_model_checkpoint_missing_its_score_weights_is_rejected(reward_model_dir, tmp_path):
    """A *ForSequenceClassification config whose weights lack `score`: transformers would initialise the head at
    random; the loader refuses it after loading, naming the missing weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "headless_rm"
    shutil.copytree(reward_model_dir, broken)
    (weights,) = broken.glob("*.safetensors")
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not k.startswith("score.")}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no trained score head \(missing \['score.weight'\]"):
        load_reward_model(str(broken))


def test_tokenizer_larger_than_the_embedding_is_rejected(tokenizer):
    model = DbrxForSequenceClassification(tiny_config(tokenizer, vocab_size=200, pad_token_id=0))
    with pytest.raises(ValueError, match="token ids up to 259 but tiny-rm embeds only 200"):
        check_tokenizer_matches(tokenizer, model, "tiny-rm")


def test_tokenizer_without_chat_template_is_rejected(tokenizer):
    plain = byte_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        check_tokenizer_matches(plain, DbrxForSequenceClassification(tiny_config(tokenizer)), "tiny-rm")


# --- end to end ---------------------------------------------------------------------------------------------------


def _score_text(model_dir: Path, tokenizer, text: str) -> float:
    model = load_reward_model(str(model_dir))
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits[0, 0].item()


def test_cli_scores_v1_sample_with_prior_sets_and_writes_leaderboard_files(
    reward_model_dir, tokenizer, tmp_path, capsys
):
    code = rewardbench.main(
        [
            "--model",
            str(reward_model_dir),
            "--dataset",
            str(V1_SAMPLE),
            "--prior-sets",
            str(PRIOR_SAMPLE),
            "--model-name",
            "dbrx-tune/tiny-rm",
            "--output-dir",
            str(tmp_path),
            "--batch-size",
            "16",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "eval-set/dbrx-tune/tiny-rm.json").read_text())
    scores = json.loads((tmp_path / "eval-set-scores/dbrx-tune/tiny-rm.json").read_text())
    prior = json.loads((tmp_path / "pref-sets/dbrx-tune/tiny-rm.json").read_text())
    assert results["model"] == "dbrx-tune/tiny-rm" and results["model_type"] == "Seq. Classifier"
    assert set(results) - {"model", "model_type", "chat_template"} == set(V1_EXAMPLE_COUNTS)
    assert set(prior) - {"model", "model_type", "chat_template"} == {
        "anthropic_helpful",
        "anthropic_hhh",
        "shp",
        "summarize",
    }
    # run_rm.py's types: int ids (the dataset's), int results, each score a one-element list
    assert all(isinstance(i, int) for i in scores["id"]) and all(r in (0, 1) for r in scores["results"])
    assert all(type(r) is int for r in scores["results"])
    for key in ("scores_chosen", "scores_rejected"):
        assert all(isinstance(v, list) and len(v) == 1 and isinstance(v[0], float) for v in scores[key])
    assert set(scores) == {
        "id",
        "results",
        "scores_chosen",
        "scores_rejected",
        "subset",
        "text_chosen",
        "text_rejected",
        "model",
        "model_type",
        "chat_template",
    }
    # accuracies follow from the per-example scores under the strict win rule
    for subset in V1_EXAMPLE_COUNTS:
        rows = [i for i, s in enumerate(scores["subset"]) if s == subset]
        wins = [scores["scores_chosen"][i][0] > scores["scores_rejected"][i][0] for i in rows]
        assert results[subset] == pytest.approx(sum(wins) / len(wins))
        assert [scores["results"][i] for i in rows] == [int(w) for w in wins]
    # a stored score is the model's score of the stored chat-templated text, scored alone (no batching/padding)
    first = scores["text_chosen"][0]
    assert first == format_conversation(
        tokenizer,
        [{"role": "user", "content": json.loads(V1_SAMPLE.read_text().splitlines()[0])["prompt"]}],
        json.loads(V1_SAMPLE.read_text().splitlines()[0])["chosen"],
    )
    assert scores["scores_chosen"][0][0] == pytest.approx(_score_text(reward_model_dir, tokenizer, first), abs=1e-5)

    printed = capsys.readouterr().out
    report = v1_sections(
        {k: v for k, v in results.items() if k in V1_EXAMPLE_COUNTS},
        {k: v for k, v in prior.items() if k not in ("model", "model_type", "chat_template")},
    )
    for section in ("Chat", "Chat Hard", "Safety", "Reasoning", "Prior Sets"):
        assert f"{100 * report.sections[section]:6.2f}" in printed.split(section, 1)[1].splitlines()[0]
    assert f"{100 * report.overall:6.2f}" in printed


def test_cli_scores_v2_sample_with_ties_subset(reward_model_dir, tokenizer, tmp_path):
    code = rewardbench.main(
        [
            "--model",
            str(reward_model_dir),
            "--dataset",
            str(V2_SAMPLE),
            "--model-name",
            "tiny-rm",
            "--output-dir",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "eval-set/local/tiny-rm.json").read_text())
    scores = json.loads((tmp_path / "eval-set-scores/local/tiny-rm.json").read_text())
    # run_v2.py's types: string ids, each completion's score a one-element list
    assert all(isinstance(i, str) for i in scores["id"])
    assert all(len(cell) == 1 and isinstance(cell[0], float) for row in scores["scores"] for cell in row)
    flat = [[cell[0] for cell in row] for row in scores["scores"]]
    ties_rows = [i for i, s in enumerate(scores["subset"]) if s == "Ties"]
    assert ties_rows and all(scores["results"][i] is None for i in ties_rows)
    assert results["Ties"] == pytest.approx(
        ties_score(
            [scores["id"][i] for i in ties_rows],
            [flat[i] for i in ties_rows],
            [scores["num_correct"][i] for i in ties_rows],
        )
    )
    math_rows = [i for i, s in enumerate(scores["subset"]) if s == "Math"]
    assert all(len(flat[i]) == 4 for i in math_rows)
    assert results["Math"] == pytest.approx(sum(best_of_n_result(flat[i]) for i in math_rows) / len(math_rows))


def test_cli_reports_unknown_subsets_without_dropping_them(reward_model_dir, tmp_path, capsys):
    data = tmp_path / "custom.jsonl"
    rows = [
        {"prompt": "q1", "chosen": "good", "rejected": "bad", "subset": "hep-go", "id": 0},
        {"prompt": "q2", "chosen": "fine", "rejected": "worse", "subset": "my-domain", "id": 1},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        rewardbench.main(
            [
                "--model",
                str(reward_model_dir),
                "--dataset",
                str(data),
                "--model-name",
                "o/m",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "eval-set/o/m.json").read_text())
    assert set(results) - {"model", "model_type", "chat_template"} == {"hep-go", "my-domain"}
    assert "Unknown subsets" in capsys.readouterr().out


def test_cli_fails_clearly_on_a_causal_lm_without_score_head(causal_lm_dirs, tmp_path, caplog):
    code = rewardbench.main(
        ["--model", str(causal_lm_dirs[0]), "--dataset", str(V1_SAMPLE), "--output-dir", str(tmp_path)]
    )
    assert code == 2
    assert "is not a reward model" in caplog.text and "--ref-model" in caplog.text


def test_long_conversations_are_truncated_from_the_left(reward_model_dir, tokenizer, caplog):
    prompt, response = [{"role": "user", "content": "a long question " * 20}], "the answer"
    full_ids = tokenizer(format_conversation(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
    scorer = RewardModelScorer(load_reward_model(str(reward_model_dir)), tokenizer, max_length=16)
    with caplog.at_level(logging.WARNING, logger="dbrx_tune.evals.rewardbench.scoring"):
        (encoded,) = scorer.encode([prompt], [response])
    assert encoded == full_ids[-16:] and len(full_ids) > 16
    assert "truncated from the left" in caplog.text
    with torch.no_grad():
        direct = scorer.model(torch.tensor([encoded])).logits[0, 0].item()
    assert scorer.score([prompt], [response]) == [pytest.approx(direct, abs=1e-6)]


# --- DPO implicit reward ------------------------------------------------------------------------------------------


def _response_logprob(model_dir: Path, tokenizer, prompt, response) -> tuple[float, int]:
    """Sum of log p(response token | everything before it), one unpadded sequence, token by token."""
    model = DbrxForCausalLM.from_pretrained(model_dir).eval()
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = format_conversation(tokenizer, prompt, response)
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    total = sum(logprobs[len(prompt_ids) + k - 1, token].item() for k, token in enumerate(response_ids))
    return total, len(response_ids)


def test_dpo_implicit_reward_is_policy_minus_reference_logprob_of_the_response(causal_lm_dirs, tokenizer):
    policy_dir, ref_dir = causal_lm_dirs
    policy, reference = (DbrxForCausalLM.from_pretrained(p).eval() for p in causal_lm_dirs)
    prompts = [
        [{"role": "user", "content": "Name a colour."}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
    ]
    responses = ["Blue.", "2 + 2 = 4, because adding two and two gives four."]

    rewards = DpoRewardScorer(policy, tokenizer, reference=reference, batch_size=2).score(prompts, responses)
    ref_free_avg = DpoRewardScorer(policy, tokenizer, batch_size=2).score(prompts, responses)
    same_model = DpoRewardScorer(policy, tokenizer, reference=policy, batch_size=2).score(prompts, responses)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        policy_logp, n_tokens = _response_logprob(policy_dir, tokenizer, prompt, response)
        ref_logp, _ = _response_logprob(ref_dir, tokenizer, prompt, response)
        assert rewards[i] == pytest.approx(policy_logp - ref_logp, abs=1e-4)
        assert ref_free_avg[i] == pytest.approx(policy_logp / n_tokens, abs=1e-4)
        assert same_model[i] == 0.0


def test_cli_reference_free_dpo_writes_ref_free_files(causal_lm_dirs, tmp_path):
    code = rewardbench.main(
        [
            "--model",
            str(causal_lm_dirs[0]),
            "--dataset",
            str(V2_SAMPLE),
            "--reference-free",
            "--model-name",
            "org/dpo",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "eval-set/org/dpo_ref_free.json").read_text())
    assert results["model_type"] == "DPO Ref. Free" and results["ref_model"] is None
    assert (tmp_path / "eval-set-scores/org/dpo_ref_free.json").is_file()
