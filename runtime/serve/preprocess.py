"""From a validated request to engine inputs: token ids checked against the context, and SamplingParams.

Tokenisation and chat templating run on one worker thread, not on the event loop (a 4 MiB prompt
takes a while to tokenise); the engine then only ever receives token ids.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from runtime.contracts.sampling_params import RequestOutputKind, SamplingParams
from runtime.engine.async_engine import AsyncEngine
from runtime.serve.errors import APIError, bad_request, from_sampling_error
from runtime.serve.images import decode_images, image_placeholder
from runtime.serve.protocol import ChatCompletionRequest, CompletionRequest, _SamplingRequest
from runtime.serve.settings import ServerSettings

_TOKENIZER_THREADS = 4

DEFAULT_COMPLETION_MAX_TOKENS = 16
# Sampling fields a request may leave out (null): the generation config's default, else SamplingParams'.
_DEFAULTED_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty")


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None
    images: list | None = None  # decoded images, one per image placeholder (vision models)


class Preprocessor:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.core.max_model_len
        self.vocab_size: int = engine.core.vocab_size
        # The checkpoint's recommended sampling, for the fields a request leaves out.
        self.sampling_defaults: dict[str, Any] = engine.core.sampling_defaults
        self.settings = settings
        self.image_placeholder = image_placeholder(engine.core)
        # The longest text a context of max_model_len tokens can hold: past it a prompt is refused unread.
        self.max_prompt_chars = self.max_model_len * max_token_chars(self.tokenizer)
        # Fast tokenizers release the GIL: a few threads keep one long prompt from holding up short ones.
        self._pool = ThreadPoolExecutor(_TOKENIZER_THREADS, thread_name_prefix="graphmode-tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _in_pool(self, fn, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- checks shared by both endpoints ----------------------------------------------------
    def check_common(self, req: _SamplingRequest) -> None:
        names = self.settings.served_model_names
        if req.model is not None and req.model not in names:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {', '.join(names)}",
                           param="model", code="model_not_found")
        if req.n > self.settings.max_n:
            raise bad_request(f"n must be <= {self.settings.max_n}, got {req.n}", param="n")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported by this server", param="logit_bias",
                              code="unsupported_parameter")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > self.settings.max_stop_strings:
            raise bad_request(f"at most {self.settings.max_stop_strings} stop strings are allowed, got {len(stops)}",
                              param="stop")

    def _check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad_request(f"{param} must not be empty", param=param)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise bad_request(f"{param} token ids must be in [0, {self.vocab_size})", param=param)
        if len(ids) >= self.max_model_len:
            what = "messages (after the chat template)" if param == "messages" else param
            raise bad_request(f"{what} has {len(ids)} tokens, but this model's maximum context length is "
                              f"{self.max_model_len} tokens and at least one must be left for the completion",
                              param=param, code="context_length_exceeded")

    def max_tokens(self, prompt_len: int, requested: int | None, param: str, default: int | None) -> int:
        """The request's token budget; 400 (naming ``param``) when it cannot fit the context."""
        room = self.max_model_len - prompt_len
        if requested is None:
            return room if default is None else min(default, room)
        if requested < 1:
            raise bad_request(f"{param} must be >= 1, got {requested}", param=param)
        if prompt_len + requested > self.max_model_len:
            raise bad_request(f"this model's maximum context length is {self.max_model_len} tokens, but "
                              f"{prompt_len + requested} were requested ({prompt_len} in the prompt, {requested} "
                              f"for {param}); reduce the prompt or {param}", param=param,
                              code="context_length_exceeded")
        return requested

    # ---- prompts ------------------------------------------------------------------------------
    async def completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        if req.echo:
            raise bad_request("echo is not supported by this server", param="echo", code="unsupported_parameter")
        if req.suffix:
            raise bad_request("suffix is not supported by this server", param="suffix", code="unsupported_parameter")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of must equal n (or be left out)", param="best_of", code="unsupported_parameter")
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise bad_request("prompt must not be empty", param="prompt")
        if len(raw) > self.settings.max_batch_prompts:
            raise bad_request(f"at most {self.settings.max_batch_prompts} prompts per request, got {len(raw)}",
                              param="prompt")
        texts = [p for p in raw if isinstance(p, str)]
        if any(not t for t in texts):
            raise bad_request("prompt must not be empty", param="prompt")
        encoded = iter(await self._in_pool(self._encode_all, texts) if texts else [])
        prompts = []
        for p in raw:
            prompt = Prompt(next(encoded), p) if isinstance(p, str) else Prompt(list(p))
            self._check_ids(prompt.token_ids, "prompt")
            prompts.append(prompt)
        return prompts

    def _encode_all(self, texts: list[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids", param="prompt")
        for text in texts:
            self._check_chars(text, "prompt")
        return [self.tokenizer.encode(_unicode(t, "prompt")) for t in texts]

    def _check_chars(self, text: str, param: str) -> None:
        """Refuse a text too long for the context before tokenizing it (seconds for megabytes)."""
        if len(text) > self.max_prompt_chars:
            raise bad_request(f"{param} has {len(text)} characters: more than this model's maximum context of "
                              f"{self.max_model_len} tokens can hold", param=param, code="context_length_exceeded")

    async def chat_prompt(self, req: ChatCompletionRequest) -> Prompt:
        if not req.messages:
            raise bad_request("messages must not be empty", param="messages")
        if req.tools:
            raise bad_request("tools are not supported by this server", param="tools", code="unsupported_parameter")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", param="response_format",
                              code="unsupported_parameter")
        urls = [url for m in req.messages for url in m.image_urls()]
        if urls and self.image_placeholder is None:
            raise bad_request("messages contain images, but this model does not take images", param="messages")
        images = await self._in_pool(decode_images, urls) if urls else None
        conversation = [{"role": m.role, "content": m.text(self.image_placeholder or ""),
                         **({"name": m.name} if m.name else {})} for m in req.messages]
        text, ids = await self._in_pool(self._render_chat, conversation, req.add_generation_prompt)
        self._check_ids(ids, "messages")
        return Prompt(ids, text, images)

    def _render_chat(self, conversation: list[dict], add_generation_prompt: bool) -> tuple[str, list[int]]:
        tok = self.tokenizer
        if tok is None or getattr(tok, "chat_template", None) is None:
            raise bad_request("this model has no chat template: use /v1/completions", param="messages")
        try:
            text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError and friends: the messages don't fit it
            raise bad_request(f"the chat template rejected the messages: {e}", param="messages") from None
        self._check_chars(text, "messages")
        return text, tok.encode(_unicode(text, "messages"), add_special_tokens=False)

    # ---- sampling -----------------------------------------------------------------------------
    def default_max_tokens(self) -> int | None:
        """The generation config's max_new_tokens, for a request that names no budget."""
        return self.sampling_defaults.get("max_tokens")

    def sampling_params(self, req: _SamplingRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
        given = {name: getattr(req, name) for name in _DEFAULTED_FIELDS if getattr(req, name) is not None}
        # One dict, later keys winning: the generation config's defaults, then the request's own values.
        values = {**self.sampling_defaults, **given,
                  "n": req.n, "seed": req.seed, "max_tokens": max_tokens, "min_tokens": req.min_tokens, "stop": req.stop,
                  "stop_token_ids": list(req.stop_token_ids or []), "ignore_eos": req.ignore_eos, "logprobs": logprobs,
                  "skip_special_tokens": req.skip_special_tokens,
                  "include_stop_str_in_output": req.include_stop_str_in_output,
                  # A streamed reply sends every step's tokens; any other only the final output.
                  "output_kind": RequestOutputKind.CUMULATIVE if req.stream else RequestOutputKind.FINAL_ONLY}
        try:
            return SamplingParams(**values)
        except ValueError as e:
            raise from_sampling_error(e) from None


def _unicode(text: str, param: str) -> str:
    """``text``, refused when JSON smuggled in a lone UTF-16 surrogate (``"\\ud800"``): no tokenizer encodes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} contains a lone surrogate {text[e.start]!a} at character {e.start}: not valid "
                          "Unicode text", param=param) from None
    return text


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token decodes to: its longest vocabulary entry (byte-level and
    sentencepiece vocabularies spell a token with at least as many characters as it decodes to)."""
    if tokenizer is None:
        return 1
    return max((len(token) for token in tokenizer.get_vocab()), default=1)
