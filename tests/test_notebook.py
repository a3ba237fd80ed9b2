"""notebooks/dbrx_vs_llama2.ipynb runs top to bottom on a CPU offline, and shows what it claims to show.

The notebook ends by printing `SUMMARY {json}`, the values its cells computed; the assertions read those values, so
each one fails if the behaviour the notebook demonstrates changes (the RoPE fix, the TRL aux-loss sync, expert LoRA,
ZeRO-3 leaves, the two SFT runs).
"""

from __future__ import annotations

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "dbrx_vs_llama2.ipynb")
CELL_TIMEOUT_S = 300


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _stdout(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def _tagged(notebook, tag: str):
    return next(cell for cell in _code_cells(notebook) if tag in cell.metadata.get("tags", []))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed from a temporary copy, with the repository root as working directory."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    copy_path = tmp_path_factory.mktemp("notebook") / "dbrx_vs_llama2.ipynb"
    nbformat.write(notebook, copy_path)
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
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
    summary_line = next(line for line in _stdout(_tagged(notebook, "summary")).splitlines() if line.startswith("SUMMARY "))
    return notebook, json.loads(summary_line[len("SUMMARY "):])


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
    assert 0 < summary["recipe_lines_changed"] < summary["recipe_lines"]
    for name, losses in summary["losses"].items():
        assert len(losses) >= 2, name
        assert losses[-1] < losses[0], f"{name}: training loss did not decrease: {losses}"
