"""Whether and where a step splits into two DBO micro-batches, and each micro-batch's share.

A step's tokens are flat, request after request. The split cuts that flat range in two halves of
(nearly) equal token count; a prefill that straddles the cut is itself cut: its first part goes to
micro-batch 0 (queries and KV up to the cut), its rest to micro-batch 1, whose queries attend to
the KV micro-batch 0 wrote (micro-batch 0 always runs a layer's attention first). Decode requests
have one token, so a cut never lands inside one. Outputs join back by concatenating the two
micro-batches' token rows, which restores the unsplit step's order.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.contracts.config import DBOThresholds


@dataclass(frozen=True)
class UBatchSlice:
    rows: range  # scheduled request rows with at least one token in this micro-batch
    tokens: range  # the part of the step's flat token range it holds


def plan_ubatches(query_lens: list[int], thresholds: DBOThresholds) -> list[UBatchSlice] | None:
    """Two micro-batch slices when the step reaches its threshold, else None (run it whole)."""
    if not query_lens:
        return None
    total = sum(query_lens)
    decode_only = max(query_lens) == 1
    threshold = thresholds.decode_tokens if decode_only else thresholds.prefill_tokens
    if total < threshold:
        return None
    cut = (total + 1) // 2
    start = 0
    for row, q_len in enumerate(query_lens):
        end = start + q_len
        if end >= cut:
            break
        start = end
    # ``row`` holds token ``cut - 1``; it is cut in two unless it ends exactly at the cut.
    first = UBatchSlice(range(0, row + 1), range(0, cut))
    second_row = row + 1 if end == cut else row
    second = UBatchSlice(range(second_row, len(query_lens)), range(cut, total))
    return [first, second]


def cuts_a_request(split: list[UBatchSlice]) -> bool:
    """Whether a request straddles the cut: then micro-batch 1 attends to KV micro-batch 0 writes in
    the same step, so their device work must run in order (decode-only splits never cut)."""
    return split[0].rows.stop > split[1].rows.start


def slice_lens(query_lens: list[int], seq_lens: list[int], part: UBatchSlice) -> tuple[list[int], list[int]]:
    """Query and KV lengths of ``part``'s requests: a cut request's KV ends where its part ends."""
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    q_out, s_out = [], []
    for row in part.rows:
        lo = max(starts[row], part.tokens.start)
        hi = min(starts[row + 1], part.tokens.stop)
        q_out.append(hi - lo)
        s_out.append(seq_lens[row] - (starts[row + 1] - hi))
    return q_out, s_out
