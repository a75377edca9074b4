"""What both generation endpoints share: starting engine requests, collecting them, errors, usage, logprobs."""
from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from typing import AsyncIterator

from starlette.requests import Request

from runtime.engine.async_engine import AsyncEngine, EngineDeadError
from runtime.engine.outputs import RequestOutput
from runtime.contracts.sampling_params import SamplingParams
from runtime.serve.errors import APIError, bad_request
from runtime.serve.metrics import ServerMetrics
from runtime.serve.preprocess import Preprocessor, Prompt
from runtime.serve.protocol import (ChatLogprobs, CompletionLogprobs, PromptTokensDetails, TokenLogprob, TopLogprob,
                                    Usage)
from runtime.serve.settings import ServerSettings
from runtime.serve.streaming import merge, sse, watch_disconnect

logger = logging.getLogger(__name__)

_MIN_LOGPROB = -9999.0  # JSON has no -inf
DATA_PARALLEL_RANK_HEADER = "X-data-parallel-rank"


def engine_error(e: Exception) -> APIError:
    if isinstance(e, EngineDeadError):
        return APIError(503, f"the engine is not running: {e}")
    if isinstance(e, ValueError):
        return bad_request(str(e))
    raise e


def error_event(e: Exception) -> bytes:
    """The last event of a stream that failed after its 200 went out."""
    if isinstance(e, (EngineDeadError, ValueError)):
        return sse(engine_error(e).body())
    logger.error("stream failed", exc_info=e)
    return sse(APIError(500, "internal server error; see the server log").body())


def _clamp(logprob: float) -> float:
    return _MIN_LOGPROB if math.isnan(logprob) or logprob < _MIN_LOGPROB else float(logprob)


class ServingBase:
    def __init__(self, engine: AsyncEngine, pre: Preprocessor, metrics: ServerMetrics,
                 settings: ServerSettings) -> None:
        self.engine, self.pre, self.metrics, self.settings = engine, pre, metrics, settings
        self._token_text: dict[int, str] = {}

    @staticmethod
    def new_id(prefix: str) -> tuple[str, int]:
        return f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def start(self, request_id: str, prompts: list[Prompt], params: list[SamplingParams],
              rank: int | None = None, kv_transfer_params: dict | None = None) -> list[AsyncIterator[RequestOutput]]:
        """One tracked engine stream per prompt (nothing reaches the engine until they are iterated); ``rank``
        pins them to that data-parallel engine core; ``kv_transfer_params`` (one prompt only) moves its KV
        between a prefill and a decode instance."""
        extra: dict = {} if rank is None else {"data_parallel_rank": rank}
        if kv_transfer_params is not None:
            if len(prompts) != 1:
                raise bad_request("kv_transfer_params takes one prompt per request", param="kv_transfer_params")
            extra["kv_transfer_params"] = kv_transfer_params
        return [self.metrics.track(self.engine.generate(request_id if len(prompts) == 1 else f"{request_id}-{i}",
                                                        p.token_ids, sp, **extra,
                                                        **({"images": p.images} if p.images else {})))
                for i, (p, sp) in enumerate(zip(prompts, params))]

    def pinned_rank(self, request: Request) -> int | None:
        """The engine core the ``X-data-parallel-rank`` header pins a request to (vLLM's), checked here: 400 for
        anything but a rank in [0, data_parallel_size)."""
        value = request.headers.get(DATA_PARALLEL_RANK_HEADER)
        if value is None:
            return None
        size = self.settings.data_parallel_size
        try:
            rank = int(value)
        except ValueError:
            rank = -1
        if not 0 <= rank < size:
            raise bad_request(f"{DATA_PARALLEL_RANK_HEADER} must be an engine core's rank in [0, {size}), got "
                              f"{value!r}", code="invalid_data_parallel_rank")
        return rank

    async def collect(self, receive, streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
        """Final outputs, one per stream; a client disconnect cancels (aborts) them all."""
        finals: list[RequestOutput | None] = [None] * len(streams)
        try:
            async with watch_disconnect(receive), contextlib.aclosing(merge(streams)) as merged:
                async for i, out in merged:
                    finals[i] = out
        except (EngineDeadError, ValueError) as e:
            raise engine_error(e) from None
        if any(f is None or not f.finished for f in finals):
            raise APIError(503, "the request ended before it finished (the engine is shutting down?)")
        return finals  # type: ignore[return-value]

    @staticmethod
    def usage(outputs: list[RequestOutput]) -> Usage:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        cached = sum(o.metrics.num_cached_tokens for o in outputs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    # ---- logprobs -------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            tok = self.engine.tokenizer
            text = tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)
            self._token_text[token_id] = text
        return text

    def completion_logprobs(self, token_ids: list[int], entries: list, start: int, end: int,
                            top_k: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        offset = sum(len(self.token_text(t)) for t in token_ids[:start])
        for tid, entry in zip(token_ids[start:end], entries[start:end]):
            text = self.token_text(tid)
            sampled, top = entry
            out.tokens.append(text)
            out.token_logprobs.append(_clamp(sampled))
            if top_k > 0:
                alternatives = {self.token_text(t): _clamp(lp) for t, lp in (top or [])[:top_k]}
                alternatives.setdefault(text, _clamp(sampled))
                out.top_logprobs.append(alternatives)
            else:
                out.top_logprobs.append(None)
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def chat_logprobs(self, token_ids: list[int], entries: list, start: int, end: int, top_k: int) -> ChatLogprobs:
        content = []
        for tid, (sampled, top) in zip(token_ids[start:end], entries[start:end]):
            text = self.token_text(tid)
            alternatives = [TopLogprob(token=self.token_text(t), logprob=_clamp(lp),
                                       bytes=list(self.token_text(t).encode()))
                            for t, lp in (top or [])[:top_k]]
            content.append(TokenLogprob(token=text, logprob=_clamp(sampled), bytes=list(text.encode()),
                                        top_logprobs=alternatives))
        return ChatLogprobs(content=content)
