"""AsyncEngine: streams, concurrent requests, aborts, errors, shutdown; no leaked KV blocks."""
import asyncio

import pytest

from runtime.engine.async_engine import AsyncEngine, EngineDeadError
from runtime.contracts.config import EngineConfig
from runtime.engine.core import EngineCore
from runtime.contracts.sampling_params import SamplingParams


@pytest.fixture()
def engine(smollm2):
    eng = AsyncEngine(EngineCore(EngineConfig(max_num_seqs=8, max_model_len=256, num_kv_blocks=96), smollm2))
    yield eng
    eng.shutdown()


async def _collect(engine, rid, prompt, params):
    outs = [out async for out in engine.generate(rid, prompt, params)]
    return outs


def test_streams_are_cumulative_and_match_offline(engine):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

    async def main():
        return await asyncio.gather(*[_collect(engine, f"r{i}", f"Count to {i}:", params) for i in range(5)])

    results = asyncio.run(main())
    for outs in results:
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 10
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and lengths[0] >= 1
    offline = engine.core  # same core: run one request synchronously after the loop went idle
    assert offline.kv_cache.num_used_blocks == 0


def test_leaving_a_stream_aborts_and_frees_blocks(engine):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        seen = 0
        async for _ in engine.generate("long", "Tell me a long story.", params):
            seen += 1
            if seen == 3:
                break
        # The abort travels through the engine's inbox; poll its stats until it has landed.
        for _ in range(200):
            if engine.stats()[0].num_running == 0 and engine.stats()[0].kv_used_blocks == 0:
                return seen
            await asyncio.sleep(0.02)
        return -1

    assert asyncio.run(main()) == 3


def test_invalid_request_raises_in_the_stream(engine):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            await _collect(engine, "bad", [], SamplingParams())
        outs = await _collect(engine, "good", "Hi", SamplingParams(max_tokens=2, ignore_eos=True))
        return outs[-1]

    assert asyncio.run(main()).finished


def test_shutdown_fails_pending_streams(smollm2):
    eng = AsyncEngine(EngineCore(EngineConfig(max_num_seqs=2, max_model_len=128, num_kv_blocks=32), smollm2))
    eng.shutdown()

    async def main():
        with pytest.raises(EngineDeadError):
            await _collect(eng, "late", "Hi", SamplingParams(max_tokens=2))

    asyncio.run(main())
