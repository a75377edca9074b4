"""The benchmark CLI on a tiny checkpoint: DBO off and on measured side by side on one engine."""
import json

import pytest

from models.testing import write_tiny_checkpoint
from runtime.bench import cli as bench


@pytest.mark.parametrize("tp", [1, 2])
def test_latency_with_dbo_measures_off_and_on_on_one_engine(tmp_path, tp):
    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "ckpt"))
    out = tmp_path / "rows.json"
    argv = ["latency", "--model", path, "--dtype", "float32", "--dbo", "--dbo-decode-token-threshold", "4",
            "--batch-sizes", "4", "8", "--context", "8", "--steps", "2", "--warmup", "1",
            "--kv-cache-memory-gb", "0.05", "--tensor-parallel-size", str(tp), "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["config"], r["batch"]) for r in rows] == [("eager,dbo=off", 4), ("eager,dbo=on", 4),
                                                          ("eager,dbo=off", 8), ("eager,dbo=on", 8)]
    # One engine start for both states; only the "on" runs split steps.
    assert len({r["cold_start_s"] for r in rows}) == 1
    assert [r["dbo_steps"] > 0 for r in rows] == [False, True, False, True]


def test_switching_dbo_on_needs_an_engine_started_with_it(tmp_path):
    from models.loader import load_model
    from runtime import LLM

    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "ckpt"))
    llm = LLM.from_loaded(load_model(path, dtype="float32", device="cpu"), max_num_seqs=4, max_model_len=32,
                          num_kv_blocks=16)
    llm.engine.set_dbo(False)
    with pytest.raises(ValueError, match="started without DBO"):
        llm.engine.set_dbo(True)
