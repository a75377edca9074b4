"""Offline batch generation: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from tqdm.auto import tqdm

from models.loader import LoadedModel
from runtime.contracts.config import EngineConfig
from runtime.contracts.sampling_params import RequestOutputKind, SamplingParams
from runtime.engine.core import EngineCore
from runtime.engine.outputs import RequestOutput


class LLM:
    """Offline batch generation; ``LLM(model=None)`` loads the embedded SmolLM2. ``data_parallel_size=N``
    spreads the prompts over N engine cores, each a process with its own device(s)."""

    def __init__(self, model: str | None = None, *, _loaded: LoadedModel | None = None, **engine_args: Any) -> None:
        config = EngineConfig.from_kwargs(model=model, **engine_args)
        if config.data_parallel_size > 1 and _loaded is None:
            # Imported here: its messaging (pyzmq, msgspec) is needed by data parallelism alone.
            from runtime.engine.dp_client import DataParallelClient
            self.engine: EngineCore | Any = DataParallelClient(config)
        else:
            self.engine = EngineCore(config, _loaded)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **engine_args: Any) -> "LLM":
        """An engine around a model already in memory (skips loading the checkpoint again)."""
        return cls(loaded.name, _loaded=loaded, **engine_args)

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` and ``chat`` use when given no SamplingParams: the checkpoint's recommended
        sampling (its generation_config.json; ``generation_config="vllm"`` for SamplingParams' defaults)."""
        return self.engine.default_sampling_params()

    def generate(self, prompts: str | Sequence[str] | Sequence[list[int]] | dict | Sequence[dict],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """A prompt is text, token ids, or ``{"prompt": text or ids, "images": [...]}`` for vision models."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        params_list = _final_only(params_list)
        ids = []
        for prompt, p in zip(prompts, params_list):
            self._counter += 1
            ids.append(str(self._counter))
            if isinstance(prompt, dict):
                unknown = sorted(set(prompt) - {"prompt", "images"})
                if unknown or "prompt" not in prompt:
                    raise ValueError(f"a prompt dict takes the keys 'prompt' and 'images'; got {sorted(prompt)}")
                self.engine.add_request(ids[-1], prompt["prompt"], p, images=prompt.get("images"))
            else:
                self.engine.add_request(ids[-1], prompt, p)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        token_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_ids, sampling_params, use_tqdm)

    def shutdown(self) -> None:
        """Stop the engine's processes (tensor-parallel workers, data-parallel engine cores) now, not at exit."""
        self.engine.shutdown()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", leave=False,
                   disable=None if use_tqdm else True)  # None: only on a terminal (no \r codes in logs)
        while self.engine.has_unfinished_requests() or len(done) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id not in done:
                    done[out.request_id] = out
                    bar.update(1)
            if not self.engine.has_unfinished_requests() and len(done) < len(ids):
                raise RuntimeError("engine stopped with requests unaccounted for: "
                                   f"{sorted(set(ids) - set(done))}")
        bar.close()
        return [done[i] for i in ids]


def _final_only(params_list: list[SamplingParams]) -> list[SamplingParams]:
    """The same parameters asking for one output per request, at its end: generate() returns only
    those, and the engine then skips a snapshot of every request at every step."""
    copies: dict[int, SamplingParams] = {}
    for p in params_list:
        if id(p) not in copies:
            copies[id(p)] = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
    return [copies[id(p)] for p in params_list]
