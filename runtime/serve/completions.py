"""POST /v1/completions: one or more prompts (text or token ids), n completions each, optionally streamed."""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from runtime.engine.outputs import RequestOutput
from runtime.serve.preprocess import DEFAULT_COMPLETION_MAX_TOKENS
from runtime.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from runtime.serve.serving import ServingBase, error_event
from runtime.serve.streaming import DONE, SSEResponse, TextDeltas, merge, sse


class CompletionsEndpoint(ServingBase):
    async def __call__(self, req: CompletionRequest, raw: Request) -> Response:
        self.pre.check_common(req)
        prompts = await self.pre.completion_prompts(req)
        params = [self.pre.sampling_params(
            req, self.pre.max_tokens(len(p.token_ids), req.max_tokens, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS),
            req.logprobs) for p in prompts]
        request_id, created = self.new_id("cmpl")
        streams = self.start(request_id, prompts, params, self.pinned_rank(raw), req.kv_transfer_params)
        if req.stream:
            return SSEResponse(self._events(req, request_id, created, streams, params[0].stop))
        finals = await self.collect(raw.receive, streams)
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                logprobs = (self.completion_logprobs(c.token_ids, c.logprobs or [], 0, len(c.token_ids), req.logprobs)
                            if req.logprobs is not None else None)
                choices.append(CompletionChoice(index=i * req.n + c.index, text=c.text, logprobs=logprobs,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        body = CompletionResponse(id=request_id, created=created, model=self.settings.model_name, choices=choices,
                                  usage=self.usage(finals), kv_transfer_params=finals[0].kv_transfer_params)
        return JSONResponse(body.model_dump())

    async def _events(self, req: CompletionRequest, request_id: str, created: int,
                      streams: list[AsyncIterator[RequestOutput]], stop: list[str]) -> AsyncIterator[bytes]:
        deltas = TextDeltas(stop)
        finals: dict[int, RequestOutput] = {}
        try:
            async with contextlib.aclosing(merge(streams)) as merged:
                async for i, out in merged:
                    for c in out.outputs:
                        index = i * req.n + c.index
                        if index in deltas.finished:
                            continue
                        text = deltas.text(index, c.text, c.finished)
                        start, end = deltas.tokens(index, len(c.token_ids))
                        if not text and not c.finished and (req.logprobs is None or start == end):
                            continue
                        logprobs = (self.completion_logprobs(c.token_ids, c.logprobs or [], start, end, req.logprobs)
                                    if req.logprobs is not None else None)
                        if c.finished:
                            deltas.finished.add(index)
                        choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                        yield sse(CompletionResponse(id=request_id, created=created, model=self.settings.model_name,
                                                     choices=[choice]).model_dump())
                    if out.finished:
                        finals[i] = out
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = self.usage(list(finals.values()))
                yield sse(CompletionResponse(id=request_id, created=created, model=self.settings.model_name,
                                             choices=[], usage=usage).model_dump())
        except Exception as e:  # noqa: BLE001 - the stream ends with an error event, never silently
            yield error_event(e)
        yield DONE
