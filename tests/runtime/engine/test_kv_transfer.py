"""Prefill/decode disaggregation at the engine: a producer engine and a consumer engine in one process.

A fake connector (an in-memory store) records every hook the engine calls, in order; the consumer's tokens
must equal a plain engine's with one prompt token computed per request; a failed load falls back to
computing the prompt; nothing keeps a KV block. The real connector (pyzmq over loopback) runs the same
requests.
"""
import pytest

import runtime.engine.core as core_module
from models.testing import write_tiny_checkpoint
from runtime import LLM
from runtime.contracts.kv_transfer import KVTransferConfig
from runtime.contracts.sampling_params import SamplingParams
from runtime.engine.kv_connector import KVConnector, PromptKV

ENGINE = dict(max_num_seqs=8, max_model_len=512, num_kv_blocks=120, dtype="float32")
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
FIRST_TOKEN = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
PROMPTS = [list(range(3, 40)), [7] * 10, list(range(50, 250)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13]]


class FakeConnector(KVConnector):
    """KV kept in a dict the producer and the consumer share; every call logged."""
    store: dict[str, PromptKV] = {}
    calls: list[tuple] = []
    fail_loads = False

    def save(self, request_id, kv):
        self.calls.append(("save", request_id, kv.num_tokens))
        self.store[request_id] = kv
        return {"remote_request_id": request_id}

    def start_load(self, request_id, params):
        self.calls.append(("start_load", request_id))
        self._pending = getattr(self, "_pending", []) + [(request_id, params["remote_request_id"])]

    def finished_loads(self):
        done, self._pending = getattr(self, "_pending", []), []
        if done:
            self.calls.append(("finished_loads", [r for r, _ in done]))
        return [(r, RuntimeError("the producer is gone") if self.fail_loads else self.store.pop(remote))
                for r, remote in done]

    def cancel_load(self, request_id):
        self.calls.append(("cancel_load", request_id))
        self._pending = [(r, remote) for r, remote in getattr(self, "_pending", []) if r != request_id]

    def close(self):
        self.calls.append(("close", self.config.kv_role))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def expected(llama_dir):
    plain = LLM(llama_dir, **ENGINE)
    return [o.outputs[0].token_ids for o in plain.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _drain(engine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return done


def _prefill_then_decode(producer, consumer, abort_one=False):
    for i, prompt in enumerate(PROMPTS):
        producer.add_request(f"p{i}", prompt, FIRST_TOKEN, kv_transfer_params={"do_remote_decode": True})
    prefilled = _drain(producer)
    assert producer.kv_cache.num_used_blocks == 0  # the KV went to the host, the blocks back to the pool
    before = consumer.stats()[0].prompt_tokens_computed
    for i, prompt in enumerate(PROMPTS):
        consumer.add_request(f"c{i}", prompt, GREEDY, kv_transfer_params=prefilled[f"p{i}"].kv_transfer_params)
    if abort_one:
        consumer.abort_request("c0")
    decoded = _drain(consumer)
    assert consumer.kv_cache.num_used_blocks == 0 or consumer.kv_cache.num_evictable_blocks == \
        consumer.kv_cache.num_used_blocks
    return decoded, consumer.stats()[0].prompt_tokens_computed - before


@pytest.fixture()
def fake_engines(llama_dir, monkeypatch):
    FakeConnector.store, FakeConnector.calls, FakeConnector.fail_loads = {}, [], False
    monkeypatch.setattr(core_module, "make_connector", FakeConnector)
    producer = LLM(llama_dir, kv_transfer_config={"kv_role": "kv_producer"}, **ENGINE).engine
    consumer = LLM(llama_dir, kv_transfer_config={"kv_role": "kv_consumer"}, **ENGINE).engine
    yield producer, consumer
    producer.shutdown()
    consumer.shutdown()


def test_every_hook_in_order_and_the_tokens_of_one_engine(fake_engines, expected):
    producer, consumer = fake_engines
    decoded, computed = _prefill_then_decode(producer, consumer, abort_one=True)
    assert [decoded[f"c{i}"].outputs[0].token_ids for i in range(1, len(PROMPTS))] == expected[1:]
    assert "c0" not in decoded  # aborted while its KV was on the way: no output, nothing left behind
    assert computed == len(PROMPTS) - 1  # one prompt token each: the rest of the prompt came with its KV
    calls = FakeConnector.calls
    saves = [c for c in calls if c[0] == "save"]
    assert saves == [("save", f"p{i}", len(p)) for i, p in enumerate(PROMPTS)]
    loads = calls[len(saves):]
    assert loads[:len(PROMPTS)] == [("start_load", f"c{i}") for i in range(len(PROMPTS))]
    assert loads[len(PROMPTS)] == ("cancel_load", "c0")
    assert loads[len(PROMPTS) + 1] == ("finished_loads", [f"c{i}" for i in range(1, len(PROMPTS))])
    producer.shutdown()
    consumer.shutdown()
    assert calls[-2:] == [("close", "kv_producer"), ("close", "kv_consumer")]


def test_a_failed_load_computes_the_prompt_and_keeps_the_tokens(fake_engines, expected):
    producer, consumer = fake_engines
    FakeConnector.fail_loads = True
    decoded, computed = _prefill_then_decode(producer, consumer)
    assert [decoded[f"c{i}"].outputs[0].token_ids for i in range(len(PROMPTS))] == expected
    assert computed == sum(map(len, PROMPTS))


def test_the_zmq_connector_between_two_engines(llama_dir, expected):
    from tests.helpers.serve import free_port

    producer = LLM(llama_dir, kv_transfer_config={"kv_role": "kv_producer", "kv_port": free_port()}, **ENGINE).engine
    consumer = LLM(llama_dir, kv_transfer_config='{"kv_role": "kv_consumer"}', **ENGINE).engine
    try:
        decoded, computed = _prefill_then_decode(producer, consumer)
        assert [decoded[f"c{i}"].outputs[0].token_ids for i in range(len(PROMPTS))] == expected
        assert computed == len(PROMPTS)
        assert consumer.stats()[0].kv_received_tokens == producer.stats()[0].kv_sent_tokens == sum(map(len, PROMPTS))
    finally:
        producer.shutdown()
        consumer.shutdown()


@pytest.mark.parametrize("value,message", [
    ('{"kv_role": "kv_decoder"}', "kv_role must be one of"),
    ({"kv_role": "kv_producer", "kv_port": 0}, "kv_port must be a TCP port"),
    ({"kv_role": "kv_producer", "port": 1}, r"unknown field\(s\) port"),
    ("{not json", "not valid JSON"),
    ({"kv_port": 1}, "needs kv_role"),
])
def test_a_bad_kv_transfer_config_names_the_problem(value, message):
    with pytest.raises(ValueError, match=message):
        KVTransferConfig.parse(value)


def test_kv_transfer_params_without_a_connector_is_refused(llama_dir):
    engine = LLM(llama_dir, **ENGINE).engine
    with pytest.raises(ValueError, match="without a kv_transfer_config"):
        engine.add_request("x", [1, 2, 3], GREEDY, kv_transfer_params={"do_remote_decode": True})
    consumer = LLM(llama_dir, kv_transfer_config={"kv_role": "kv_consumer"}, **ENGINE).engine
    with pytest.raises(ValueError, match="kv_role is kv_consumer"):
        consumer.add_request("y", [1, 2, 3], GREEDY, kv_transfer_params={"do_remote_decode": True})
    with pytest.raises(ValueError, match="remote_host, remote_port and remote_request_id"):
        consumer.add_request("z", [1, 2, 3], GREEDY, kv_transfer_params={"remote_host": "h"})
    assert not consumer.has_unfinished_requests()
    consumer.shutdown()
