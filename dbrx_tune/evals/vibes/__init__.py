"""Vibe checks: fixed prompts answered while a model trains, scored per category, and a report page.

Practitioners judge a fine-tune by watching the answers to a fixed set of prompts change over training. This
package makes that a recipe key: `vibe_prompts` / `vibe_steps` make every stage answer the prompts on a schedule,
log per-category scores next to the loss, and append the answers to `OUTPUT_DIR/vibes.jsonl`;
`python -m dbrx_tune.evals.vibes OUTPUT_DIR [...]` turns one or more runs into a self-contained HTML page.
"""
