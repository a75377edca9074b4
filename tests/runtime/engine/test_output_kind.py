"""RequestOutputKind: FINAL_ONLY requests are handed back once, finished, with the tokens a CUMULATIVE run
streams; generate() asks for FINAL_ONLY; the server asks for it unless the reply streams."""
import pytest

from models.loader import load_model
from models.testing import write_tiny_checkpoint
from runtime import LLM, RequestOutputKind, SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path_factory.mktemp("kind") / "llama"))
    return load_model(path, dtype="float32", device="cpu")


def _drive(core) -> list:
    outputs = []
    while core.has_unfinished_requests():
        outputs.extend(core.step())
    return outputs


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_final_only_outputs_once_with_the_streamed_tokens(tiny, async_scheduling):
    llm = LLM.from_loaded(tiny, num_kv_blocks=64, max_num_seqs=4, async_scheduling=async_scheduling)
    core = llm.engine
    for kind in RequestOutputKind:
        params = SamplingParams(n=2, seed=7, temperature=1.0, max_tokens=6, ignore_eos=True, output_kind=kind)
        core.add_request(kind.value, [5, 6, 7, 8], params)
    outputs = _drive(core)
    final = [o for o in outputs if o.request_id == "final_only"]
    streamed = [o for o in outputs if o.request_id == "cumulative"]
    assert len(final) == 1 and final[0].finished
    assert len(streamed) >= 6 and streamed[-1].finished and not streamed[0].finished
    assert [len(c.token_ids) for c in final[0].outputs] == [6, 6]
    # Same seed, same prompt: the same completions whichever way they were handed back.
    assert [c.token_ids for c in final[0].outputs] == [c.token_ids for c in streamed[-1].outputs]
    assert final[0].metrics.first_token_time is not None and final[0].metrics.finished_time is not None


def test_an_aborted_final_only_request_leaves_nothing_behind(tiny):
    llm = LLM.from_loaded(tiny, num_kv_blocks=64, max_num_seqs=4)
    core = llm.engine
    core.add_request("a", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True,
                                                    output_kind=RequestOutputKind.FINAL_ONLY))
    assert core.step() == [] and core.step() == []
    assert core.abort_request("a")
    _drive(core)
    assert not core.has_unfinished_requests() and core.kv_cache.num_used_blocks == 0


def test_generate_asks_for_final_outputs_and_leaves_the_callers_params_alone(tiny):
    llm = LLM.from_loaded(tiny, num_kv_blocks=64, max_num_seqs=4)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    seen = []
    step = llm.engine.step

    def recording_step():
        outputs = step()
        seen.extend(outputs)
        return outputs

    llm.engine.step = recording_step
    outs = llm.generate([[5, 6], [7, 8, 9]], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3]
    assert all(o.finished for o in seen) and len(seen) == 2
    assert params.output_kind is RequestOutputKind.CUMULATIVE


def test_output_kind_is_validated():
    with pytest.raises(ValueError, match="output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind="final_only")
