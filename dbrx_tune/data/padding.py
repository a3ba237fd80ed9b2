"""Padding token-id rows into a batch: the one helper every scorer and trainer of the toolkit pads with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, *, side: Literal["left", "right"] = "right", width: int | None = None
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(input_ids, attention_mask), each (len(rows), width), padded on `side` with `pad_id`.

    Left padding keeps every row's end at the same column (prompts that generation continues); right padding keeps
    every row's start there (sequences scored as a whole). `width` defaults to the longest row.
    """
    width = max(len(row) for row in rows) if width is None else width
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        span = slice(width - n, width) if side == "left" else slice(0, n)
        input_ids[i, span] = torch.as_tensor(list(row), dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask
