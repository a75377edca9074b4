"""The offline engine: ``LLM(model=...).generate(prompts, SamplingParams(...))``.

``EngineCore`` owns the model runner, scheduler and KV cache and advances them one step at a
time; ``LLM`` drives it to completion for a batch of prompts. The async server engine wraps the
same core (runtime/async_engine.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from models.default import default_model_path
from models.checkpoint import load_config, load_tokenizer, resolve_checkpoint
from models.loader import LoadedModel, load_model
from models.parallel_layers import check_shardable
from models.registry import resolve_model_class
from runtime.config import EngineConfig
from runtime.detokenizer import IncrementalDetokenizer
from runtime.distributed.executor import MultiprocExecutor
from runtime.kv_cache import KVCacheManager
from runtime.model_runner import GiB, ModelRunner
from runtime.multimodal import attach_multimodal
from runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
from runtime.platforms import current_platform
from runtime.request import Request, RequestStatus
from runtime.sampler import make_generator
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)

_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                   RequestStatus.FINISHED_ABORTED: "abort"}
_CPU_KV_SHARE = 0.25  # of available RAM, when no KV size is given on a platform without profiling
_CPU_KV_CAP = 4 * GiB


@dataclass
class _Sequence:
    """One of a request's n completions: a scheduler request plus its detokenizer."""
    request: Request
    detok: IncrementalDetokenizer | None
    output: CompletionOutput
    generator: torch.Generator | None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[_Sequence]
    metrics: RequestMetrics
    finished: bool = False

    def to_output(self) -> RequestOutput:
        """A snapshot: the engine keeps appending to its own copies after this returns."""
        outputs = [replace(s.output, token_ids=list(s.output.token_ids),
                           logprobs=None if s.output.logprobs is None else list(s.output.logprobs))
                   for s in self.sequences]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             replace(self.metrics))


def engine_max_model_len(config: EngineConfig, model_config: Any) -> int:
    max_model_len = config.max_model_len or min(model_config.max_position_embeddings, 4096)
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
        raise ValueError(f"max_num_batched_tokens={config.max_num_batched_tokens} must be >= max_model_len="
                         f"{max_model_len} when chunked prefill is off")
    return max_model_len


def make_runner(config: EngineConfig, loaded: LoadedModel, max_model_len: int) -> ModelRunner:
    return ModelRunner(
        loaded.model, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len, block_size=config.block_size, dtype=loaded.dtype,
        device=loaded.device, vocab_size=loaded.config.vocab_size,
        compilation_config=config.compilation_config, dbo=config.dbo_thresholds(),
        collectives=config.communicates)


def prepare_runner(runner: ModelRunner, num_blocks: int) -> None:
    runner.warmup()  # compiles (one trace) before the first request, not during it
    runner.allocate_kv_cache(num_blocks)
    runner.capture_graphs()  # full graphs bake in the KV cache addresses: allocate first


def plan_kv_blocks(cfg: EngineConfig, runner: ModelRunner) -> int:
    """KV cache blocks this process can hold (under tensor parallelism each rank plans, the engine
    takes the minimum)."""
    per_block = runner.bytes_per_block()
    if cfg.num_kv_blocks is not None:
        blocks, how = cfg.num_kv_blocks, "fixed by num_kv_blocks"
    elif cfg.kv_cache_memory_gb is not None:
        blocks, how = int(cfg.kv_cache_memory_gb * GiB) // per_block, "fixed by kv_cache_memory_gb"
    elif current_platform.supports_memory_profiling:
        peak = runner.profile_peak_bytes()
        info = current_platform.memory_info()
        budget = info.total_bytes * cfg.gpu_memory_utilization - (info.total_bytes - info.free_bytes) - peak
        blocks = int(budget) // per_block
        # Memory in use counts every process on the device, as vLLM's gpu_memory_utilization does.
        how = (f"profiled: activation peak {peak / GiB:.2f} GiB, {cfg.gpu_memory_utilization:.0%} of "
               f"{info.total_bytes / GiB:.1f} GiB, {(info.total_bytes - info.free_bytes) / GiB:.1f} GiB already "
               f"in use on the device")
    else:
        avail = current_platform.memory_info().free_bytes
        blocks, how = int(min(_CPU_KV_CAP, avail * _CPU_KV_SHARE)) // per_block, "share of free host memory"
        # No point holding more than every sequence at full length.
        blocks = min(blocks, cfg.max_num_seqs * runner.max_blocks_per_seq)
    if blocks < 1:
        raise RuntimeError(f"no memory left for the KV cache ({how}); lower max_num_batched_tokens, raise "
                           "gpu_memory_utilization or fix the size with kv_cache_memory_gb")
    logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %d tokens), %s", blocks, cfg.block_size,
                blocks * per_block / GiB, blocks * cfg.block_size, how)
    return blocks


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        """``loaded`` reuses an already loaded model (tests, benchmarks); else ``config.model`` is loaded."""
        self.config = config
        current_platform.configure_process()
        current_platform.manual_seed(config.seed)
        if config.enable_dbo and not config.communicates:
            logger.warning("DBO on one device: there is no communication to overlap, so the two micro-batches "
                           "only add work (each reads all weights; docs/perf.md measures the cost)")
        self.executor: MultiprocExecutor | None = None
        self.input_processor = None  # vision models: images -> patches and placeholder tokens
        if config.tensor_parallel_size > 1:
            num_blocks = self._start_workers(loaded)
        else:
            loaded = loaded or load_model(config.model or default_model_path(), config.dtype, config.device,
                                          config.compilation_config)
            if loaded.compilation_config is not None:
                config.compilation_config = loaded.compilation_config  # graphs must match how it was compiled
            self.model, self.model_config = loaded.model, loaded.config
            self.tokenizer = loaded.tokenizer()
            self.max_model_len = engine_max_model_len(config, self.model_config)
            self.runner = make_runner(config, loaded, self.max_model_len)
            self.input_processor = attach_multimodal(self.runner, loaded, config)  # before the memory profile
            num_blocks = plan_kv_blocks(config, self.runner)
            prepare_runner(self.runner, num_blocks)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_chunked_prefill=config.enable_chunked_prefill), self.kv_cache)
        self._parents: dict[str, _Parent] = {}
        self._sequences: dict[str, tuple[_Parent, _Sequence]] = {}
        self.num_steps = 0

    # ---- set-up ----------------------------------------------------------------------------
    def _start_workers(self, loaded: LoadedModel | None) -> int:
        """Tensor parallelism: one worker process per rank holds a shard of the model; this
        process keeps the scheduler, the tokenizer and the config only."""
        config = self.config
        if loaded is not None:
            raise ValueError("tensor_parallel_size > 1 loads the model in its worker processes: pass a checkpoint "
                             "path, not a model already in memory")
        ckpt = resolve_checkpoint(config.model or default_model_path())
        config.model = ckpt.display
        self.model, self.model_config = None, load_config(ckpt)
        self.tokenizer = load_tokenizer(ckpt)
        self.max_model_len = engine_max_model_len(config, self.model_config)
        model_class = resolve_model_class(self.model_config)
        if not getattr(model_class, "supports_tensor_parallel", False):
            raise ValueError(f"{model_class.__name__} does not support tensor parallelism yet: "
                             "use tensor_parallel_size=1")
        check_shardable(self.model_config, config.parallel_config())  # a clear error before any process starts
        self.runner = None
        self.executor = MultiprocExecutor(config, self.max_model_len)
        return self.executor.num_kv_blocks

    def set_dbo(self, enabled: bool) -> None:
        """Switch DBO micro-batching on or off for later steps (the engine must start with
        ``enable_dbo=True``: the micro-batch slots and their graphs are built at start-up)."""
        if self.executor is not None:
            self.executor.call_workers("set_dbo", enabled)
        else:
            self.runner.set_dbo(enabled)

    def shutdown(self) -> None:
        """Stop the worker processes (tensor parallelism); a no-op for a single-process engine."""
        if self.executor is not None:
            self.executor.shutdown()

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    images: Sequence[Any] | None = None) -> None:
        """``images``: one per image placeholder token of the prompt (arrays, tensors, paths, data: URLs)."""
        if request_id in self._parents:
            raise ValueError(f"duplicate request id {request_id!r}")
        text = prompt if isinstance(prompt, str) else None
        if text is not None and self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as token ids")
        ids = self.tokenizer.encode(prompt) if text is not None else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        multimodal = None
        if images:
            if self.input_processor is None:
                raise ValueError(f"this model ({type(self.model).__name__}) does not take images")
            ids, multimodal = self.input_processor.process(ids, images)
            self.runner.multimodal.check(multimodal)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; this model allows at most {self.max_model_len - 1} "
                             f"(max_model_len={self.max_model_len})")
        if max(ids) >= self.model_config.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        parent = _Parent(request_id, text, ids, [], RequestMetrics(time.monotonic()))
        for i in range(params.n):
            sub_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seed = None if params.seed is None else params.seed + i
            req = Request(sub_id, ids, params, eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
                          multimodal=multimodal)
            detok = (IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output,
                                            params.skip_special_tokens) if self.tokenizer is not None else None)
            gen = None
            if seed is not None and self.executor is not None:
                self.executor.set_seed(sub_id, seed)  # the sampling rank keeps the generator
            elif seed is not None:
                gen = make_generator(seed, self.runner.device)
            seq = _Sequence(req, detok, CompletionOutput(i, "", [], None, [] if params.logprobs is not None else None),
                            gen)
            parent.sequences.append(seq)
            self._sequences[sub_id] = (parent, seq)
            self.scheduler.add_request(req)
        self._parents[request_id] = parent

    def abort_request(self, request_id: str) -> bool:
        parent = self._parents.get(request_id)
        if parent is None:
            return False
        for seq in parent.sequences:
            if self.scheduler.finish_request(seq.request.request_id, RequestStatus.FINISHED_ABORTED):
                self._finish_sequence(parent, seq, RequestStatus.FINISHED_ABORTED)
        self._retire_if_done(parent)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- stepping --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step; returns the requests whose output changed."""
        sched = self.scheduler.schedule()
        touched: dict[str, _Parent] = {}
        self._collect_scheduler_aborts(sched.finished_ids, touched)
        if sched.is_empty:
            return [p.to_output() for p in touched.values()]
        if self.executor is not None:
            result = self.executor.execute(sched)
        else:
            result = self.runner.execute(sched, {sid: s.generator for sid, (_, s) in self._sequences.items()
                                                 if s.generator is not None})
        self.num_steps += 1
        finished = {r.request_id for r in self.scheduler.update_from_output(sched, result.sampled)}
        now = time.monotonic()
        for item in sched.scheduled:
            sub_id = item.request.request_id
            if sub_id not in result.sampled or sub_id not in self._sequences:
                continue
            parent, seq = self._sequences[sub_id]
            touched[parent.request_id] = parent
            parent.metrics.first_token_time = parent.metrics.first_token_time or now
            self._append_token(parent, seq, result.sampled[sub_id], result.logprobs.get(sub_id), sub_id in finished)
        for parent in touched.values():
            self._retire_if_done(parent)
        return [p.to_output() for p in touched.values()]

    def _append_token(self, parent: _Parent, seq: _Sequence, token: int, logprob, finished: bool) -> None:
        seq.output.token_ids.append(token)
        if seq.output.logprobs is not None and logprob is not None:
            seq.output.logprobs.append(logprob)
        hit_stop = False
        if seq.detok is not None:
            _, hit_stop = seq.detok.add_token(token)
            seq.output.text = seq.detok.text
        if hit_stop and not finished:
            self.scheduler.finish_request(seq.request.request_id, RequestStatus.FINISHED_STOPPED)
            finished = True
        if finished:
            self._finish_sequence(parent, seq, seq.request.status if not hit_stop else RequestStatus.FINISHED_STOPPED)

    def _collect_scheduler_aborts(self, finished_ids: list[str], touched: dict[str, _Parent]) -> None:
        for sub_id in finished_ids:
            entry = self._sequences.get(sub_id)
            if entry and entry[1].output.finish_reason is None and entry[1].request.status.is_finished:
                parent, seq = entry
                self._finish_sequence(parent, seq, seq.request.status)
                touched[parent.request_id] = parent

    def _finish_sequence(self, parent: _Parent, seq: _Sequence, status: RequestStatus) -> None:
        seq.output.finish_reason = _FINISH_REASONS[status]
        seq.output.stop_reason = seq.request.finish_reason_detail
        parent.metrics.num_cached_tokens = max(parent.metrics.num_cached_tokens, seq.request.num_cached_tokens)
        parent.metrics.num_preemptions += seq.request.num_preemptions

    def _retire_if_done(self, parent: _Parent) -> None:
        if not parent.finished and all(s.output.finished for s in parent.sequences):
            parent.finished = True
            parent.metrics.finished_time = time.monotonic()
            for seq in parent.sequences:
                self._sequences.pop(seq.request.request_id, None)
            self._parents.pop(parent.request_id, None)


class LLM:
    """Offline batch generation; ``LLM(model=None)`` loads the embedded SmolLM2."""

    def __init__(self, model: str | None = None, *, _loaded: LoadedModel | None = None, **engine_args: Any) -> None:
        self.engine = EngineCore(EngineConfig.from_kwargs(model=model, **engine_args), _loaded)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **engine_args: Any) -> "LLM":
        """An engine around a model already in memory (skips loading the checkpoint again)."""
        return cls(loaded.name, _loaded=loaded, **engine_args)

    def generate(self, prompts: str | Sequence[str] | Sequence[list[int]] | dict | Sequence[dict],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """A prompt is text, token ids, or ``{"prompt": text or ids, "images": [...]}`` for vision models."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
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

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm, leave=False)
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
