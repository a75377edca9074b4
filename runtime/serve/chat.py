"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, optionally streamed."""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from runtime.contracts.sampling_params import MAX_LOGPROBS
from runtime.engine.outputs import RequestOutput
from runtime.serve.errors import bad_request
from runtime.serve.protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChatStreamChoice)
from runtime.serve.serving import ServingBase, error_event
from runtime.serve.streaming import DONE, SSEResponse, TextDeltas, merge, sse


class ChatEndpoint(ServingBase):
    @staticmethod
    def _top_logprobs(req: ChatCompletionRequest) -> int | None:
        """The engine's logprobs setting: None (off) or how many alternatives to return."""
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                              param="top_logprobs")
        return (req.top_logprobs or 0) if req.logprobs else None

    async def __call__(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.pre.check_common(req)
        top = self._top_logprobs(req)
        prompt = await self.pre.chat_prompt(req)
        if req.max_completion_tokens is not None:
            budget_param, budget = "max_completion_tokens", req.max_completion_tokens
        else:
            budget_param, budget = "max_tokens", req.max_tokens
        params = self.pre.sampling_params(req, self.pre.max_tokens(len(prompt.token_ids), budget, budget_param,
                                                                  self.pre.default_max_tokens()),
                                          top)
        request_id, created = self.new_id("chatcmpl")
        streams = self.start(request_id, [prompt], [params], self.pinned_rank(raw), req.kv_transfer_params)
        if req.stream:
            return SSEResponse(self._events(req, request_id, created, streams[0], params.stop, top))
        (final,) = await self.collect(raw.receive, streams)
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                              logprobs=(self.chat_logprobs(c.token_ids, c.logprobs or [], 0, len(c.token_ids), top)
                                        if top is not None else None),
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in final.outputs]
        body = ChatCompletionResponse(id=request_id, created=created, model=self.settings.model_name,
                                      choices=choices, usage=self.usage([final]),
                                      kv_transfer_params=final.kv_transfer_params)
        return JSONResponse(body.model_dump())

    def _chunk(self, request_id: str, created: int, choice: ChatStreamChoice | None, usage=None) -> bytes:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=self.settings.model_name,
                                       choices=[choice] if choice else [], usage=usage).model_dump())

    async def _events(self, req: ChatCompletionRequest, request_id: str, created: int,
                      stream: AsyncIterator[RequestOutput], stop: list[str], top: int | None) -> AsyncIterator[bytes]:
        deltas = TextDeltas(stop)
        final = None
        try:
            for i in range(req.n):
                yield self._chunk(request_id, created, ChatStreamChoice(index=i, delta={"role": "assistant",
                                                                                        "content": ""}))
            async with contextlib.aclosing(merge([stream])) as merged:
                async for _, out in merged:
                    final = out
                    for c in out.outputs:
                        if c.index in deltas.finished:
                            continue
                        text = deltas.text(c.index, c.text, c.finished)
                        start, end = deltas.tokens(c.index, len(c.token_ids))
                        if text or (top is not None and end > start):
                            logprobs = (self.chat_logprobs(c.token_ids, c.logprobs or [], start, end, top)
                                        if top is not None else None)
                            yield self._chunk(request_id, created,
                                              ChatStreamChoice(index=c.index, delta={"content": text},
                                                               logprobs=logprobs))
                        if c.finished:
                            deltas.finished.add(c.index)
                            yield self._chunk(request_id, created, ChatStreamChoice(
                                index=c.index, delta={}, finish_reason=c.finish_reason))
            if final is not None and req.stream_options is not None and req.stream_options.include_usage:
                yield self._chunk(request_id, created, None, usage=self.usage([final]))
        except Exception as e:  # noqa: BLE001 - the stream ends with an error event, never silently
            yield error_event(e)
        yield DONE
