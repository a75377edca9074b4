"""The OpenAI server through the official ``openai`` client: answers, streaming, n, usage, logprobs."""
from __future__ import annotations

import httpx
import pytest

from tests.helpers.serve import metric_sum, running_server, scrape

openai = pytest.importorskip("openai")

API_KEY = "sk-graphmode-test"
NAMES = ("smollm2", "graphmode-alias")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_path):
    # The key comes from the environment here (test_serve_errors passes --api-key).
    with running_server("--served-model-name", *NAMES, env={"GRAPHMODE_API_KEY": API_KEY}) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120.0)


def test_models_lists_the_served_names(client):
    models = client.models.list()
    assert [m.id for m in models.data] == list(NAMES)
    assert models.data[0].object == "model"


def test_chat_greedy_answers_paris(client):
    resp = client.chat.completions.create(model=NAMES[0], messages=QUESTION, temperature=0, max_tokens=24)
    choice = resp.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert resp.model == NAMES[0] and resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"


def test_alias_name_is_accepted(client):
    resp = client.completions.create(model=NAMES[1], prompt="The sky is", temperature=0, max_tokens=3)
    assert resp.choices[0].text and resp.model == NAMES[0]


def test_chat_streaming_matches_non_streaming(client):
    kwargs = dict(model=NAMES[0], messages=QUESTION, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_streaming_with_stop_matches_non_streaming(client):
    # The stop string spans tokens; streamed text must not leak a prefix of it.
    kwargs = dict(model=NAMES[0], prompt="Count: 1, 2, 3,", temperature=0, max_tokens=20, stop=[" 6,", "\n\n"])
    full = client.completions.create(**kwargs)
    streamed = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    assert full.choices[0].finish_reason == "stop" and " 6," not in full.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_raw_stream_ends_with_done(server):
    body = {"model": NAMES[0], "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60.0,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_n2_with_seed_is_reproducible(client):
    kwargs = dict(model=NAMES[0], prompt="Once upon a time", n=2, seed=1234, temperature=1.0, max_tokens=12,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]  # sequence i samples with seed + i
    assert first.usage.completion_tokens == 24


def test_chat_n2_streams_both_choices(client):
    chunks = list(client.chat.completions.create(model=NAMES[0], messages=QUESTION, n=2, seed=7, temperature=0.8,
                                                 max_tokens=8, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_usage_counts_tokens(client):
    prompt_ids = [504, 3575, 282, 4649, 314, 253, 1345]
    resp = client.completions.create(model=NAMES[0], prompt=prompt_ids, max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == len(prompt_ids) + 5
    assert resp.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=NAMES[0], messages=QUESTION, max_completion_tokens=3,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3 and chat.usage.prompt_tokens > 10
    assert chat.choices[0].finish_reason == "length"


def test_batch_prompts_get_one_choice_each(client):
    resp = client.completions.create(model=NAMES[0], prompt=["The sky is", "Water is"], max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 8
    single = client.completions.create(model=NAMES[0], prompt="Water is", max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert resp.choices[1].text == single.choices[0].text


def test_completion_logprobs(client):
    resp = client.completions.create(model=NAMES[0], prompt="The capital of France is", max_tokens=4,
                                     temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == resp.choices[0].text
    assert all(x <= 0 for x in lp.token_logprobs)
    for token, top, sampled in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
        assert token in top and 2 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(sampled, abs=1e-4)  # greedy: the sampled token is the top one
    assert lp.text_offset == sorted(lp.text_offset)
    plain = client.completions.create(model=NAMES[0], prompt="Hi", max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=NAMES[0], messages=QUESTION, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert bytes(t.bytes).decode() == t.token
    streamed = list(client.chat.completions.create(model=NAMES[0], messages=QUESTION, max_tokens=5, temperature=0,
                                                   logprobs=True, top_logprobs=1, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in tokens] == [t.token for t in content]


def test_metrics_count_requests(server, client):
    before = scrape(server)
    client.completions.create(model=NAMES[0], prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
    after = scrape(server)
    generated = "graphmode:generation_tokens_total"
    assert metric_sum(after, generated) >= metric_sum(before, generated) + 3
    assert after["graphmode:request_success_total{finished_reason=length}"] >= \
        before.get("graphmode:request_success_total{finished_reason=length}", 0) + 1
    assert metric_sum(after, "graphmode:num_requests_running") == 0
    assert after["graphmode:time_to_first_token_seconds_count"] > before["graphmode:time_to_first_token_seconds_count"]
