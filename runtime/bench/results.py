"""One benchmark table: a fixed column list per subcommand, rows saved to ``--json`` as they arrive.

Every row of a table has the table's columns, blank (None) where a row has no value (a transformers
baseline has no graph pool), so no row can break the printout or the JSON. The JSON file is
rewritten after each addition (to a temporary file, then renamed), so a run that dies later, or is
killed, leaves everything measured before it in a readable file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

LATENCY_COLUMNS = ("config", "batch", "context", "mean_ms", "median_ms", "min_ms", "host_ms", "forward_ms", "cold_start_s",
                   "graph_pool_mib", "graphs", "replays", "kernels_per_step", "collective_ms", "idle_us", "pass_matches",
                   "dbo_steps", "tp")
THROUGHPUT_COLUMNS = ("config", "workload", "requests", "prompt_tokens", "output_tokens", "seconds", "requests_per_s",
                      "output_tokens_per_s", "total_tokens_per_s", "dbo_steps", "tp", "dp")
MM_ENCODER_COLUMNS = ("backend", "mode", "image", "patches", "budget", "graphs", "ms", "ms_min", "traces")


@dataclass
class ResultTable:
    columns: tuple[str, ...]
    header: dict[str, Any]  # what was run and where (command, model, device, torch)
    json_path: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, *rows: dict[str, Any]) -> None:
        """Append rows (a column they lack stays blank) and save the file."""
        for row in rows:
            unknown = sorted(set(row) - set(self.columns))
            if unknown:
                raise KeyError(f"benchmark row has columns {unknown} outside its table's {list(self.columns)}")
            self.rows.append({column: row.get(column) for column in self.columns})
        self.save()

    def save(self) -> None:
        if not self.json_path:
            return
        tmp = f"{self.json_path}.tmp"
        with open(tmp, "w") as f:
            json.dump({**self.header, "results": self.rows}, f, indent=2)
        os.replace(tmp, self.json_path)  # atomic: a reader (or a kill) never sees half a file

    def format(self) -> str:
        if not self.rows:
            return "(no results)"
        cells = [[_cell(row[c]) for c in self.columns] for row in self.rows]
        widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(self.columns, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in cells]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
