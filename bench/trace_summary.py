"""Where the GPU time of a profiled training step goes: busy and idle time per CUDA stream, from a Chrome trace.

Summed kernel times (the profiler's table) cannot tell a collective that moves data from one that waits for the
other rank, nor compute that overlaps communication from compute that waits for it. The timeline can: this reads
the trace `torch.profiler` exports and reports, for the stream that runs the model's kernels (the busiest one),
how much of the profiled wall time it is busy, how its idle time splits into "an NCCL kernel is running on another
stream" (waiting for communication), "nothing runs on the GPU" (the host is late: launch overhead or a host
synchronisation) and "other (non-NCCL) kernels run on other streams", its kernel time by kind, and what the host
was doing while the GPU was empty (CPU operators and CUDA runtime calls overlapping those gaps, by name; nested
operators each count).

    python bench/trace_summary.py TRACE.json [--json OUT]
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict

KINDS = (  # first match wins, on the lower-cased kernel name
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "attention")),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "grouped_mm", "matmul")),
    ("triton", ("triton",)),
    ("optimizer", ("adam", "multi_tensor")),
    ("copy/fill", ("copy", "fill", "memcpy", "memset", "cat", "index", "gather", "scatter")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "elementwise/other"


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals as sorted, disjoint intervals."""
    union: list[list[float]] = []
    for start, end in sorted(intervals):
        if union and start <= union[-1][1]:
            union[-1][1] = max(union[-1][1], end)
        else:
            union.append([start, end])
    return [(start, end) for start, end in union]


def overlap(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of [start, end) covered by disjoint sorted `intervals`."""
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in intervals if a < end and b > start)


def _complement(intervals: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """The parts of [start, end) that disjoint sorted `intervals` leave uncovered."""
    gaps, cursor = [], start
    for a, b in intervals:
        if b <= cursor or a >= end:
            continue
        if a > cursor:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < end:
        gaps.append((cursor, end))
    return gaps


def _top_overlaps(trace: dict, category: str, gaps: list[tuple[float, float]], top: int = 12) -> dict[str, float]:
    """Host events of `category` by name, with the time (ms) they overlap `gaps`, largest first."""
    gaps = sorted(gaps)
    starts = [start for start, _ in gaps]
    totals: dict[str, float] = defaultdict(float)
    for event in trace.get("traceEvents", []):
        if event.get("ph") != "X" or event.get("cat") != category:
            continue
        begin, finish = event["ts"], event["ts"] + event.get("dur", 0)
        index = max(0, bisect.bisect_right(starts, begin) - 1)
        while index < len(gaps) and gaps[index][0] < finish:
            totals[event["name"][:80]] += max(0.0, min(finish, gaps[index][1]) - max(begin, gaps[index][0]))
            index += 1
    return {
        name: round(value * 1e-3, 2)
        for name, value in sorted(totals.items(), key=lambda item: -item[1])[:top]
        if value > 0
    }


def summarize(trace: dict) -> dict:
    events = [
        event
        for event in trace.get("traceEvents", [])
        if event.get("ph") == "X" and event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    if not events:
        raise SystemExit("no GPU kernels in this trace: was it recorded with ProfilerActivity.CUDA?")
    by_stream: dict[tuple, list[dict]] = defaultdict(list)
    for event in events:
        by_stream[(event.get("pid"), event.get("tid"))].append(event)
    device = max(
        {key[0] for key in by_stream},
        key=lambda pid: sum(e["dur"] for k, v in by_stream.items() if k[0] == pid for e in v),
    )
    streams = {key: value for key, value in by_stream.items() if key[0] == device}
    begin = min(e["ts"] for v in streams.values() for e in v)
    finish = max(e["ts"] + e["dur"] for v in streams.values() for e in v)
    wall = finish - begin
    busy = {key: merged([(e["ts"], e["ts"] + e["dur"]) for e in value]) for key, value in streams.items()}
    compute = max(streams, key=lambda key: sum(e["dur"] for e in streams[key] if kernel_kind(e["name"]) != "nccl"))
    nccl = merged(
        [
            (e["ts"], e["ts"] + e["dur"])
            for key, value in streams.items()
            if key != compute
            for e in value
            if kernel_kind(e["name"]) == "nccl"
        ]
    )
    anything = merged([interval for key in busy for interval in busy[key]])
    idle = _complement(busy[compute], begin, finish)
    empty = [gap for start, end in idle for gap in _complement(anything, start, end)]
    idle_total = sum(end - start for start, end in idle)
    idle_nccl = sum(overlap(nccl, start, end) for start, end in idle)
    idle_empty = sum(end - start for start, end in empty)
    host_during_empty = {
        category: _top_overlaps(trace, category, empty) for category in ("cpu_op", "cuda_runtime", "user_annotation")
    }
    kinds: dict[str, float] = defaultdict(float)
    names: dict[str, float] = defaultdict(float)
    for event in streams[compute]:
        kinds[kernel_kind(event["name"])] += event["dur"]
        names[event["name"][:90]] += event["dur"]
    nccl_names: dict[str, float] = defaultdict(float)
    for event in (event for value in streams.values() for event in value if kernel_kind(event["name"]) == "nccl"):
        nccl_names[event["name"][:60]] += event["dur"]
    ms = 1e-3
    return {
        "wall_ms": round(wall * ms, 2),
        "compute_stream": str(compute[1]),
        "compute_busy_ms": round(sum(end - start for start, end in busy[compute]) * ms, 2),
        "compute_idle_ms": round(idle_total * ms, 2),
        "idle_while_nccl_runs_ms": round(idle_nccl * ms, 2),
        "idle_while_gpu_empty_ms": round(idle_empty * ms, 2),
        "idle_while_other_streams_busy_ms": round((idle_total - idle_nccl - idle_empty) * ms, 2),
        "compute_kernel_ms_by_kind": {
            kind: round(value * ms, 2) for kind, value in sorted(kinds.items(), key=lambda item: -item[1])
        },
        "top_compute_kernels_ms": {
            name: round(value * ms, 2) for name, value in sorted(names.items(), key=lambda item: -item[1])[:15]
        },
        "host_while_gpu_empty_ms": host_during_empty,
        "streams_busy_ms": {
            str(key[1]): round(sum(end - start for start, end in value) * ms, 2) for key, value in busy.items()
        },
        "nccl_ms_by_kernel": {
            name: round(value * ms, 2) for name, value in sorted(nccl_names.items(), key=lambda item: -item[1])
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="Chrome trace JSON written by torch.profiler (export_chrome_trace)")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    with open(args.trace, encoding="utf-8") as handle:
        summary = summarize(json.load(handle))
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
