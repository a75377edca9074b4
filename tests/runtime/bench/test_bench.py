"""The benchmark CLI on tiny checkpoints: every subcommand with every flag it offers, one table schema
per subcommand, and results saved as each config finishes (a killed run keeps them)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from models.default import default_model_path
from models.testing import write_tiny_checkpoint
from models.vision_testing import write_tiny_qwen2_vl_checkpoint
from runtime.bench import cli as bench
from runtime.bench.results import LATENCY_COLUMNS, MM_ENCODER_COLUMNS, THROUGHPUT_COLUMNS, ResultTable
from runtime.bench import agreement
from runtime.bench.agreement import AGREEMENT_COLUMNS
from runtime.bench.moe_layer import MOE_COLUMNS
from runtime.bench.norm_linear import NORM_LINEAR_COLUMNS
from runtime.bench.serving import SERVING_COLUMNS
from runtime.bench.startup import STARTUP_COLUMNS
from runtime.platforms import current_platform
from tests.helpers import REPO_ROOT
from tests.helpers.serve import running_server

COMPILED = '{"mode": "compile", "backend": "eager", "passes": ["default"]}'
TINY_LATENCY = ["--context", "8", "--steps", "2", "--warmup", "1", "--kv-cache-memory-gb", "0.05"]

NORM_LINEAR = '["default", "fuse_norm_linear"]'

# Every invocation the tests below make, by name: test_every_flag_is_exercised checks that together they
# use each option the parser offers. "{llama}", "{moe}", "{json}" are filled in per test.
INVOCATIONS = {
    # The command of the issue: an engine config, a compiled one and the transformers baseline.
    "latency_hf_baseline": ["latency", "--model", "{llama}", "--dtype", "bfloat16", "--batch-sizes", "1", "4",
                            "--config", "default={}", "--config", f"best={COMPILED}", "--hf-baseline",
                            "--json", "{json}", *TINY_LATENCY],
    "latency_graph_modes": ["latency", "--model", "{llama}", "--dtype", "float32", "--batch-sizes", "2",
                            "--graph-mode", "none", "--graph-mode", "piecewise", "--graph-mode", "full_and_piecewise",
                            "--backend", "eager", "--capture-sizes", "1", "2", "4", "--count-kernels",
                            "--host-breakdown",
                            "--max-num-batched-tokens", "64", "--log-level", "ERROR", "--json", "{json}",
                            "--profile", "{profile}", *TINY_LATENCY],
    "latency_tp_dbo": ["latency", "--model", "{llama}", "--dtype", "float32", "--dbo", "--force-dbo",
                       "--dbo-decode-token-threshold", "4", "--dbo-prefill-token-threshold", "16",
                       "--batch-sizes", "4", "8", "--tensor-parallel-size", "2", "--kernel-table", "{kernel_table}",
                       "--json", "{json}", *TINY_LATENCY],
    "latency_dbo_one_device": ["latency", "--model", "{llama}", "--dtype", "float32", "--dbo",
                               "--dbo-decode-token-threshold", "2", "--batch-sizes", "4", "--json", "{json}",
                               *TINY_LATENCY],
    "latency_simulated_collective": ["latency", "--model", "{llama}", "--dtype", "float32", "--dbo",
                                     "--dbo-decode-token-threshold", "2", "--batch-sizes", "4",
                                     "--simulate-collective-us", "20", "--json", "{json}", *TINY_LATENCY],
    "startup": ["startup", "--model", "{llama}", "--dtype", "float32", "--compilation-config",
                '{"mode": "compile", "backend": "eager"}', "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
                "--max-model-len", "64", "--kv-cache-memory-gb", "0.05", "--cache-root", "{profile}",
                "--cprofile", "{cprofile}", "--log-level", "ERROR", "--json", "{json}"],
    "latency_moe_ep": ["latency", "--model", "{moe}", "--dtype", "float32", "--batch-sizes", "2",
                       "--tensor-parallel-size", "2", "--enable-expert-parallel", "--expert-parallel-comm", "all_reduce",
                       "--json", "{json}", *TINY_LATENCY],
    "throughput_dbo": ["throughput", "--model", "{llama}", "--dtype", "float32", "--num-requests", "6",
                       "--input-len", "8", "--output-len", "4", "--max-num-seqs", "4", "--max-num-batched-tokens",
                       "64", "--kv-cache-memory-gb", "0.05", "--dbo", "--force-dbo", "--simulate-collective-us", "5",
                       "--dbo-decode-token-threshold", "2",
                       "--dbo-prefill-token-threshold", "8", "--config", f"compiled={COMPILED}", "--backend",
                       "eager", "--graph-mode", "piecewise", "--capture-sizes", "1", "2", "4", "--json", "{json}"],
    "throughput_tp": ["throughput", "--model", "{moe}", "--dtype", "float32", "--num-requests", "4",
                      "--input-len", "8", "--output-len", "3", "--max-num-seqs", "4", "--kv-cache-memory-gb", "0.05",
                      "--tensor-parallel-size", "2", "--enable-expert-parallel", "--expert-parallel-comm",
                      "all_to_all", "--log-level", "ERROR", "--json", "{json}", "--profile", "{profile}"],
    "throughput_dp": ["throughput", "--model", "{llama}", "--dtype", "float32", "--num-requests", "6",
                      "--input-len", "8", "--output-len", "3", "--max-num-seqs", "4", "--kv-cache-memory-gb", "0.05",
                      "--data-parallel-size", "2", "--log-level", "ERROR", "--json", "{json}",
                      "--profile", "{profile}"],
    # Synchronous and async scheduling side by side on one engine.
    "latency_scheduling": ["latency", "--model", "{llama}", "--dtype", "float32", "--batch-sizes", "2",
                           "--async-scheduling", "--compare-scheduling", "--json", "{json}", *TINY_LATENCY],
    "throughput_scheduling": ["throughput", "--model", "{llama}", "--dtype", "float32", "--workload", "fixed",
                              "--num-requests", "3", "--input-len", "6", "--output-len", "3", "--kv-cache-memory-gb",
                              "0.05", "--compare-scheduling", "--json", "{json}"],
    # A vision model's decoder with its encoder's attention backend chosen.
    "latency_vlm": ["latency", "--model", "{vlm}", "--dtype", "float32", "--batch-sizes", "2",
                    "--mm-encoder-attn-backend", "naive", "--no-async-scheduling", "--json", "{json}", *TINY_LATENCY],
    "throughput_vlm": ["throughput", "--model", "{vlm}", "--dtype", "float32", "--num-requests", "2", "--input-len",
                       "6", "--output-len", "2", "--kv-cache-memory-gb", "0.05", "--mm-encoder-attn-backend", "sdpa",
                       "--async-scheduling", "--no-async-scheduling", "--json", "{json}"],
    "mm_encoder": ["mm-encoder", "--shape", "tiny", "--image-sizes", "56x56,84x112", "--backends", "sdpa,naive",
                   "--modes", "eager,compiled,captured", "--dtype", "float32", "--compile-backend", "eager",
                   "--iters", "1", "--warmup", "0", "--log-level", "INFO", "--json", "{json}"],
    # A running server (the embedded SmolLM2 on CPU): decode streams while long prompts arrive.
    "serving": ["serving", "--url", "{url}", "--label", "plain", "--served-model-name", "SmolLM2-135M-Instruct",
                "--vocab-size", "20000", "--decode-streams", "3", "--decode-prompt-len", "5", "--decode-output-len",
                "8", "--long-prompts", "2", "--long-prompt-len", "120", "--long-output-len", "2", "--long-interval-s",
                "0.05", "--seed", "1", "--timeout-s", "120", "--logprobs", "--log-level", "INFO", "--json", "{json}"],
    # One instance, then a prefill and a decode instance behind the proxy (SmolLM2 on CPU), the same workload.
    "disagg": ["disagg", "--model", "{default_model}", "--dtype", "float32", "--max-model-len", "256",
               "--kv-cache-memory-gb", "0.1", "--server-args", "--max-num-seqs 8", "--log-dir", "{logs}",
               "--vocab-size", "20000", "--decode-streams", "2", "--decode-prompt-len", "20",
               "--decode-output-len", "4",
               "--long-prompts", "1",
               "--long-prompt-len", "40", "--long-output-len", "2", "--long-interval-s", "0.01", "--seed", "2",
               "--timeout-s", "120", "--logprobs", "--log-level", "INFO", "--json", "{json}"],
    "moe": ["moe", "--shape", "tiny", "--tokens", "1", "7", "--dtype", "float32", "--iters", "2", "--warmup", "1",
            "--log-level", "INFO",
            "--json", "{json}"],
    "agreement": ["agreement", "--model", "{llama}", "--dtype", "float32", "--prompts", "4", "--max-tokens", "3",
                  "--baseline-config", 'base={"mode": "compile", "backend": "eager"}',
                  "--config", f'norm_linear={{"mode": "compile", "backend": "eager", "passes": {NORM_LINEAR}}}',
                  "--kv-cache-memory-gb", "0.05", "--log-level", "WARNING", "--json", "{json}"],
    "norm_linear": ["norm-linear", "--shape", "tiny", "--tokens", "1", "3", "--dtype", "float32", "--iters", "2",
                    "--warmup", "1", "--copy-mib", "4", "--log-level", "WARNING", "--json", "{json}"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {"llama": write_tiny_checkpoint("LlamaForCausalLM", str(root / "llama")),
            "moe": write_tiny_checkpoint("Qwen3MoeForCausalLM", str(root / "moe")),
            "vlm": write_tiny_qwen2_vl_checkpoint(str(root / "vlm"))}


def _run(name: str, checkpoints: dict[str, str], tmp_path, capsys) -> tuple[list[dict], str]:
    """Run one named invocation in this process; the JSON rows and the printed table."""
    out = tmp_path / f"{name}.json"
    fill = {"{json}": str(out), "{llama}": checkpoints["llama"], "{moe}": checkpoints["moe"], "{vlm}": checkpoints["vlm"],
            "{url}": checkpoints.get("url"), "{default_model}": default_model_path(),
            "{logs}": str(tmp_path / "logs"), "{kernel_table}": str(tmp_path / "kernels.md"),
            "{profile}": str(tmp_path / "traces"), "{cprofile}": str(tmp_path / "traces" / "cprofile")}
    argv = [fill.get(a, a) for a in INVOCATIONS[name]]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    document = json.loads(out.read_text())
    assert document["command"] == argv[0] and "device" in document and "torch" in document
    return document["results"], printed


def _check_schema(rows: list[dict], columns: tuple[str, ...], printed: str) -> None:
    assert rows and all(list(r) == list(columns) for r in rows), "every row has the table's columns, in order"
    table = printed.strip().splitlines()
    header = next(i for i, line in enumerate(table) if line.split() == list(columns))
    assert len(table) - header - 1 == len(rows), "one printed line per row"


def test_the_issue_command_prints_its_table_and_writes_its_json(checkpoints, tmp_path, capsys):
    rows, printed = _run("latency_hf_baseline", checkpoints, tmp_path, capsys)
    _check_schema(rows, LATENCY_COLUMNS, printed)
    assert [(r["config"], r["batch"]) for r in rows] == [("default", 1), ("default", 4), ("best", 1), ("best", 4),
                                                         ("transformers-eager", 1), ("transformers-eager", 4)]
    baseline = rows[-1]
    assert baseline["median_ms"] > 0 and baseline["collective_ms"] is None and baseline["graph_pool_mib"] is None
    assert rows[2]["pass_matches"] > 0 and rows[0]["pass_matches"] == 0


def test_latency_graph_modes_and_kernel_counting(checkpoints, tmp_path, capsys):
    rows, printed = _run("latency_graph_modes", checkpoints, tmp_path, capsys)
    _check_schema(rows, LATENCY_COLUMNS, printed)
    assert [r["config"] for r in rows] == ["none", "piecewise", "full_and_piecewise"]
    assert all(r["forward_ms"] > 0 for r in rows)
    # The CPU profiler sees the CPU's kernels; a platform whose kernels are invisible leaves the column blank.
    assert all(r["kernels_per_step"] is None or r["kernels_per_step"] > 0 for r in rows)
    # --profile: one trace per config and batch, that loads as Chrome trace JSON.
    traces = sorted(p.relative_to(tmp_path / "traces").parts[0] for p in (tmp_path / "traces").rglob("*.json"))
    assert traces == ["full_and_piecewise-b2", "none-b2", "piecewise-b2"]
    for path in (tmp_path / "traces").rglob("*.json"):
        assert json.loads(path.read_text())["traceEvents"]


def test_latency_with_dbo_under_tensor_parallelism_measures_off_and_on_on_one_engine(checkpoints, tmp_path, capsys):
    rows, printed = _run("latency_tp_dbo", checkpoints, tmp_path, capsys)
    _check_schema(rows, LATENCY_COLUMNS, printed)
    assert [(r["config"], r["batch"]) for r in rows] == [("default,dbo=off", 4), ("default,dbo=on", 4),
                                                          ("default,dbo=off", 8), ("default,dbo=on", 8)]
    assert len({r["cold_start_s"] for r in rows}) == 1, "one engine start for both states"
    assert [r["dbo_steps"] > 0 for r in rows] == [False, True, False, True]
    assert all(r["tp"] == 2 and r["forward_ms"] > 0 for r in rows)
    # --kernel-table: a section per config and batch; the CPU's profiler sees no device kernels.
    sections = [line for line in (tmp_path / "kernels.md").read_text().splitlines() if line.startswith("### ")]
    assert sections == [f"### default,dbo={d}-b{b}" for b in (4, 8) for d in ("off", "on")]
    assert "no device kernels" in (tmp_path / "kernels.md").read_text()


def test_latency_of_an_moe_model_with_expert_parallelism(checkpoints, tmp_path, capsys):
    rows, printed = _run("latency_moe_ep", checkpoints, tmp_path, capsys)
    _check_schema(rows, LATENCY_COLUMNS, printed)
    assert [(r["config"], r["tp"]) for r in rows] == [("default", 2)]


def test_dbo_on_one_device_stays_off_by_policy_and_both_rows_run_unsplit(checkpoints, tmp_path, capsys, caplog):
    rows, _ = _run("latency_dbo_one_device", checkpoints, tmp_path, capsys)
    assert [r["config"] for r in rows] == ["default,dbo=off", "default,dbo=on"]
    assert [r["dbo_steps"] for r in rows] == [0, 0]
    assert any("DBO off on one device" in r.getMessage() for r in caplog.records)


def test_simulated_collectives_make_dbo_split_on_one_device(checkpoints, tmp_path, capsys):
    """--simulate-collective-us: the all-reduces of TP, simulated on one device; DBO's policy splits then."""
    rows, _ = _run("latency_simulated_collective", checkpoints, tmp_path, capsys)
    assert [r["config"] for r in rows] == ["default,dbo=off", "default,dbo=on"]
    assert rows[0]["dbo_steps"] == 0 < rows[1]["dbo_steps"]


def test_throughput_with_dbo_and_a_graph_mode(checkpoints, tmp_path, capsys):
    rows, printed = _run("throughput_dbo", checkpoints, tmp_path, capsys)
    _check_schema(rows, THROUGHPUT_COLUMNS, printed)
    # Throughput measures the first config only, DBO off then on.
    assert [r["config"] for r in rows] == ["compiled,dbo=off", "compiled,dbo=on"]
    assert all(r["requests"] == 6 and r["output_tokens_per_s"] > 0 for r in rows)
    assert rows[1]["dbo_steps"] > 0 == rows[0]["dbo_steps"]


def test_throughput_under_tensor_and_expert_parallelism(checkpoints, tmp_path, capsys):
    rows, printed = _run("throughput_tp", checkpoints, tmp_path, capsys)
    _check_schema(rows, THROUGHPUT_COLUMNS, printed)
    assert [(r["config"], r["requests"], r["tp"]) for r in rows] == [("default", 4, 2)]
    # --profile under tensor parallelism: each rank writes its own trace.
    traces = sorted(p.name.split("-")[1] for p in (tmp_path / "traces" / "default").glob("*.trace.json"))
    assert traces == ["rank0", "rank1"]


def test_throughput_over_data_parallel_engine_cores(checkpoints, tmp_path, capsys):
    rows, printed = _run("throughput_dp", checkpoints, tmp_path, capsys)
    _check_schema(rows, THROUGHPUT_COLUMNS, printed)
    assert [(r["config"], r["requests"], r["output_tokens"], r["dp"]) for r in rows] == [("default", 6, 18, 2)]
    assert len(list((tmp_path / "traces" / "default").glob("*.trace.json"))) == 2  # each core traces itself


@pytest.mark.parametrize("name, columns", [("latency_vlm", LATENCY_COLUMNS), ("throughput_vlm", THROUGHPUT_COLUMNS)])
def test_a_vision_model_with_its_encoder_backend_chosen(checkpoints, tmp_path, capsys, name, columns):
    rows, printed = _run(name, checkpoints, tmp_path, capsys)
    _check_schema(rows, columns, printed)
    assert [r["config"] for r in rows] == ["default"]


@pytest.mark.parametrize("name,columns", [("latency_scheduling", LATENCY_COLUMNS),
                                          ("throughput_scheduling", THROUGHPUT_COLUMNS)])
def test_sync_and_async_scheduling_side_by_side(name, columns, checkpoints, tmp_path, capsys):
    rows, printed = _run(name, checkpoints, tmp_path, capsys)
    _check_schema(rows, columns, printed)
    assert [r["config"] for r in rows] == ["default,sync", "default,async"]
    if name.startswith("latency"):
        assert all(0 < r["host_ms"] <= r["median_ms"] * 1.5 for r in rows)
    else:
        assert rows[0]["output_tokens"] == rows[1]["output_tokens"] == 9


def test_nano_workload_is_nano_vllms():
    """nano-vllm's bench.py: random.seed(0), prompts first (ids 0..10000, 100..1024 long), then max_tokens."""
    from runtime.bench.throughput import nano_workload

    prompts, params = nano_workload()
    assert len(prompts) == len(params) == 256
    assert all(100 <= len(p) <= 1024 and 0 <= min(p) and max(p) <= 10000 for p in prompts)
    assert all(100 <= sp.max_tokens <= 1024 and sp.temperature == 0.6 and sp.ignore_eos for sp in params)
    assert sum(len(p) for p in prompts) == 142827 and sum(sp.max_tokens for sp in params) == 133966
    assert nano_workload()[0] == prompts


def test_mm_encoder_runs_every_backend_and_mode(checkpoints, tmp_path, capsys):
    rows, printed = _run("mm_encoder", checkpoints, tmp_path, capsys)
    _check_schema(rows, MM_ENCODER_COLUMNS, printed)
    assert {(r["backend"], r["mode"]) for r in rows} == {(b, m) for b in ("sdpa", "naive")
                                                         for m in ("eager", "compiled", "captured")}
    assert [r["patches"] for r in rows[:2]] == [16, 48] and all(r["ms"] > 0 for r in rows)
    assert all(r["traces"] == (0 if r["mode"] == "eager" else 1) for r in rows), "one trace serves both sizes"


def test_serving_measures_decode_streams_and_long_prompts_against_a_running_server(checkpoints, tmp_path, capsys):
    with running_server() as url:
        rows, printed = _run("serving", {**checkpoints, "url": url}, tmp_path, capsys)
    _check_schema(rows, SERVING_COLUMNS, printed)
    decode, long = rows
    assert (decode["config"], decode["kind"], decode["requests"], decode["failed"]) == ("plain", "decode", 3, 0)
    assert (long["kind"], long["requests"], long["failed"]) == ("long_prompt", 2, 0)
    assert decode["output_tokens"] == 3 * 8 and long["output_tokens"] == 2 * 2
    assert 0 < decode["itl_p50_ms"] <= decode["itl_p99_ms"] <= decode["itl_max_ms"]
    assert decode["ttft_p50_ms"] > 0 and long["ttft_p50_ms"] > 0 and decode["seconds"] > 0


def test_disagg_measures_one_instance_then_prefill_and_decode_instances_behind_the_proxy(checkpoints, tmp_path,
                                                                                        capsys):
    rows, printed = _run("disagg", checkpoints, tmp_path, capsys)
    _check_schema(rows, SERVING_COLUMNS, printed)
    assert [(r["config"], r["kind"]) for r in rows] == [(c, k) for c in ("one_instance", "disaggregated")
                                                        for k in ("decode", "long_prompt")]
    assert all(r["failed"] == 0 for r in rows)
    assert [r["output_tokens"] for r in rows] == [2 * 4, 2, 2 * 4, 2]
    # Every prompt's KV came from the prefill instance: the decode instance computed one token per request.
    assert "decode instance: 80 prompt tokens' KV received, 3 prompt tokens computed" in printed
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"one_instance.log", "producer.log", "consumer.log",
                                                               "proxy.log"}


def test_disagg_quotes_the_log_of_a_server_that_does_not_start(tmp_path, capsys):
    argv = ["disagg", "--model", str(tmp_path / "missing"), "--kv-cache-memory-gb", "0.1", "--log-dir", str(tmp_path)]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert "one_instance (http://127.0.0.1:" in err and "exited with" in err and "one_instance.log" in err


def test_serving_names_a_server_that_is_not_there(tmp_path, capsys):
    argv = ["serving", "--url", "http://127.0.0.1:9", "--served-model-name", "m", "--decode-streams", "1",
            "--long-prompts", "0", "--timeout-s", "5"]
    assert bench.main(argv) == 2
    assert "1 requests failed; the first: ConnectError" in capsys.readouterr().err


@pytest.mark.parametrize("grouped", [False, True], ids=["reference-only", "with-grouped-gemm"])
def test_moe_layer_times_the_reference_and_the_grouped_gemm_where_the_platform_has_it(
        grouped, checkpoints, tmp_path, capsys, monkeypatch):
    # torch._grouped_mm runs on the CPU too (slowly), so the grouped rows can be checked here
    monkeypatch.setattr(current_platform, "has_grouped_gemm", lambda dtype: grouped)
    rows, printed = _run("moe", checkpoints, tmp_path, capsys)
    _check_schema(rows, MOE_COLUMNS, printed)
    kernels = ["reference", "grouped"] if grouped else ["reference"]
    assert [(r["tokens"], r["kernel"], r["mode"]) for r in rows] == [(t, k, "eager") for t in (1, 7) for k in kernels]
    assert all(r["ms"] > 0 and r["vs_reference"] > 0 for r in rows)
    assert [r["vs_reference"] for r in rows if r["kernel"] == "reference"] == [1.0, 1.0]


def test_agreement_compares_each_config_with_the_baseline(checkpoints, tmp_path, capsys):
    rows, printed = _run("agreement", checkpoints, tmp_path, capsys)
    _check_schema(rows, AGREEMENT_COLUMNS, printed)
    # Off the Triton kernel fuse_norm_linear runs the ops it replaced: every token equal.
    assert [(r["config"], r["prompts"], r["tokens"], r["sequences_equal"], r["tokens_equal_before_divergence"],
             r["first_divergence"]) for r in rows] == [("base", 4, 12, 4, 12, None), ("norm_linear", 4, 12, 4, 12, None)]


def test_agreement_counts_tokens_up_to_the_first_difference():
    assert agreement._first_difference([1, 2, 3], [1, 2, 3]) == 3
    assert agreement._first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert agreement._first_difference([7], [1]) == 0


def test_norm_linear_times_the_unfused_ops_beside_a_copy(checkpoints, tmp_path, capsys):
    # The CPU has no fused kernel (Triton): the copy row and the unfused rows (tests/gpu has the kernel's own).
    rows, printed = _run("norm_linear", checkpoints, tmp_path, capsys)
    _check_schema(rows, NORM_LINEAR_COLUMNS, printed)
    assert [(r["projection"], r["tokens"], r["kernel"]) for r in rows] == [("copy 4 MiB", 0, "copy")] + [
        (p, t, "unfused") for p in ("qkv", "gate_up+silu") for t in (1, 3)]
    assert all(r["us"] > 0 and r["gb_per_s"] > 0 for r in rows)


def test_startup_runs_cold_then_warm_in_processes_of_their_own(checkpoints, tmp_path, capsys):
    rows, printed = _run("startup", checkpoints, tmp_path, capsys)
    _check_schema(rows, STARTUP_COLUMNS, printed)
    assert [r["run"] for r in rows] == ["cold", "warm"]
    for row in rows:
        assert row["load_s"] > 0 and row["engine_s"] > 0
        assert row["trace_s"] > 0  # mode=compile: traced (or the trace loaded) inside the engine's first forward
        assert row["engine_s"] >= row["warmup_s"] + row["kv_allocate_s"] + row["capture_s"]
        assert row["graphs"] == 0 and row["cache_hits"] == 0  # CPU: no static graphs; eager backend: no cache
    # The cold run traced with Dynamo and saved the trace; the warm one loaded it.
    assert [(r["dynamo_traces"], r["traces_loaded"]) for r in rows] == [(1, 0), (0, 1)]
    # --cprofile: each run's engine construction, as a pstats file and its costliest calls as text.
    for run in ("cold", "warm"):
        text = (tmp_path / "traces" / "cprofile" / f"{run}.txt").read_text()
        assert "cumulative" in text and "from_loaded" in text
        assert (tmp_path / "traces" / "cprofile" / f"{run}.prof").stat().st_size > 0


def test_every_flag_is_exercised():
    used = {arg for argv in INVOCATIONS.values() for arg in argv if arg.startswith("--")}
    parser = bench.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    missing = {}
    for name, sub in subparsers.items():
        options = {o for action in sub._actions for o in action.option_strings if o.startswith("--")} - {"--help"}
        tested = {o for argv in INVOCATIONS.values() if argv[0] == name for o in argv if o.startswith("--")}
        if options - tested:
            missing[name] = sorted(options - tested)
    top = {o for action in parser._actions for o in action.option_strings if o.startswith("--")} - {"--help"}
    assert not missing and top <= used, f"flags no test runs: {missing or sorted(top - used)}"
    assert "--log-level" in used


def test_a_bad_config_is_one_line_and_keeps_the_earlier_configs(checkpoints, tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["latency", "--model", checkpoints["llama"], "--dtype", "float32", "--batch-sizes", "2",
            "--config", "ok={}", "--config", 'bad={"mode": "compile", "backend": "no-such-backend"}',
            "--json", str(out), *TINY_LATENCY]
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    assert "error: unknown compile backend 'no-such-backend'" in captured.err
    assert [r["config"] for r in json.loads(out.read_text())["results"]] == ["ok"]
    assert "ok" in captured.out, "what was measured is still printed"


def test_a_row_outside_the_schema_is_refused(tmp_path):
    table = ResultTable(("config", "ms"), {"command": "x"}, str(tmp_path / "t.json"))
    table.add({"config": "a", "ms": 1.0}, {"config": "b"})
    assert json.loads((tmp_path / "t.json").read_text())["results"] == [{"config": "a", "ms": 1.0},
                                                                       {"config": "b", "ms": None}]
    assert table.format().splitlines()[-1].split() == ["b", "-"]
    with pytest.raises(KeyError, match="collective_ms"):
        table.add({"config": "c", "collective_ms": 2.0})


def test_killing_the_run_during_the_second_config_keeps_the_first_configs_results(checkpoints, tmp_path):
    out = tmp_path / "rows.json"
    # The second config compiles (a Dynamo trace, seconds on the CPU) before it measures anything.
    argv = ["latency", "--model", checkpoints["llama"], "--dtype", "float32", "--batch-sizes", "1", "2",
            "--config", "first={}", "--config", f"second={COMPILED}", "--json", str(out), *TINY_LATENCY]
    proc = subprocess.Popen([sys.executable, "-m", "runtime.bench", *argv], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 300
        while not out.exists():
            assert proc.poll() is None, "the benchmark ended before writing the first config"
            assert time.monotonic() < deadline, "no results file after 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "killed while the second config ran, not after the run"
    rows = json.loads(out.read_text())["results"]
    assert [(r["config"], r["batch"]) for r in rows] == [("first", 1), ("first", 2)]


def test_switching_dbo_on_needs_an_engine_started_with_it(checkpoints):
    from models.loader import load_model
    from runtime import LLM

    llm = LLM.from_loaded(load_model(checkpoints["llama"], dtype="float32", device="cpu"), max_num_seqs=4,
                          max_model_len=32, num_kv_blocks=16)
    llm.engine.set_dbo(False)
    with pytest.raises(ValueError, match="started without DBO"):
        llm.engine.set_dbo(True)
