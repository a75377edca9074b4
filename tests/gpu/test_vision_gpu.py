"""Vision on CUDA: encoder attention backends, captured encoder budgets, Qwen2-VL with graphs, memory at
the largest image budget."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    print(f"skipping {__name__}: CUDA is not available")
    pytest.skip("CUDA is not available", allow_module_level=True)

from compiler import CompilationConfig, counters  # noqa: E402
from models.loader import LoadedModel  # noqa: E402
from models.qwen2_vl_vision import VisionTransformer, encoder_inputs  # noqa: E402
from models.testing import build_random_model  # noqa: E402
from models.vision_testing import (TINY_IMAGE_TOKEN, TINY_VISION_END, TINY_VISION_START,  # noqa: E402
                                   qwen2_vl_2b_config, qwen2_vl_2b_vision_config, write_tiny_qwen2_vl_checkpoint)
from runtime.attention.encoder_attention import ENCODER_ATTENTION_BACKENDS, reference_packed_attention  # noqa: E402
from runtime.worker.encoder_runner import EncoderRunner  # noqa: E402
from runtime import LLM  # noqa: E402
from runtime.contracts.sampling_params import SamplingParams  # noqa: E402

DEVICE = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", sorted(ENCODER_ATTENTION_BACKENDS))
def test_encoder_attention_backends_match_fp32_reference(backend, dtype):
    lengths = [1, 64, 1000, 333, 4096]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 16, 80, device=DEVICE, generator=g).mul(2).to(dtype) for _ in range(3))
    # The fp32 reference sees the same (rounded) inputs: what is left is the kernel's own error.
    ref = reference_packed_attention(q.float(), k.float(), v.float(), lengths, 80 ** -0.5)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    out = torch.empty_like(q)
    torch.ops.graphmode.encoder_attention(q, k, v, cu, out, 80 ** -0.5, backend)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_captured_encoder_budgets_match_eager_and_never_retrace():
    config = qwen2_vl_2b_vision_config()
    config.depth = 4
    compiled = CompilationConfig(mode="compile", backend="inductor", graph_mode="full", capture_sizes=[1024, 2048])
    torch.manual_seed(0)
    with torch.device(DEVICE):
        encoder = VisionTransformer(config, compilation_config=compiled)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.02)
    counters.reset()
    runner = EncoderRunner(encoder.eval(), 4096, DEVICE, CompilationConfig(encoder=compiled))
    runner.capture()
    assert runner.budgets == [1024, 2048, 4096] and counters.graphs_captured == 3
    replays = counters.graph_replays
    for i, (h, w) in enumerate([(16, 16), (32, 20), (40, 48), (64, 64), (30, 62)]):
        pixels = torch.randn(h * w, encoder.patch_dim, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(i))
        captured = runner.run(pixels, [(1, h, w)])
        inputs = encoder_inputs(pixels, [(1, h, w)], 2)
        with torch.inference_mode():
            eager = encoder.original_forward(inputs.pixel_values, inputs.position_ids, inputs.cu_seqlens)
        torch.testing.assert_close(captured, eager, atol=2e-3, rtol=2e-3)
    assert counters.graph_replays - replays == 5
    assert counters.dynamo_traces == 1


def test_qwen2_vl_with_decoder_and_encoder_graphs_matches_eager(tmp_path):
    path = write_tiny_qwen2_vl_checkpoint(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8, generator=g),
              torch.randint(0, 256, (112, 56, 3), dtype=torch.uint8, generator=g)]
    prompts = [{"prompt": [5, TINY_VISION_START, TINY_IMAGE_TOKEN, TINY_VISION_END, 7, TINY_VISION_START,
                           TINY_IMAGE_TOKEN, TINY_VISION_END, 9], "images": images},
               {"prompt": [3, TINY_VISION_START, TINY_IMAGE_TOKEN, TINY_VISION_END, 4], "images": images[:1]},
               [10, 11, 12, 13]]
    params = SamplingParams(temperature=0, max_tokens=12)
    common = dict(dtype="float32", max_num_batched_tokens=16, max_model_len=256, max_num_seqs=4,
                  max_image_patches=256, num_kv_blocks=64)
    eager = LLM(path, **common).generate(prompts, params, use_tqdm=False)
    graphs = CompilationConfig(mode="compile", backend="inductor", graph_mode="full_and_piecewise",
                               capture_sizes=[1, 2, 4, 8, 16],
                               encoder=CompilationConfig(mode="compile", backend="inductor", graph_mode="full",
                                                         capture_sizes=[64, 128]))
    counters.reset()
    llm = LLM(path, compilation_config=graphs, **common)
    captured = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in captured] == [o.outputs[0].token_ids for o in eager]
    assert llm.engine.executor.worker.runner.multimodal.encoder.graphs.entries, "the encoder ran from its captured graphs"
    assert counters.graph_replays > 0


def test_memory_profile_leaves_room_for_the_largest_image():
    """Qwen2-VL-2B-shaped random model, KV cache sized from a profile that runs the encoder at the
    largest budget and merges its output: a request with the largest image must not run out of memory."""
    config = qwen2_vl_2b_config()
    model = build_random_model(config, torch.bfloat16, DEVICE)
    loaded = LoadedModel(model, config, None, torch.bfloat16, DEVICE)
    llm = LLM.from_loaded(loaded, max_num_seqs=4, max_num_batched_tokens=8192, max_model_len=16384,
                          max_image_patches=5120, gpu_memory_utilization=0.92)
    runner = llm.engine.executor.worker.runner
    assert runner.multimodal.max_image_patches == 5120
    image = torch.randint(0, 256, (1792, 1792, 3), dtype=torch.uint8)  # resized to the largest allowed size
    prompt = [1, config.vision_start_token_id, config.image_token_id, config.vision_end_token_id, 2]
    text = list(range(100, 100 + 6000))
    torch.cuda.reset_peak_memory_stats()
    outs = llm.generate([{"prompt": prompt, "images": [image]}, text],
                        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert len(outs[0].prompt_token_ids) > 1000  # the image really was near the budget
    free, total = torch.cuda.mem_get_info()
    print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB of {total / 2**30:.1f} GiB")
