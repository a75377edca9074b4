"""A streamed reply needs every step's tokens; any other reply only the final output (no per-step snapshots)."""
from types import SimpleNamespace

import pytest

from runtime import RequestOutputKind
from runtime.serve.preprocess import Preprocessor
from runtime.serve.protocol import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize("request_type, body", [
    (CompletionRequest, {"prompt": "hi"}),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}),
])
@pytest.mark.parametrize("stream, kind", [(True, RequestOutputKind.CUMULATIVE),
                                          (False, RequestOutputKind.FINAL_ONLY)])
def test_only_streamed_replies_ask_for_every_step(request_type, body, stream, kind):
    pre = SimpleNamespace(sampling_defaults={})  # all sampling_params reads of the preprocessor
    req = request_type(model="m", stream=stream, **body)
    assert Preprocessor.sampling_params(pre, req, 16, None).output_kind is kind
