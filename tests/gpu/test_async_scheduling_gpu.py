"""Async scheduling on CUDA: the launch path never makes the host wait for the device, and the tokens are
those of synchronous scheduling (graphs, bf16)."""
import random

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    print(f"skipping {__name__}: CUDA is not available")
    pytest.skip("CUDA is not available", allow_module_level=True)

from compiler import CompilationConfig  # noqa: E402
from models.loader import LoadedModel, load_model  # noqa: E402
from models.testing import build_random_model, qwen3_0_6b_config  # noqa: E402
from runtime import LLM  # noqa: E402
from runtime.contracts.sampling_params import SamplingParams  # noqa: E402
from runtime.platforms import current_platform  # noqa: E402

GRAPHS = {"mode": "compile", "backend": "inductor", "graph_mode": "full_and_piecewise",
          "capture_sizes": [1, 2, 4, 8, 16]}


@pytest.fixture(scope="module")
def random_qwen3():
    config = qwen3_0_6b_config()
    config.num_hidden_layers = 4
    comp = CompilationConfig.from_dict(GRAPHS)
    model = build_random_model(config, torch.bfloat16, torch.device("cuda"), compilation_config=comp)
    return LoadedModel(model, config, None, torch.bfloat16, torch.device("cuda"), comp)


def test_launch_path_never_waits_for_the_device(random_qwen3):
    llm = LLM.from_loaded(random_qwen3, async_scheduling=True, max_num_seqs=16, max_model_len=256)
    core = llm.engine
    launch = core.executor.launch

    def guarded(sched):
        with current_platform.forbid_host_syncs():
            return launch(sched)

    core.executor.launch = guarded
    for i in range(16):
        params = SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=60, ignore_eos=True,
                                logprobs=1 if i % 4 == 0 else None)
        core.add_request(f"r{i}", list(range(100 + i, 140 + i)), params)
    for _ in range(5):  # prefill and the first decode steps
        core.step()
    steps = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        while core.has_unfinished_requests() and steps < 50:
            core.step()
            steps += 1
        torch.cuda.synchronize()
    assert steps == 50
    # A copy from pageable host memory may wait for the stream (the driver stages it): the sync debug mode
    # does not see that wait, the copy's name in the trace does.
    pageable = sorted({e.name for e in prof.events() if "Pageable" in e.name})
    assert not pageable, f"host->device copies from pageable memory on the launch path: {pageable}"


def _run(llm: LLM, work) -> dict[str, list[int]]:
    core = llm.engine
    for rid, prompt, params in work:
        core.add_request(rid, prompt, params)
    tokens = {}
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id] = out.outputs[0].token_ids
    assert core.kv_cache.num_used_blocks == 0
    return tokens


def test_async_gives_the_tokens_of_sync_with_graphs(random_qwen3):
    """Same batches in both modes (lengths end requests, no stop tokens), so the same kernels run on the same
    rows: tokens identical, greedy and seeded, with preemption."""
    rng = random.Random(0)
    work = []
    for i in range(64):
        params = SamplingParams(max_tokens=rng.randint(1, 64), ignore_eos=True,
                                **({"temperature": 0.8, "top_p": 0.95, "seed": i} if i % 2 else {"temperature": 0.0}))
        work.append((f"r{i}", [rng.randrange(100, 150000) for _ in range(rng.randint(3, 300))], params))
    common = dict(max_num_seqs=16, max_num_batched_tokens=512, num_kv_blocks=120, max_model_len=400)
    sync = _run(LLM.from_loaded(random_qwen3, async_scheduling=False, **common), work)
    async_ = _run(LLM.from_loaded(random_qwen3, async_scheduling=True, **common), work)
    assert sync == async_


def test_smollm2_bf16_async_matches_sync(smollm2_path):
    """Stop strings end requests on the host: async scheduling has already launched the step after the stop
    with the request in it (its token is dropped), so that step's batch is one larger than sync's. In bf16
    the batch size picks the GEMM kernels, hence the rounding: to compare tokens exactly, every decode step
    runs the one full graph of 16 rows (all requests are admitted in the first step), whose rows do not
    depend on each other."""
    comp = CompilationConfig.from_dict({**GRAPHS, "capture_sizes": [16]})
    loaded = load_model(smollm2_path, dtype="bfloat16", device="cuda", compilation_config=comp)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"] * 4
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, stop=["\n\n"]) for i in range(len(prompts))]
    outs = {}
    for mode in (False, True):
        # A small fixed KV cache: the first engine's must not leave the second none (both live until gc).
        llm = LLM.from_loaded(loaded, async_scheduling=mode, max_num_seqs=16, max_model_len=512, kv_cache_memory_gb=1)
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    differ = [(i, outs[False][i], outs[True][i]) for i in range(len(prompts)) if outs[False][i] != outs[True][i]]
    assert not differ, f"sync vs async differ: {differ[:3]}"
    assert any(len(t) < 8 + 3 * i for i, t in enumerate(outs[True])), "no request stopped on its stop string"
