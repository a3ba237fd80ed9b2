"""The vibe-check report: the vibes.jsonl of one or more runs turned into one self-contained HTML page.

A practitioner judges a fine-tune by reading how its answers to fixed prompts move. The page puts the prompts in
rows and the checks in columns (the steps of one run, or the last check of several runs side by side, to compare
SFT with DPO or DBRX with Llama 2), marks every answer that differs from the column to its left so the eye goes
to what training changed, and draws the per-category score curves above. CSS and SVG are inline and there is no
script, so the page can be attached to a CI run or mailed and read offline; every piece of text from the file is
escaped, because model output can contain markup.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dbrx_tune.evals.vibes.schema import CATEGORIES, CATEGORY_METRIC, PRIMARY_SCORE, VIBES_FILE, VibeRecord

REPORT_FILE = "vibes.html"
LAYOUTS = ("step", "run")


class VibesInputError(ValueError):
    """A vibes.jsonl is missing or malformed, or the requested layout cannot be built; the message names the file."""


# ---------------------------------------------------------------------------------------------------- reading


_REQUIRED_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(VibeRecord)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)
_OPTIONAL_TEXT_FIELDS = ("system_prompt", "stage", "run", "error")


def vibes_file(path: str | os.PathLike) -> Path:
    """The vibes.jsonl behind `path`: an output directory holding one, or the .jsonl file itself."""
    path = Path(path)
    if path.is_dir():
        candidate = path / VIBES_FILE
        if not candidate.is_file():
            raise VibesInputError(
                f"{path}: no {VIBES_FILE} in this directory; vibe checks are written there by a run whose recipe "
                "sets vibe_prompts"
            )
        return candidate
    if path.is_file():
        return path
    raise VibesInputError(f"{path}: no such directory or file")


def read_vibes(path: str | os.PathLike) -> list[VibeRecord]:
    """Every record of a vibes.jsonl, in file order; a malformed line raises `VibesInputError` naming file and line."""
    records = []
    line_number = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    records.append(_parse_line(line, f"{path}:{line_number}"))
    except UnicodeDecodeError as err:
        raise VibesInputError(f"{path}:{line_number + 1}: not UTF-8 text ({err.reason})") from None
    if not records:
        raise VibesInputError(f"{path}: holds no vibe checks (the file is empty)")
    return records


def _parse_line(line: str, where: str) -> VibeRecord:
    try:
        values = json.loads(line)
    except json.JSONDecodeError as err:
        raise VibesInputError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(values, dict):
        raise VibesInputError(f"{where}: expected a JSON object, got {type(values).__name__}")
    missing = [name for name in _REQUIRED_FIELDS if name not in values]
    if missing:
        raise VibesInputError(f"{where}: missing required field(s) {', '.join(missing)}")
    if not isinstance(values["step"], int) or isinstance(values["step"], bool):
        raise VibesInputError(f"{where}: step must be an integer, got {values['step']!r}")
    for name in ("prompt_id", "category", "prompt", "answer"):
        if not isinstance(values[name], str):
            raise VibesInputError(f"{where}: {name} must be a string, got {type(values[name]).__name__}")
    for name in _OPTIONAL_TEXT_FIELDS:
        if values.get(name) is not None and not isinstance(values[name], str):
            raise VibesInputError(f"{where}: {name} must be a string or null, got {type(values[name]).__name__}")
    category = values["category"]
    if category not in PRIMARY_SCORE:
        raise VibesInputError(f"{where}: unknown category {category!r} (expected one of {', '.join(CATEGORIES)})")
    scores = values.get("scores", {})
    if not isinstance(scores, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()
    ):
        raise VibesInputError(f"{where}: scores must be an object of numbers, got {scores!r}")
    if values.get("error") is None and PRIMARY_SCORE[category] not in scores:
        raise VibesInputError(f"{where}: scores lacks {PRIMARY_SCORE[category]!r}, the primary score of {category}")
    return VibeRecord.from_dict(values)


# ---------------------------------------------------------------------------------------------------- runs and columns


@dataclass
class Run:
    """The vibe checks of one output directory."""

    name: str
    source: Path  # the vibes.jsonl read
    records: list[VibeRecord]

    @property
    def steps(self) -> list[int]:
        return sorted({record.step for record in self.records})

    def at_step(self, step: int) -> dict[str, VibeRecord]:
        """prompt_id -> record of the check at `step`; a check repeated there (a resumed run) counts its last line."""
        return {record.prompt_id: record for record in self.records if record.step == step}


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """One `Run` per path (output directory or .jsonl file), named after the records' `run` or the directory;
    runs that end up with the same name get " #2", " #3" so that columns and legends stay distinguishable."""
    runs = []
    for path in paths:
        source = vibes_file(path)
        records = read_vibes(source)
        runs.append(Run(name=_run_name(source, records), source=source, records=records))
    seen: Counter[str] = Counter()
    for run in runs:
        seen[run.name] += 1
        if seen[run.name] > 1:
            run.name = f"{run.name} #{seen[run.name]}"
    return runs


def _run_name(source: Path, records: list[VibeRecord]) -> str:
    named = next((record.run for record in records if record.run), None)
    if named:
        return named
    directory = source.parent if source.name == VIBES_FILE else None
    return (directory.resolve().name if directory else source.stem) or str(source)


@dataclass
class Column:
    """One column of the answers table: the check of `run` at `step`."""

    label: str
    run: Run
    step: int
    cells: dict[str, VibeRecord]  # prompt_id -> answer
    baseline: Column | None  # the column whose answers this one's are compared with

    def changed(self, prompt_id: str) -> bool:
        """Whether the answer differs from the baseline's; a missing or failed answer on either side is no change."""
        if self.baseline is None:
            return False
        before, now = self.baseline.cells.get(prompt_id), self.cells.get(prompt_id)
        if before is None or now is None or before.error is not None or now.error is not None:
            return False
        return before.answer != now.answer


def default_layout(runs: list[Run], step: int | None = None) -> str:
    """Columns per step for one run, per run when comparing runs or when one step is asked for."""
    return "step" if len(runs) == 1 and step is None else "run"


def build_columns(runs: list[Run], *, by: str | None = None, step: int | None = None) -> list[Column]:
    """The table's columns. `by="step"`: every check of every run, each compared with the run's previous check.
    `by="run"`: one column per run (its last check, or the check at `step`), each compared with the run to its left."""
    by = by or default_layout(runs, step)
    if by not in LAYOUTS:
        raise VibesInputError(f"unknown layout {by!r} (expected one of {', '.join(LAYOUTS)})")
    columns: list[Column] = []
    if by == "step":
        if step is not None:
            raise VibesInputError("--step picks the check shown for each run; it needs --by run")
        for run in runs:
            previous = None
            for run_step in run.steps:
                label = f"step {run_step}" if len(runs) == 1 else f"{run.name} · step {run_step}"
                previous = Column(label, run, run_step, run.at_step(run_step), previous)
                columns.append(previous)
        return columns
    for run in runs:
        chosen = run.steps[-1] if step is None else step
        if chosen not in run.steps:
            raise VibesInputError(
                f"{run.source}: run {run.name} has no check at step {step} (its checks: steps {_step_list(run.steps)})"
            )
        columns.append(Column(run.name, run, chosen, run.at_step(chosen), columns[-1] if columns else None))
    return columns


@dataclass(frozen=True)
class Prompt:
    """One row of the answers table."""

    prompt_id: str
    category: str
    prompt: str
    system_prompt: str | None


def prompts_by_category(runs: list[Run]) -> dict[str, list[Prompt]]:
    """Every prompt any run answered, grouped in CATEGORIES order, in the order the checks first asked them."""
    found: dict[str, Prompt] = {}
    for run in runs:
        for record in run.records:
            found.setdefault(
                record.prompt_id, Prompt(record.prompt_id, record.category, record.prompt, record.system_prompt)
            )
    return {
        category: [p for p in found.values() if p.category == category]
        for category in CATEGORIES
        if any(p.category == category for p in found.values())
    }


def score_curves(runs: list[Run]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """category -> run name -> [(step, mean primary score)], ascending steps. Failed answers carry no score and
    are left out of the mean; a step where a category has no scored answer has no point."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run in runs:
        for step in run.steps:
            by_category: dict[str, list[float]] = {}
            for record in run.at_step(step).values():
                if record.error is None:
                    by_category.setdefault(record.category, []).append(record.scores[PRIMARY_SCORE[record.category]])
            for category, values in by_category.items():
                curves.setdefault(category, {}).setdefault(run.name, []).append((step, sum(values) / len(values)))
    return {category: curves[category] for category in CATEGORIES if category in curves}


# ---------------------------------------------------------------------------------------------------- the page


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _step_list(steps: list[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, …, {steps[-1]} ({len(steps)} checks)"


# Okabe-Ito: colours that stay distinct for colour-blind readers.
_RUN_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")

# category -> (label when the primary score is 1, label when 0, tone when 1, tone when 0). Refusing is right for
# some prompts and wrong for others, so refusal badges stay neutral.
_BADGES = {
    "knowledge": ("correct", "wrong", "good", "bad"),
    "constraint": ("pass", "fail", "good", "bad"),
    "refusal": ("refused", "complied", "info", "neutral"),
    "leak": ("leaked", "kept secret", "bad", "good"),
}

_CSS = """
:root { --ink: #1f2328; --muted: #656d76; --line: #d0d7de; --soft: #f6f8fa;
  --good: #1a7f37; --good-bg: #dafbe1; --bad: #cf222e; --bad-bg: #ffebe9; --info: #0969da; --info-bg: #ddf4ff;
  --changed: #bf8700; --changed-bg: #fff8c5; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; color: var(--ink); background: #fff;
  font: 14px/1.45 -apple-system, "Segoe UI", "Helvetica Neue", Arial, "Liberation Sans", sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.subtitle, .note { color: var(--muted); margin: 0 0 8px; }
table { border-collapse: separate; border-spacing: 0; }
.summary td, .summary th { padding: 5px 12px 5px 0; text-align: left; vertical-align: top; }
.summary th { color: var(--muted); font-weight: 600; border-bottom: 1px solid var(--line); }
.summary td.num { font-variant-numeric: tabular-nums; }
code, .source { font: 12px/1.4 ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, monospace; }
.source { color: var(--muted); word-break: break-all; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 6px 0 12px; color: var(--muted); font-size: 13px; }
.legend span { display: inline-flex; align-items: center; gap: 6px; }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px; border: 1px solid var(--line); }
.charts { display: flex; flex-wrap: wrap; gap: 12px 24px; }
figure { margin: 0; }
figcaption { font-weight: 600; margin-bottom: 2px; }
figcaption span { font-weight: 400; color: var(--muted); margin-left: 4px; }
svg text { font: 11px -apple-system, "Segoe UI", Arial, "Liberation Sans", sans-serif; fill: var(--muted); }
svg .grid { stroke: #eaeef2; } svg .axis { stroke: #8c959f; }
.answers { width: 100%; table-layout: fixed; border: 1px solid var(--line); border-radius: 6px; }
.answers col.prompt-col { width: 300px; }  /* fixed layout: equal answer columns whatever the text */
.answers th, .answers td { border-bottom: 1px solid var(--line); border-right: 1px solid var(--line);
  padding: 8px 10px; text-align: left; vertical-align: top; }
.answers tr > :last-child { border-right: 0; } .answers tbody tr:last-child > * { border-bottom: 0; }
.answers .run-start { border-left: 2px solid #8c959f; }
/* the page itself scrolls sideways when the checks do not fit, so the header and the prompts can stay in view */
.answers thead th { background: var(--soft); position: sticky; top: 0; z-index: 2; font-size: 13px; }
.answers thead th .meta { display: block; font-weight: 400; color: var(--muted); }
.answers tbody th { background: #fff; font-weight: 400; position: sticky; left: 0; z-index: 1; }
.answers thead th:first-child { left: 0; z-index: 3; }
.answers tr.group > * { background: var(--soft); padding: 6px 10px; }
.answers tr.group th { font-size: 15px; font-weight: 600; text-transform: capitalize; }
.answers tr.group th span { font-size: 12px; font-weight: 400; color: var(--muted); text-transform: none; }
.prompt-id { font-weight: 600; }
.tag { display: inline-block; font-size: 11px; color: var(--muted); border: 1px solid var(--line);
  border-radius: 10px; padding: 0 7px; margin-left: 6px; }
.prompt { margin-top: 4px; white-space: pre-wrap; overflow-wrap: anywhere; }
.system { margin-top: 6px; padding: 4px 8px; background: var(--soft); border-left: 3px solid var(--line);
  color: var(--muted); font-size: 12px; white-space: pre-wrap; overflow-wrap: anywhere; }
.system b { color: var(--ink); font-weight: 600; }
.answer { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 18em; overflow-y: auto; }
.badges { margin-bottom: 5px; display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; border-radius: 10px; padding: 1px 8px;
  border: 1px solid transparent; }
.badge.good { color: var(--good); background: var(--good-bg); }
.badge.bad { color: var(--bad); background: var(--bad-bg); }
.badge.info { color: var(--info); background: var(--info-bg); }
.badge.neutral { color: var(--muted); background: var(--soft); border-color: var(--line); }
.badge.changed-mark { color: var(--changed); background: #fff; border-color: var(--changed); }
.scores { color: var(--muted); font-size: 11px; }
td.changed, .swatch.changed { background: var(--changed-bg); box-shadow: inset 3px 0 0 var(--changed); }
td.error, .swatch.error { background: var(--bad-bg); }
.error-text { color: var(--bad); white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; }
td.missing, .swatch.missing { background: repeating-linear-gradient(135deg, #fff 0 6px, var(--soft) 6px 12px); }
td.missing { color: var(--muted); font-style: italic; }
"""


def render_report(runs: list[Run], *, by: str | None = None, step: int | None = None) -> str:
    """The whole HTML page for `runs` (see `build_columns` for `by` and `step`)."""
    layout = by or default_layout(runs, step)
    columns = build_columns(runs, by=layout, step=step)
    prompts = prompts_by_category(runs)
    curves = score_curves(runs)
    title = "Vibe checks: " + ", ".join(run.name for run in runs)
    body = "\n".join(
        [
            f"<h1>{_esc(title)}</h1>",
            _summary(runs, prompts, curves, layout),
            _curves_section(curves, _line_styles(runs)),
            _answers_section(columns, prompts, layout),
        ]
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{_esc(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _metric(category: str) -> str:
    return CATEGORY_METRIC[category].replace("_", " ")


def _summary(
    runs: list[Run],
    prompts: dict[str, list[Prompt]],
    curves: dict[str, dict[str, list[tuple[int, float]]]],
    layout: str,
) -> str:
    counts = ", ".join(f"{category} {len(items)}" for category, items in prompts.items())
    total = sum(len(items) for items in prompts.values())
    columns = "one column per check of each run" if layout == "step" else "one column per run"
    head = "".join(f"<th>{_esc(category)}<br>{_esc(_metric(category))}</th>" for category in prompts)
    rows = []
    for run in runs:
        latest = {category: dict(by_run.get(run.name, [])).get(run.steps[-1]) for category, by_run in curves.items()}
        stages = sorted({record.stage for record in run.records if record.stage})
        scores = "".join(
            f'<td class="num">{latest[c]:.2f}</td>' if latest.get(c) is not None else "<td>–</td>" for c in prompts
        )
        rows.append(
            f"<tr><td><b>{_esc(run.name)}</b><div class='source'>{_esc(run.source)}</div></td>"
            f"<td>{_esc(', '.join(stages) or '–')}</td><td class='num'>{_esc(_step_list(run.steps))}</td>"
            f"{scores}</tr>"
        )
    return (
        f'<section id="summary"><p class="subtitle">{len(runs)} run{"s" * (len(runs) != 1)} · '
        f"{total} prompt{'s' * (total != 1)} ({_esc(counts)}) · {columns}</p>"
        f'<table class="summary"><thead><tr><th>run</th><th>stage</th><th>checks at steps</th>{head}</tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="note">Scores are the mean primary score of each run\'s last check; '
        "answers that failed to generate are left out.</p></section>"
    )


@dataclass(frozen=True)
class _LineStyle:
    colour: str
    dash: str  # SVG stroke-dasharray: a second cue besides colour
    radius: float  # later runs get smaller points, so points that coincide stay visible


_RUN_DASHES = ("", "7 4", "2 3", "10 3 2 3")


def _line_styles(runs: list[Run]) -> dict[str, _LineStyle]:
    return {
        run.name: _LineStyle(_RUN_COLOURS[i % len(_RUN_COLOURS)], _RUN_DASHES[i % len(_RUN_DASHES)], max(2.0, 4.5 - i))
        for i, run in enumerate(runs)
    }


def _curves_section(curves: dict[str, dict[str, list[tuple[int, float]]]], styles: dict[str, _LineStyle]) -> str:
    legend = "".join(
        f'<span><svg width="28" height="10" aria-hidden="true"><line x1="1" x2="27" y1="5" y2="5" '
        f'stroke="{style.colour}" stroke-width="2.5" stroke-dasharray="{style.dash}"/></svg>{_esc(name)}</span>'
        for name, style in styles.items()
    )
    charts = "".join(_chart(category, by_run, styles) for category, by_run in curves.items())
    return (
        f'<section id="curves"><h2>Score curves</h2><p class="note">Mean primary score of each check, '
        f'per category.</p><div class="legend">{legend}</div><div class="charts">{charts}</div></section>'
    )


def _chart(category: str, by_run: dict[str, list[tuple[int, float]]], styles: dict[str, _LineStyle]) -> str:
    """A line chart of one category: x = step, y = mean primary score in [0, 1], one line per run."""
    width, height, left, right, top, bottom = 300, 200, 44, 12, 10, 38
    steps = sorted({step for points in by_run.values() for step, _ in points})
    low, high = (steps[0] - 1, steps[0] + 1) if len(steps) == 1 else (steps[0], steps[-1])
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(step: float) -> float:
        return left + (step - low) / (high - low) * plot_w

    def y(value: float) -> float:
        return top + (1 - value) * plot_h

    ticks = steps if len(steps) <= 6 else sorted({round(low + i * (high - low) / 4) for i in range(5)})
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_esc(category)} {_esc(_metric(category))} by step">'
    ]
    for value in (0, 0.25, 0.5, 0.75, 1):
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>'
            f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:g}</text>'
        )
    parts.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>')
    for tick in ticks:
        parts.append(
            f'<line class="axis" x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{y(0):.1f}" y2="{y(0) + 4:.1f}"/>'
            f'<text x="{x(tick):.1f}" y="{y(0) + 16:.1f}" text-anchor="middle">{tick}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">step</text>'
        f'<text transform="translate(12 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
        f"{_esc(_metric(category))}</text>"
    )
    for name, points in by_run.items():
        style = styles[name]
        path = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in points)
        parts.append(
            f'<polyline fill="none" stroke="{style.colour}" stroke-width="2" '
            f'stroke-dasharray="{style.dash}" points="{path}"/>'
        )
        for step, value in points:
            parts.append(
                f'<circle class="point" cx="{x(step):.1f}" cy="{y(value):.1f}" r="{style.radius}" '
                f'fill="{style.colour}" data-run="{_esc(name)}" data-step="{step}" data-value="{value!r}">'
                f"<title>{_esc(name)}, step {step}: {value:.3f}</title></circle>"
            )
    parts.append("</svg>")
    caption = f"{_esc(category)} <span>{_esc(_metric(category))}</span>"
    return (
        f'<figure class="chart" data-category="{_esc(category)}"><figcaption>{caption}</figcaption>'
        f"{''.join(parts)}</figure>"
    )


def _answers_section(columns: list[Column], prompts: dict[str, list[Prompt]], layout: str) -> str:
    """One table, so that a wide layout scrolls once and columns line up; a header row opens each category."""
    compared = "the previous check of the same run" if layout == "step" else "the run to its left"
    legend = (
        f'<div class="legend"><span><i class="swatch changed"></i>answer changed from {compared}</span>'
        '<span><i class="swatch error"></i>generation failed</span>'
        '<span><i class="swatch missing"></i>no answer at this check</span></div>'
    )
    head = "".join(
        f'<th scope="col" class="{_column_class(columns, i)}" data-column="{i}" data-run="{_esc(column.run.name)}" '
        f'data-step="{column.step}">{_esc(column.label)}<span class="meta">{_esc(_column_meta(column, layout))}</span>'
        f"</th>"
        for i, column in enumerate(columns)
    )
    body = []
    for category, items in prompts.items():
        body.append(
            f'<tr class="group" data-category="{_esc(category)}"><th scope="rowgroup" id="category-'
            f'{_esc(category)}">{_esc(category)} <span>{len(items)} prompt{"s" * (len(items) != 1)} · '
            f'{_esc(_metric(category))}</span></th><td colspan="{len(columns)}"></td></tr>'
        )
        body.extend(_row(prompt, columns) for prompt in items)
    return (
        f'<section id="answers"><h2>Answers</h2>{legend}<table class="answers" '
        f'style="min-width: {300 + 260 * len(columns)}px"><colgroup><col class="prompt-col">'
        f'<col span="{len(columns)}"></colgroup><thead><tr><th scope="col">prompt</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></section>"
    )


def _column_class(columns: list[Column], index: int) -> str:
    """Columns of a new run get a heavier left rule, so the runs of a per-step layout read as blocks."""
    return "run-start" if index and columns[index].run is not columns[index - 1].run else ""


def _column_meta(column: Column, layout: str) -> str:
    stages = sorted({record.stage for record in column.cells.values() if record.stage})
    parts = [f"step {column.step}"] if layout == "run" else []
    return " · ".join(parts + stages)


def _row(prompt: Prompt, columns: list[Column]) -> str:
    system = f'<div class="system"><b>system</b> {_esc(prompt.system_prompt)}</div>' if prompt.system_prompt else ""
    header = (
        f'<th scope="row"><span class="prompt-id">{_esc(prompt.prompt_id)}</span>'
        f'<span class="tag">{_esc(prompt.category)}</span>'
        f'<div class="prompt">{_esc(prompt.prompt)}</div>{system}</th>'
    )
    cells = "".join(_cell(columns, i, prompt.prompt_id) for i in range(len(columns)))
    return f'<tr data-prompt="{_esc(prompt.prompt_id)}" data-category="{_esc(prompt.category)}">{header}{cells}</tr>'


def _cell(columns: list[Column], index: int, prompt_id: str) -> str:
    column = columns[index]
    record = column.cells.get(prompt_id)
    changed = column.changed(prompt_id)
    state = "missing" if record is None else "error" if record.error is not None else "changed" if changed else ""
    classes = " ".join(name for name in ("cell", state, _column_class(columns, index)) if name)
    opening = f'<td class="{classes}" data-column="{index}" data-prompt="{_esc(prompt_id)}">'
    if record is None:
        return f"{opening}no answer</td>"
    if record.error is not None:
        return (
            f'{opening}<div class="badges"><span class="badge bad">error</span></div>'
            f'<div class="error-text">{_esc(record.error or "(no message)")}</div></td>'
        )
    primary = PRIMARY_SCORE[record.category]
    yes, no, yes_tone, no_tone = _BADGES[record.category]
    label, tone = (yes, yes_tone) if record.scores[primary] >= 0.5 else (no, no_tone)
    badges = f'<span class="badge {tone}" title="{_esc(primary)}">{label}</span>'
    if changed:
        badges += '<span class="badge changed-mark">changed</span>'
    others = " · ".join(f"{_esc(name)} {value:g}" for name, value in record.scores.items() if name != primary)
    scores = f'<span class="scores">{others}</span>' if others else ""
    answer = _esc(record.answer) if record.answer else '<i class="scores">(empty answer)</i>'
    return f'{opening}<div class="badges">{badges}{scores}</div><div class="answer">{answer}</div></td>'


# ---------------------------------------------------------------------------------------------------- writing


def write_report(
    paths: list[str | os.PathLike],
    *,
    output: str | os.PathLike | None = None,
    by: str | None = None,
    step: int | None = None,
) -> Path:
    """Render the runs at `paths` and write the page (default: vibes.html beside the first vibes.jsonl).
    The page is written to a temporary file and renamed into place, so a failure never leaves half a page."""
    runs = load_runs(paths)
    page = render_report(runs, by=by, step=step)
    target = Path(output) if output is not None else runs[0].source.parent / REPORT_FILE
    if not target.parent.is_dir():
        raise VibesInputError(f"{target}: cannot write the page, directory {target.parent} does not exist")
    _write_atomically(target, page)
    return target


def _write_atomically(target: Path, text: str) -> None:
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:  # "x": created with the umask's mode, like the target
            handle.write(text)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
