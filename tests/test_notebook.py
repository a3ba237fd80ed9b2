"""notebooks/dbrx_vs_llama2.ipynb runs top to bottom on a CPU offline, and shows what it claims to show.

The notebook ends by printing `SUMMARY {json}`, the values its cells computed; the assertions read those values, so
each one fails if the behaviour the notebook demonstrates changes (the RoPE fix, the TRL aux-loss sync, expert LoRA,
ZeRO-3 leaves, the recipes' diff, trainable parameters and memory plans at real size, the two measured SFT runs).
Figures and tables are checked in the cells that promise them (by tag).
"""

from __future__ import annotations

import json
import math
import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or executes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "dbrx_vs_llama2.ipynb")
CELL_TIMEOUT_S = 300


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _stdout(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def _tagged(notebook, tag: str):
    return next(cell for cell in _code_cells(notebook) if tag in cell.metadata.get("tags", []))


def _rich(cell, mime: str) -> list[str]:
    """The `mime` payloads (image/png, text/html, ...) a cell displayed."""
    return [out["data"][mime] for out in cell.get("outputs", []) if mime in out.get("data", {})]


FIGURE_CELLS = ("trainable", "memory", "fig_loss", "fig_speed")
TABLE_CELLS = ("models", "dbrx_needs", "trainable", "memory", "run_table")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed from a temporary copy, with the repository root as working directory."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    copy_path = tmp_path_factory.mktemp("notebook") / "dbrx_vs_llama2.ipynb"
    nbformat.write(notebook, copy_path)
    # TMPDIR: the notebook's training runs write their checkpoints under pytest's temporary directory.
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TMPDIR": str(copy_path.parent)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(
            notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": REPO_ROOT}}
        )
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    summary_line = next(
        line for line in _stdout(_tagged(notebook, "summary")).splitlines() if line.startswith("SUMMARY ")
    )
    return notebook, json.loads(summary_line[len("SUMMARY ") :])


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(_code_cells(notebook)):
        assert cell.outputs == [], f"code cell {index} has committed outputs; strip them before committing"
        assert cell.execution_count is None, f"code cell {index} has an execution_count"


def test_notebook_runs_without_errors(executed):
    notebook, _ = executed
    for index, cell in enumerate(_code_cells(notebook)):
        errors = [out for out in cell.outputs if out.get("output_type") == "error"]
        assert not errors, f"code cell {index}: {errors[0].get('ename')}: {errors[0].get('evalue')}"


def test_notebook_shows_stock_rope_base_wrong_for_dbrx_and_corrected_by_loader(executed):
    notebook, summary = executed
    assert summary["rope_theta_stock"] == 10000.0
    assert summary["rope_theta_ours"] == 500000.0
    assert summary["rope_theta_llama"] == 10000.0
    assert "dbrx_tune load_dbrx_config:            500000.0" in _stdout(_tagged(notebook, "rope"))


def test_notebook_shows_trl_crash_and_router_term_after_sync(executed):
    _, summary = executed
    assert summary["trl_stock_error"] == "AttributeError"
    assert summary["router_term"] > 0
    assert summary["router_term"] == pytest.approx(summary["router_term_expected"], rel=1e-4, abs=1e-6)


def test_notebook_counts_4bit_coverage_and_per_expert_lora(executed):
    _, summary = executed
    assert summary["linear_share_dbrx"] < 0.05 < 0.95 < summary["linear_share_llama"]
    assert summary["dbrx_active"] < summary["llama_total"] < summary["dbrx_total"]
    assert summary["ours_expert_lora"] > summary["stock_expert_lora"]


def test_notebook_registers_one_zero3_leaf_per_dbrx_layer(executed):
    _, summary = executed
    assert summary["zero3_mode"] == "zero3_leaf"
    assert summary["zero3_leaves"] == summary["n_layers"]


def test_same_recipe_trains_both_tiny_models(executed):
    _, summary = executed
    for name, run in summary["run"].items():
        losses = run["losses"]
        assert len(losses) >= 2, name
        assert losses[-1] < losses[0], f"{name}: training loss did not decrease: {losses}"


def test_notebook_has_a_papermill_parameters_cell_defaulting_to_the_cpu_run(executed):
    notebook, summary = executed
    parameters = _tagged(notebook, "parameters")
    assert 'DEVICE = "auto"' in parameters.source and 'SIZE = "tiny"' in parameters.source
    assert summary["size"] == "tiny" and summary["device"] in ("cpu", "cuda")


def test_notebook_draws_every_figure_it_promises(executed):
    notebook, _ = executed
    for tag in FIGURE_CELLS:
        assert len(_rich(_tagged(notebook, tag), "image/png")) == 1, f"cell {tag!r} drew no figure"
    all_figures = sum(len(_rich(cell, "image/png")) for cell in _code_cells(notebook))
    assert all_figures == len(FIGURE_CELLS)


def test_notebook_shows_every_table_it_promises(executed):
    notebook, _ = executed
    for tag in TABLE_CELLS:
        assert any("<table" in html for html in _rich(_tagged(notebook, tag), "text/html")), f"cell {tag!r}: no table"


def test_notebook_diffs_the_real_and_tiny_recipes(executed):
    notebook, summary = executed
    for kind in ("real", "tiny"):
        assert 0 < summary[f"recipe_{kind}"]["changed"] < summary[f"recipe_{kind}"]["lines"], kind
    assert {"moe_loss_weight", "experts_implementation"} <= set(summary["dbrx_only_keys"])
    shown = _stdout(_tagged(notebook, "recipe_diff"))
    assert "recipes/dbrx_sft.yaml -> recipes/llama2_sft.yaml" in shown and "-deepspeed: " in shown


def test_notebook_counts_trainable_parameters_at_real_size(executed):
    _, summary = executed
    trainable = summary["trainable"]
    assert summary["trainable_planner_agrees"]
    for model in ("DBRX 132B", "Llama 2 70B", "Llama 2 7B"):
        attention = trainable[f"{model} | LoRA, attention"]
        assert 0 < attention < trainable[f"{model} | LoRA, attention + experts / MLP"] < trainable[f"{model} | full"]
    assert trainable["DBRX 132B | full"] == summary["dbrx_total"]


def test_notebook_plans_memory_and_gpus_for_each_method(executed):
    _, summary = executed
    min_gpus, per_gpu = summary["min_gpus"], summary["per_gpu_gb"]
    assert min_gpus["DBRX 132B | full"] > min_gpus["Llama 2 70B | full"] > min_gpus["Llama 2 7B | full"] >= 1
    assert min_gpus["DBRX 132B | full + EP 8"] <= min_gpus["DBRX 132B | full"]
    for model in ("DBRX 132B", "Llama 2 70B", "Llama 2 7B"):
        assert per_gpu[f"{model} | LoRA"] < per_gpu[f"{model} | full"], model
        assert 0 < per_gpu[f"{model} | QLoRA"] < per_gpu[f"{model} | full"], model


def test_notebook_measures_both_tiny_runs_side_by_side(executed):
    _, summary = executed
    runs = summary["run"]
    assert set(runs) == {"DBRX", "Llama 2"} and summary["memory_measure"]
    for name, run in runs.items():
        assert run["tokens_per_s"] > 0 and run["peak_memory_mb"] > 0, name
        assert math.isfinite(run["eval_loss"]), name
    dbrx_active, llama_active = runs["DBRX"]["active_params"], runs["Llama 2"]["active_params"]
    assert llama_active == pytest.approx(dbrx_active, rel=0.01)  # the twins are matched on active parameters


def test_notebook_shows_both_models_answering_every_vibe_prompt(executed):
    notebook, summary = executed
    from dbrx_tune.evals.vibes.prompts import load_vibe_prompts

    n_prompts = len(load_vibe_prompts("default"))
    assert set(summary["vibes"]) == {"dbrx", "llama2"}
    for name, vibes in summary["vibes"].items():
        assert len(vibes["steps"]) == 1 and vibes["answers"] == n_prompts and vibes["errors"] == 0, name
    page = "".join(out.get("data", {}).get("text/html", "") for out in _tagged(notebook, "vibes").outputs)
    assert "<iframe srcdoc=" in page and "Vibe checks" in page
