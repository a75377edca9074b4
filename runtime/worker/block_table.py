"""Block tables kept on the device across steps, each request in a row of its own, updated by diffs.

A request's block list only grows between its admission and its end (a new block every ``block_size``
tokens), so most steps change a few entries of a few rows. Rebuilding and copying the whole
[requests, max_blocks] table every step cost more host time than the rest of a large decode step's
input building; here the host sends only the new entries, and the step's table is gathered from the rows
on the device.
"""
from __future__ import annotations

import torch

from runtime.contracts.scheduler_output import ScheduledRequest
from runtime.platforms import current_platform


class PersistentBlockTable:
    def __init__(self, num_rows: int, max_blocks_per_seq: int, device: torch.device) -> None:
        # One row more than requests get: it stays zero, for a full graph's padded sequence rows.
        self.table = torch.zeros(num_rows + 1, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.zero_row = num_rows
        self.device = device
        # request id -> [its row, how many of its blocks are in the row already]
        self._rows: dict[str, list[int]] = {}
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def release(self, request_ids: list[str]) -> None:
        """Requests finished or preempted (a preempted request comes back with new blocks)."""
        for request_id in request_ids:
            entry = self._rows.pop(request_id, None)
            if entry is not None:
                self._free_rows.append(entry[0])

    def rows(self, scheduled: list[ScheduledRequest]) -> list[int]:
        """Each scheduled request's row, after writing the blocks it gained since it was last seen."""
        rows, diff_rows, diff_cols, diff_blocks = [], [], [], []
        for item in scheduled:  # runs for every request every step: one lookup, one comparison
            request = item.request
            entry = self._rows.get(request.request_id)
            if entry is None:
                entry = self._rows[request.request_id] = [self._take_row(scheduled), 0]
            row, written = entry
            blocks = request.block_ids
            if len(blocks) > written:
                diff_rows.extend([row] * (len(blocks) - written))
                diff_cols.extend(range(written, len(blocks)))
                diff_blocks.extend(blocks[written:])
                entry[1] = len(blocks)
            rows.append(row)
        if diff_rows:
            diff = current_platform.to_device(diff_rows + diff_cols + diff_blocks, torch.int64, self.device).view(3, -1)
            self.table[diff[0], diff[1]] = diff[2].to(torch.int32)
        return rows

    def _take_row(self, scheduled: list[ScheduledRequest]) -> int:
        if not self._free_rows:  # rows of requests that ended without a release yet: drop all not in this step
            keep = {item.request.request_id for item in scheduled}
            self.release([rid for rid in self._rows if rid not in keep])
        return self._free_rows.pop()
