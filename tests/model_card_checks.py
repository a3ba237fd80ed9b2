"""`check_model_card`: what every output directory's README.md must hold, shared by the model-card unit tests and
the end-to-end stage tests (imported as `model_card_checks`: tests/ is on the path of every test module)."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard

from dbrx_tune.training.model_card import STAGE_TAGS

SECTIONS = ("## Base model", "## Recipe", "## Training data", "## Results", "## How to load")


def check_model_card(
    output_dir: str,
    stage: str,
    *,
    library: str,
    base_model: str | None,
    dbrx: bool = True,
    merged: bool = False,
    metrics: dict | None = None,
) -> ModelCard:
    """Load `output_dir/README.md` with huggingface_hub and check its front matter, its sections and that it shows
    each of `metrics` (what the run reported) with its value; returns the card."""
    card = ModelCard.load(os.path.join(output_dir, "README.md"))
    data = card.data
    assert data.base_model == base_model
    assert data.library_name == library
    assert data.pipeline_tag == ("text-classification" if stage == "reward_model" else "text-generation")
    tags = set(data.tags)
    assert {"dbrx-tune", STAGE_TAGS.get(stage, stage)} <= tags, tags
    assert ("dbrx" in tags) == dbrx and ("merged" in tags) == merged, tags
    for section in SECTIONS:
        assert section in card.text, section
    for key, value in (metrics or {}).items():
        assert f"| `{key}` | {value:.4g} |" in card.text, key
    return card
