"""The engine core: scheduler, KV block manager and detokenizers, stepping the workers one step at a time.

``EngineCore`` owns the requests; its executor (runtime/engine/executor.py) owns the workers that
hold the model. ``LLM`` (runtime/engine/llm.py) drives it to completion for a batch of prompts; the
server's ``AsyncEngine`` (runtime/engine/async_engine.py) drives it from a thread.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from models.gguf_file import gguf_parsed_once
from models.loader import LoadedModel
from runtime.contracts.config import EngineConfig
from runtime.contracts.request import Request, RequestStatus
from runtime.contracts.runner_output import StepHandle
from runtime.contracts.sampling_params import RequestOutputKind, SamplingParams, sequence_seed
from runtime.contracts.scheduler_output import SchedulerOutput
from runtime.engine.detokenizer import IncrementalDetokenizer
from runtime.engine.executor import Executor, InProcessExecutor
from runtime.engine.kv_cache import KVCacheManager
from runtime.engine.kv_transfer import KVTransfer, make_connector
from runtime.engine.multiproc_executor import MultiprocExecutor
from runtime.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from runtime.engine.scheduler import Scheduler, SchedulerConfig
from runtime.engine.served_model import ServedModel
from runtime.platforms import current_platform
from runtime.tracing import ProfilerStateError
from runtime.worker.worker import WorkerSpec

logger = logging.getLogger(__name__)

_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                   RequestStatus.FINISHED_ABORTED: "abort"}


@dataclass
class _Sequence:
    """One of a request's n completions: a scheduler request plus its detokenizer."""
    request: Request
    detok: IncrementalDetokenizer | None
    output: CompletionOutput


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[_Sequence]
    metrics: RequestMetrics
    cumulative: bool = True  # a snapshot every step it changes (else only when it finishes)
    finished: bool = False
    kv_transfer_params: dict | None = None  # where a decode instance fetches its prompt's KV (a producer's)

    def to_output(self) -> RequestOutput:
        """A snapshot: the engine keeps appending to its own copies after this returns."""
        # Built field by field: dataclasses.replace costs several times more, and this runs for every
        # request every step.
        outputs = [CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason,
                                    None if o.logprobs is None else list(o.logprobs), o.stop_reason)
                   for o in (s.output for s in self.sequences)]
        m = self.metrics
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             RequestMetrics(m.arrival_time, m.first_token_time, m.finished_time, m.num_cached_tokens,
                                            m.num_preemptions), kv_transfer_params=self.kv_transfer_params)


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        """``loaded`` reuses an already loaded model (tests, benchmarks); else ``config.model`` is loaded
        by the workers."""
        self.config = config
        if config.enable_dbo and not config.communicates:
            state, hint = ("forced", "") if config.force_dbo else ("off", "; force_dbo=True splits anyway")
            logger.warning("DBO %s on one device: there is no communication to overlap, so two micro-batches only "
                           "add work (each reads all weights; docs/perf.md measures the cost)%s", state, hint)
        # The config, the tokenizer and (in this process) the weights share one parse of a GGUF file.
        with gguf_parsed_once():
            self.served = served = ServedModel.read(config, loaded)
            self.model_config, self.tokenizer = served.model_config, served.tokenizer
            self.model_class = served.model_class
            self.vocab_size, self.sampling_defaults = served.vocab_size, served.sampling_defaults
            self.max_model_len, self.input_processor = served.max_model_len, served.input_processor
            spec = WorkerSpec(config, self.max_model_len, self.model_config)
            self.executor: Executor = (MultiprocExecutor(spec) if config.tensor_parallel_size > 1
                                       else InProcessExecutor(spec, loaded))
        self._fit_max_model_len()
        self.kv_cache = KVCacheManager(self.executor.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_chunked_prefill=config.enable_chunked_prefill), self.kv_cache)
        self.kv_transfer = (KVTransfer(make_connector(config.kv_transfer_config), self.executor, self.kv_cache,
                                       self.scheduler, config.tensor_parallel_size)
                            if config.kv_transfer_config is not None else None)
        self._parents: dict[str, _Parent] = {}
        self._sequences: dict[str, tuple[_Parent, _Sequence]] = {}
        self._num_with_penalties = 0  # unfinished requests whose sampling reads their earlier tokens
        self.async_scheduling = self._resolve_async_scheduling()
        self._in_flight: _InFlight | None = None  # the step launched last, results not taken in yet
        self.num_steps = 0
        self.device_wait_s = 0.0  # time step() spent blocked on the device's results (the rest is host work)
        self.graph_replays = 0  # rank 0's, reported by its worker with each step
        self.eager_steps = 0
        self.profiling = False  # between start_profile and stop_profile

    def _fit_max_model_len(self) -> None:
        """One sequence of max_model_len tokens must fit the KV cache: an explicit max_model_len that does
        not is refused (as vLLM does); the default one is lowered to what fits."""
        capacity = self.executor.num_kv_blocks * self.config.block_size
        if capacity >= self.max_model_len:
            return
        if self.config.max_model_len is not None:
            self.executor.shutdown()
            raise ValueError(f"max_model_len={self.max_model_len} does not fit the KV cache: "
                             f"{self.executor.num_kv_blocks} blocks of {self.config.block_size} hold {capacity} tokens; "
                             f"lower max_model_len to at most {capacity} or give the cache more memory "
                             "(kv_cache_memory_gb, gpu_memory_utilization or num_kv_blocks)")
        logger.info("max_model_len lowered from %d to %d: what the KV cache holds", self.max_model_len, capacity)
        self.max_model_len = capacity

    def _resolve_async_scheduling(self) -> bool:
        wanted = self.config.async_scheduling
        if self.config.tensor_parallel_size > 1 or self.config.experts_over_data_parallel:
            if wanted:
                logger.info("async scheduling: off under tensor parallelism and data-parallel expert parallelism "
                            "(each step's collectives complete before the next is scheduled)")
            return False
        return current_platform.async_scheduling_default if wanted is None else wanted

    def set_async_scheduling(self, enabled: bool) -> None:
        """Switch async scheduling for later steps (benchmarks compare both on one engine); only between
        runs: with a step in flight it raises."""
        if enabled and self.config.tensor_parallel_size > 1:
            raise ValueError("async scheduling runs on one rank only (tensor_parallel_size=1)")
        if self._in_flight is not None:
            raise RuntimeError("a step is in flight: switch between runs, when has_unfinished_requests() is False")
        self.async_scheduling = enabled

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams with the checkpoint's recommended defaults (``generation_config``) under ``overrides``."""
        return self.served.default_sampling_params(**overrides)

    def start_profile(self, directory: str) -> None:
        """Every rank starts a torch profiler trace (runtime/tracing.py)."""
        # Checked here: a worker that raised would be taken for a failed rank and the engine stopped.
        if self.profiling:
            raise ProfilerStateError("the profiler is already running: stop it first")
        self.executor.call_workers("trace_start", directory)
        self.profiling = True

    def stop_profile(self) -> list[str]:
        """Every rank ends its trace; the files written, rank 0's first."""
        if not self.profiling:
            raise ProfilerStateError("the profiler is not running: start it first")
        self.profiling = False
        return self.executor.call_workers("trace_stop")

    def set_dbo(self, enabled: bool) -> None:
        """Switch DBO micro-batching on or off for later steps (the engine must start with
        ``enable_dbo=True``: the micro-batch slots and their graphs are built at start-up). Where the
        policy keeps DBO off (one device, not forced), switching it on leaves it off."""
        if enabled and self.config.enable_dbo and not self.config.dbo_active:
            return
        self.executor.call_workers("set_dbo", enabled)

    def startup_report(self) -> dict[str, float | int]:
        """Rank 0's start-up: seconds per phase, graphs captured, graph pool, compile-cache hits/misses."""
        return self.executor.call_workers("startup_report")[0]

    def shutdown(self) -> None:
        """Stop the workers (their processes, under tensor parallelism) and the KV connector."""
        if self.kv_transfer is not None:
            self.kv_transfer.close()
        self.executor.shutdown()

    # ---- what a front reads (the same calls as the data-parallel client's) ------------------
    def stats(self) -> list[EngineStats]:
        """This engine core's load: one entry (the data-parallel client gives one per core)."""
        kv, sched = self.kv_cache, self.scheduler
        connector = self.kv_transfer.connector if self.kv_transfer is not None else None
        return [EngineStats(sched.num_running, sched.num_waiting, kv.usage, kv.num_used_blocks, kv.num_blocks,
                            kv.hit_rate, self.num_steps, self.graph_replays, self.eager_steps,
                            prompt_tokens_computed=sched.num_prompt_tokens_computed,
                            kv_sent_tokens=connector.sent_tokens if connector else 0,
                            kv_received_tokens=connector.received_tokens if connector else 0)]

    def health_problem(self) -> str | None:
        """None: a failure of this core's workers surfaces as an error of its next step."""
        return None

    def check_health(self) -> None:
        """Called while idle; this core's failures surface at its next step, so there is nothing to check."""

    def take_failed_requests(self) -> list[tuple[str, Exception]]:
        """Requests that failed after they were accepted: none here (add_request raises at once)."""
        return []

    def dummy_step(self) -> None:
        """A one-token forward that writes no KV and samples nothing: a data-parallel rank with no work runs it
        so that every rank enters each step's expert collectives."""
        self.executor.call_workers("dummy_step")

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    images: Sequence[Any] | None = None, kv_transfer_params: dict[str, Any] | None = None) -> None:
        """``images``: one per image placeholder token of the prompt (arrays, tensors, paths, data: URLs);
        ``kv_transfer_params``: prefill for a decode instance (``{"do_remote_decode": true}``), or fetch the
        prompt's KV from a prefill instance (its response's params) - runtime/engine/kv_connector.py."""
        if request_id in self._parents:
            raise ValueError(f"duplicate request id {request_id!r}")
        text = prompt if isinstance(prompt, str) else None
        ids = self.served.prompt_ids(prompt)
        multimodal = None
        if images:
            self.served.check_takes_images()
            ids, multimodal = self.input_processor.process(ids, images)
            self.input_processor.check(multimodal)
        self.served.check_prompt_length(ids, self.max_model_len)
        if kv_transfer_params and self.kv_transfer is None:
            raise ValueError("kv_transfer_params given, but this instance runs without a kv_transfer_config")
        if kv_transfer_params and params.n != 1:
            raise ValueError("kv_transfer_params needs n=1 (one sequence's KV moves between instances)")
        parent = _Parent(request_id, text, ids, [], RequestMetrics(time.monotonic()),
                         cumulative=params.output_kind is RequestOutputKind.CUMULATIVE)
        # Every completion is built before any is scheduled: a request is accepted whole or not at all.
        for i in range(params.n):
            sub_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seed = None if params.seed is None else sequence_seed(params.seed, i)
            req = Request(sub_id, ids, params, eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
                          multimodal=multimodal, seed=seed)
            detok = (IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output,
                                            params.skip_special_tokens) if self.tokenizer is not None else None)
            parent.sequences.append(
                _Sequence(req, detok, CompletionOutput(i, "", [], None, [] if params.logprobs is not None else None)))
        self._parents[request_id] = parent
        self._num_with_penalties += params.has_penalties
        transferring = self.kv_transfer is not None and self.kv_transfer.add(parent.sequences[0].request,
                                                                              kv_transfer_params)
        for seq in parent.sequences:
            self._sequences[seq.request.request_id] = (parent, seq)
            if not transferring:  # else it joins the scheduler once its KV has arrived
                self.scheduler.add_request(seq.request)

    def abort_request(self, request_id: str) -> bool:
        parent = self._parents.get(request_id)
        if parent is None:
            return False
        for seq in parent.sequences:
            sub_id = seq.request.request_id
            if self.scheduler.finish_request(sub_id, RequestStatus.FINISHED_ABORTED) or \
                    (self.kv_transfer is not None and self.kv_transfer.abort(sub_id)):
                self._finish_sequence(parent, seq, RequestStatus.FINISHED_ABORTED)
        self._retire_if_done(parent)
        return True

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or self._in_flight is not None
                or (self.kv_transfer is not None and self.kv_transfer.has_waiting))

    # ---- stepping --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step; returns the requests whose output changed (those asking for
        ``RequestOutputKind.FINAL_ONLY``: only when they finish).

        Synchronous: schedule, run, take the results in. Async scheduling: schedule and launch this step,
        then take in the previous step's results while this one runs on the device (its inputs read the
        previous step's tokens there); this step's results are taken in by the next call.
        """
        if self.kv_transfer is not None:
            self.kv_transfer.admit_loaded()  # requests whose prompt KV arrived from a prefill instance
        sched = self.scheduler.schedule()
        touched: dict[str, _Parent] = {}
        self._collect_scheduler_aborts(sched.finished_ids, touched)
        launched = None
        if self._in_flight is not None and self._num_with_penalties and _needs_output_history(sched):
            self._take_in(touched)  # penalties read every earlier token on the host
            # What those tokens finished (a stop, EOS) gave its KV blocks back: it cannot run.
            sched.scheduled = [item for item in sched.scheduled if not item.request.is_finished]
        if not sched.is_empty:
            launched = _InFlight(sched, self.executor.launch(sched))
            self.num_steps += 1
        if self._in_flight is not None:
            self._take_in(touched)
        self._in_flight = launched
        if launched is not None and not self.async_scheduling:
            self._take_in(touched)
        for parent in touched.values():
            self._retire_if_done(parent)  # also the requests the scheduler gave up on, when nothing ran
        return [p.to_output() for p in touched.values() if p.cumulative or p.finished]

    def _take_in(self, touched: dict[str, _Parent]) -> None:
        """Wait for the step in flight and hand each sampled token to its sequence."""
        waited = time.perf_counter()
        sched, result = self._in_flight.sched, self._in_flight.handle.result()
        self.device_wait_s += time.perf_counter() - waited
        self._in_flight = None
        self.graph_replays += result.graph_replays
        self.eager_steps += result.eager_steps
        finished = {r.request_id for r in self.scheduler.update_from_output(sched, result.sampled)}
        now = time.monotonic()
        sequences, logprobs = self._sequences, result.logprobs
        for sub_id, token in result.sampled.items():  # this loop runs for every request every step
            entry = sequences.get(sub_id)
            if entry is None or entry[1].output.finish_reason is not None:
                continue  # finished (aborted, stopped) after the step was launched
            parent, seq = entry
            if parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
            if self._append_token(parent, seq, token, logprobs.get(sub_id) if logprobs else None, sub_id in finished):
                touched[parent.request_id] = parent
            elif parent.cumulative:
                touched[parent.request_id] = parent
        if self.kv_transfer is not None:
            for sub_id, params in self.kv_transfer.save_finished().items():  # prefill for a decode instance
                parent = sequences[sub_id][0] if sub_id in sequences else self._parents.get(sub_id)
                if parent is not None:
                    parent.kv_transfer_params = params

    def _append_token(self, parent: _Parent, seq: _Sequence, token: int, logprob, finished: bool) -> bool:
        """Hand ``token`` to the sequence's output; True when it finished the sequence."""
        seq.output.token_ids.append(token)
        if seq.output.logprobs is not None and logprob is not None:
            seq.output.logprobs.append(logprob)
        hit_stop = False
        if seq.detok is not None:
            _, hit_stop = seq.detok.add_token(token)
            seq.output.text = seq.detok.text
        if hit_stop:
            seq.request.finish_reason_detail = seq.detok.matched_stop  # OpenAI's stop_reason: the string
        if hit_stop and not finished:
            self.scheduler.finish_request(seq.request.request_id, RequestStatus.FINISHED_STOPPED)
            finished = True
        if finished:
            self._finish_sequence(parent, seq, seq.request.status if not hit_stop else RequestStatus.FINISHED_STOPPED)
        return finished

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
            self._num_with_penalties -= parent.sequences[0].request.sampling_params.has_penalties
            for seq in parent.sequences:
                self._sequences.pop(seq.request.request_id, None)
            self._parents.pop(parent.request_id, None)


@dataclass
class _InFlight:
    sched: SchedulerOutput
    handle: StepHandle


def _needs_output_history(sched: SchedulerOutput) -> bool:
    """A step whose sampling reads a request's earlier output tokens on the host (penalties) must see the
    token of the step still in flight."""
    return any(item.samples and item.request.sampling_params.has_penalties for item in sched.scheduled)
