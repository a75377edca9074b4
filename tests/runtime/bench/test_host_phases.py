"""The host-time breakdown of decode steps (runtime.bench latency --host-breakdown)."""
from models.loader import load_model
from models.testing import write_tiny_checkpoint
from runtime import LLM, RequestOutputKind, SamplingParams
from runtime.bench.host_phases import PHASES, host_phases


def test_phases_add_up_and_the_engine_is_left_as_it_was(tmp_path):
    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "ckpt"))
    llm = LLM.from_loaded(load_model(path, dtype="float32", device="cpu"), max_num_seqs=4, max_model_len=64,
                          num_kv_blocks=32)
    core = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    for i in range(4):
        core.add_request(f"r{i}", [5 + i, 9, 13, 2], params)
    core.step()  # the prefill
    phases = host_phases(core, 8)
    assert list(phases.phases_us) == [label for label, _, _ in PHASES]
    assert all(us > 0 for us in phases.phases_us.values())
    nested = sum(us for label, us in phases.phases_us.items() if label.startswith(" "))
    assert nested <= phases.phases_us["launch"]
    assert phases.other_us >= 0 and phases.wait_us >= 0
    assert "schedule" in phases.summary() and "(lm_head" in phases.summary()
    # The timers are gone: no instance attribute shadows a method any more, and the engine runs on.
    runner = core.executor.worker.runner
    for obj, name in [(core.scheduler, "schedule"), (core.executor, "launch"), (runner, "forward_step"),
                      (runner.sampler, "forward"), (core.scheduler, "update_from_output")]:
        assert name not in vars(obj)
    while core.has_unfinished_requests():
        core.step()
    assert core.kv_cache.num_used_blocks == 0
