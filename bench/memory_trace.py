"""What is alive at the CUDA memory peak of a code region, by the Python line that allocated it.

`torch.cuda.memory._record_memory_history` logs every allocation and free with its Python stack; replaying that log
finds the moment of the highest total and lists the blocks alive then, grouped by their allocation site. The
memory-snapshot viewer shows the same as a picture; this writes a small JSON a benchmark can keep beside its numbers.
Only allocations made while recording count, so the totals are above the memory alive when recording began (the
weights, for a training step).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections import defaultdict

import torch

_SKIPPED = ("/torch/", "/contextlib.py", "/functools.py", "bench/memory_trace.py")


def _short(filename: str) -> str:
    """The file's path below the longest `sys.path` entry holding it (the package path, not the install root)."""
    for root in sorted((entry.rstrip("/") + "/" for entry in sys.path if entry), key=len, reverse=True):
        if filename.startswith(root):
            return filename[len(root) :]
    return filename


def _site(frames: list[dict], depth: int) -> str:
    """The `depth` innermost frames outside torch's own files, innermost first: where a block came from."""
    kept = [frame for frame in frames if not any(part in frame["filename"] for part in _SKIPPED)]
    sites = [f"{_short(frame['filename'])}:{frame['line']} {frame['name']}" for frame in kept[:depth]]
    return " <- ".join(sites) or "(torch internals)"


def peak_composition(snapshot: dict, depth: int = 3, top: int = 25) -> dict:
    """Replay the allocator trace of device 0; the blocks alive at the highest total, largest sites first (GB)."""
    events = [event for event in snapshot["device_traces"][0] if event["action"] in ("alloc", "free_completed")]
    alive, total, best, best_index = {}, 0, 0, -1
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            alive[event["addr"]] = event["size"]
            total += event["size"]
            if total > best:
                best, best_index = total, index
        elif event["addr"] in alive:
            total -= alive.pop(event["addr"])
    alive_at_peak = {}
    for event in events[: best_index + 1]:
        if event["action"] == "alloc":
            alive_at_peak[event["addr"]] = event
        else:
            alive_at_peak.pop(event["addr"], None)
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in alive_at_peak.values():
        entry = by_site[_site(event.get("frames", []), depth)]
        entry[0] += event["size"]
        entry[1] += 1
    ranked = sorted(by_site.items(), key=lambda item: -item[1][0])
    peak_event = events[best_index] if best_index >= 0 else {"frames": []}
    return {
        "peak_above_start_gb": round(best / 1e9, 3),
        "peak_allocation_site": _site(peak_event.get("frames", []), 6),
        "blocks_alive": len(alive_at_peak),
        "sites": [{"gb": round(size / 1e9, 3), "blocks": count, "site": site} for site, (size, count) in ranked[:top]],
    }


@contextlib.contextmanager
def record_peak_composition(path: str, max_entries: int = 2_000_000):
    """Record the allocator history inside the block; write `peak_composition` of it to `path` as JSON."""
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=max_entries)
    try:
        yield
    finally:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(peak_composition(snapshot), handle, indent=2)
