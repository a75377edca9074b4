"""Turns a scheduler step into one model forward: inputs in persistent buffers, metadata, sampling."""
from __future__ import annotations

import itertools
import logging
import operator
from dataclasses import dataclass, field

import torch
from torch import nn

from tqdm.auto import tqdm

from compiler.config import CompilationConfig
from compiler.dispatcher import Dispatch
from runtime.attention.kv_tensors import allocate_kv_caches, kv_bytes_per_block
from runtime.attention.metadata import AttentionMetadata
from runtime.contracts.config import DBOThresholds
from runtime.contracts.sampling_params import SamplingParams
from runtime.contracts.scheduler_output import ScheduledRequest, SchedulerOutput
from runtime.forward_context import BatchDescriptor, set_forward_context
from runtime.platforms import current_platform
from runtime.ubatching import NUM_UBATCHES, UBatchThreads, YieldPoint, run_in_turn
from runtime.worker.block_table import PersistentBlockTable
from runtime.worker.graph_driver import GraphDriver
from runtime.worker.sampler import Sampler, SamplingBatch
from runtime.worker.step_output import PendingStep
from runtime.worker.ubatch_split import UBatchSlice, cuts_a_request, plan_ubatches, slice_lens

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass
class HostStep:
    """A step's inputs on the host, flat over tokens (ids, positions, slots) or per request row."""
    ids: list[int]
    positions: list[int]
    slots: list[int]
    table_rows: list[int]  # each request's row in the persistent block table
    query_lens: list[int]
    seq_lens: list[int]
    # (flat token index, row of the previous step's sampled tokens): input tokens sampled by the step
    # still in flight (async scheduling), filled in on the device; ``ids`` holds 0 there.
    in_flight: list[tuple[int, int]] = field(default_factory=list)

    def part(self, ub: UBatchSlice) -> "HostStep":
        """The share of one DBO micro-batch (a cut request's KV ends where its part ends)."""
        t = slice(ub.tokens.start, ub.tokens.stop)
        query_lens, seq_lens = slice_lens(self.query_lens, self.seq_lens, ub)
        in_flight = [(i - ub.tokens.start, row) for i, row in self.in_flight if i in ub.tokens]
        return HostStep(self.ids[t], self.positions[t], self.slots[t], self.table_rows[ub.rows.start:ub.rows.stop],
                        query_lens, seq_lens, in_flight)


class InputBuffers:
    """Device tensors sized for the largest step, refilled in place every step (stable addresses)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        # Per-token and per-sequence inputs are rows of one tensor each: a step's inputs land in two
        # copies from its flat host->device copy, not five (each a launch, and a gap on the device).
        self.token_rows = torch.zeros(3, max_tokens, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.token_rows.unbind(0)
        self.slot_mapping.fill_(-1)
        self.seq_rows = torch.zeros(2, max_seqs + 1, dtype=torch.int32, device=device)
        self.seq_lens, self.query_start_loc = self.seq_rows[0, :max_seqs], self.seq_rows[1]
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)


class ModelRunner:
    def __init__(self, model: nn.Module, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 block_size: int, dtype: torch.dtype, device: torch.device, vocab_size: int,
                 compilation_config: CompilationConfig | None = None, dbo: DBOThresholds | None = None,
                 collectives: bool = False) -> None:
        """``collectives``: the forward communicates (tensor/expert parallelism), so DBO runs its
        micro-batches on two threads that take turns around each collective; without any, they run
        one after the other on this thread (their streams still overlap on the device)."""
        self.model, self.dtype, self.device = model, dtype, device
        self.block_size, self.max_model_len = block_size, max_model_len
        self.max_num_seqs, self.max_num_tokens = max_num_seqs, max_num_batched_tokens
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.vocab_size = vocab_size
        self.buffers = InputBuffers(max_num_batched_tokens, max_num_seqs, self.max_blocks_per_seq, device)
        # Rows for the running requests plus those that ended since the last release reached this worker.
        self.block_table = PersistentBlockTable(2 * max_num_seqs, self.max_blocks_per_seq, device)
        self.sampler = Sampler()
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.multimodal = None  # runtime.worker.multimodal.MultimodalRunner, set by attach_multimodal for vision models
        # DBO: each micro-batch slot has its own persistent buffers (graph inputs keep their addresses
        # whatever the split), its own stream (None where the platform has none) and its own graphs.
        self.dbo_thresholds = dbo  # what the DBO slots below were built for
        self.dbo = dbo  # splitting now (set_dbo); None runs every step whole
        self.ubatch_buffers = ([InputBuffers(max_num_batched_tokens, max_num_seqs, self.max_blocks_per_seq, device)
                                for _ in range(NUM_UBATCHES)] if dbo is not None else [])
        self.ubatch_streams = [current_platform.new_stream() for _ in self.ubatch_buffers]
        self.graphs = GraphDriver(model, compilation_config or CompilationConfig(), max_num_batched_tokens,
                                  max_num_seqs, self.ubatch_streams)
        self.ubatch_threads = (UBatchThreads(NUM_UBATCHES, self.ubatch_streams, torch.inference_mode)
                               if dbo is not None and collectives else None)
        self.dbo_steps = 0  # steps run as two micro-batches
        self.last_dbo_trace: list[YieldPoint] = []  # yield points of the last split step, in order
        # The last step's sampled tokens, on the device, and each sampling request's row in them: the
        # next step's input where async scheduling launched it before they reached the host.
        self.last_sampled: torch.Tensor | None = None
        self.last_sampled_rows: dict[str, int] = {}
        self.last_sampling_batch: tuple[list, SamplingBatch] | None = None  # (requests, their batch)

    def set_dbo(self, enabled: bool) -> None:
        """Split steps (DBO) or not, on the slots built at start-up: benchmarks compare both on one
        engine instead of paying start-up (compile, capture, workers) twice."""
        if enabled and self.dbo_thresholds is None:
            raise ValueError("this engine was started without DBO (enable_dbo=False)")
        self.dbo = self.dbo_thresholds if enabled else None

    # ---- KV cache sizing -------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.model, self.block_size, self.dtype)

    @torch.inference_mode()
    def dummy_run(self, num_tokens: int, sample: bool = False) -> None:
        """A forward over ``num_tokens`` tokens that writes no KV (slots -1, a one-block dummy cache);
        ``sample``: logits and sampling for as many sequences as a step may hold (the memory profile)."""
        seq_len = min(self.max_model_len, num_tokens)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        lens = lens[: self.max_num_seqs]
        dummy_kv = allocate_kv_caches(self.model, 1, self.block_size, self.dtype, self.device)
        md = AttentionMetadata.build(lens, lens, [[0] * self.max_blocks_per_seq for _ in lens], self.block_size,
                                     self.device)
        md.slot_mapping.fill_(-1)
        n = sum(lens)
        if self.multimodal is not None:  # vision models: the encoder at its largest budget, merged into this step
            self.multimodal.prepare_profile(n)
        with set_forward_context(md, dummy_kv):
            hidden = self.model(self.buffers.input_ids[:n], self.buffers.positions[:n])
            if not sample:
                self.model.compute_logits(hidden[: len(lens)])
                return
            # As many rows as a step may sample, the costliest way (top-k and top-p sort the vocabulary).
            rows = min(n, self.max_num_seqs)
            params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
            batch = SamplingBatch.build([params] * rows, [[0]] * rows, [[0]] * rows, self.vocab_size, self.device)
            self.sampler(self.model.compute_logits(hidden[:rows]), batch)

    def warmup(self) -> None:
        """Run the model once so compilation (a single trace) happens at start-up."""
        self.dummy_run(min(self.max_num_tokens, 16))

    @torch.inference_mode()
    def capture_graphs(self, modes: tuple[str, ...]) -> None:
        """Warm up and capture the graphs of ``modes`` ("full", "piecewise"), largest first. Piecewise graphs
        hold no KV cache address (attention runs between them), so they may be captured before the cache
        exists, on a one-block stand-in; full graphs bake the cache's addresses in."""
        plan = [(mode, size, ubatch) for mode, size, ubatch in self.graphs.capture_sizes() if mode in modes]
        if not plan:
            return
        kv_caches = self.kv_caches or allocate_kv_caches(self.model, 1, self.block_size, self.dtype, self.device)
        # disable=None: a bar on a terminal only; logs get the summary line of report_capture instead.
        for mode, size, ubatch in tqdm(plan, desc=f"Capturing {'/'.join(modes)} graphs", unit="graph", leave=False,
                                       disable=None):
            if not self.graphs.dispatcher.sizes(mode, ubatch):
                continue  # a capture of this mode failed: its graphs are off (and their plan with them)
            for _ in range(2):  # the first call at a size warms up, the second captures
                self._dummy_step(mode, size, ubatch, kv_caches)
            self.graphs.drop_failed_kinds()
        current_platform.synchronize()

    @torch.inference_mode()
    def finish_capture(self) -> None:
        """The vision encoder's graphs, then the report of everything captured."""
        if self.multimodal is not None:
            self.multimodal.encoder.capture()
        current_platform.synchronize()
        self.graphs.report_capture()

    def _dummy_step(self, mode: str, size: int, ubatch: int | None, kv_caches: dict[str, torch.Tensor]) -> None:
        """``size`` one-token sequences writing nowhere (slot -1), through the persistent buffers
        (micro-batch slot ``ubatch``'s under DBO: its graphs are captured from the calling thread)."""
        buf = self.buffers if ubatch is None else self.ubatch_buffers[ubatch]
        seqs = min(size, self.max_num_seqs)
        buf.slot_mapping[:size].fill_(-1)
        buf.seq_lens[:seqs].fill_(1)
        buf.block_tables[:seqs].zero_()
        buf.query_start_loc[: seqs + 1].copy_(torch.arange(seqs + 1, dtype=torch.int32))
        if seqs < size:  # more tokens than sequence rows: the last sequence takes the rest
            buf.query_start_loc[seqs] = size
            buf.seq_lens[seqs - 1] = size - seqs + 1
        md = AttentionMetadata(
            slot_mapping=buf.slot_mapping[:size], block_tables=buf.block_tables[:seqs], seq_lens=buf.seq_lens[:seqs],
            query_start_loc=buf.query_start_loc[: seqs + 1], num_actual_tokens=size,
            max_query_len=size - seqs + 1, max_seq_len=size - seqs + 1, block_size=self.block_size,
            query_lens_cpu=[1] * (seqs - 1) + [size - seqs + 1], seq_lens_cpu=[1] * (seqs - 1) + [size - seqs + 1])
        dispatch = Dispatch(mode, size, BatchDescriptor(size, mode == "full", ubatch))
        with self.graphs.forward_context(md, kv_caches, dispatch):
            self.graphs.run(dispatch, buf.input_ids[:size], buf.positions[:size])

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_caches(self.model, num_blocks, self.block_size, self.dtype, self.device)

    # ---- one step --------------------------------------------------------------------------
    def _host_step(self, scheduled: list[ScheduledRequest]) -> HostStep:
        """The step's flat inputs. This loop runs for every request every step: a decode (one token)
        takes the short branch, and a token still in flight is left to the device (``in_flight``)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, seq_lens = [], []
        bs, last_rows = self.block_size, self.last_sampled_rows
        in_flight: list[tuple[int, int]] = []
        for item in scheduled:
            req, start, num_new = item.request, item.start_pos, item.num_new_tokens
            prompt_len, outputs = len(req.prompt_token_ids), req.output_token_ids
            if num_new == 1 and start >= prompt_len:  # a decode
                if start - prompt_len < len(outputs):
                    ids.append(outputs[start - prompt_len])
                else:  # sampled by the step in flight
                    in_flight.append((len(ids), last_rows.get(req.request_id, -1)))
                    ids.append(0)
                positions.append(start)
                slots.append(req.block_ids[start // bs] * bs + start % bs)
            else:
                self._add_range(ids, positions, slots, in_flight, req, start, start + num_new)
            query_lens.append(num_new)
            seq_lens.append(start + num_new)
        if in_flight and min(row for _, row in in_flight) < 0:
            _raise_not_in_flight(scheduled, last_rows)
        return HostStep(ids, positions, slots, self.block_table.rows(scheduled), query_lens, seq_lens, in_flight)

    def _add_range(self, ids: list[int], positions: list[int], slots: list[int], in_flight: list[tuple[int, int]],
                   req, start: int, end: int) -> None:
        """Tokens [start, end) of a prefill (chunk) or recompute; the last may still be in flight."""
        bs, prompt_len, outputs = self.block_size, len(req.prompt_token_ids), req.output_token_ids
        known_end = min(end, prompt_len + len(outputs))
        if start >= prompt_len:
            ids.extend(outputs[start - prompt_len:known_end - prompt_len])
        else:
            ids.extend(req.all_token_ids[start:known_end])
        if end - known_end > 1:
            raise RuntimeError(f"request {req.request_id!r}: {end - known_end} input tokens not on the host "
                               "(one step in flight at most)")
        if known_end < end:
            in_flight.append((len(ids), self.last_sampled_rows.get(req.request_id, -1)))
            ids.append(0)
        positions.extend(range(start, end))
        slots.extend(req.block_ids[p // bs] * bs + p % bs for p in range(start, end))

    def _sampling_batch(self, requests: list, vocab_size: int, generators: dict[str, torch.Generator]) -> SamplingBatch:
        """The step's sampling parameters on the device. A decode step usually samples for the same requests
        as the last one: their batch is reused then (a dozen host->device copies saved), unless penalties
        make it carry the token history, which grows every step."""
        last = self.last_sampling_batch
        if (last is not None and not last[1].any_penalties and len(last[0]) == len(requests)
                and all(map(operator.is_, last[0], requests))):
            return last[1]
        batch = SamplingBatch.build(
            [r.sampling_params for r in requests], [r.prompt_token_ids for r in requests],
            [r.output_token_ids for r in requests], vocab_size, self.device,
            [generators.get(r.request_id) for r in requests])
        self.last_sampling_batch = (requests, batch)
        return batch

    def _fill(self, host: HostStep, buf: InputBuffers, ubatch: int | None = None) -> tuple[AttentionMetadata, Dispatch]:
        """Copy a step's (or micro-batch's) inputs into ``buf``; its metadata and graph dispatch."""
        query_lens, seq_lens, bs = host.query_lens, host.seq_lens, self.block_size
        n, s = len(host.ids), len(query_lens)
        dispatch = self.graphs.plan(n, max(query_lens) == 1, ubatch)
        padded = dispatch.padded_tokens
        # A full graph's kernels read one sequence row per token: padded rows get length 0 (no blocks).
        seq_rows = padded if dispatch.mode == "full" and padded > s else s
        pad, pad_seqs = padded - n, seq_rows - s
        starts = [0] * (s + 1)
        for i, q in enumerate(query_lens):
            starts[i + 1] = starts[i] + q
        # One host->device copy for the flat inputs, padding included (padded rows write nowhere: slot
        # -1), spread into the persistent buffers by two copies and a gather of block-table rows.
        in_flight_index, in_flight_rows = [index for index, _ in host.in_flight], [row for _, row in host.in_flight]
        flat = current_platform.to_device(
            host.ids + [0] * pad + host.positions + [0] * pad + host.slots + [-1] * pad
            + seq_lens + [0] * (pad_seqs + 1) + starts + [n] * pad_seqs
            + host.table_rows + [self.block_table.zero_row] * pad_seqs + in_flight_index + in_flight_rows,
            torch.int64, self.device)
        buf.token_rows[:, :padded].copy_(flat[:3 * padded].view(3, padded))
        at = 3 * padded
        buf.seq_rows[:, :seq_rows + 1].copy_(flat[at:at + 2 * (seq_rows + 1)].view(2, seq_rows + 1))
        at += 2 * (seq_rows + 1)
        torch.index_select(self.block_table.table, 0, flat[at:at + seq_rows], out=buf.block_tables[:seq_rows])
        f = len(in_flight_index)
        if f and in_flight_index[-1] == f - 1 and in_flight_index == in_flight_rows:
            # A steady decode batch: token i is request i's, sampled into row i by the step in flight.
            buf.input_ids[:f].copy_(self.last_sampled[:f])
        elif f:  # tokens the step in flight samples, from its device output into their input rows
            index, rows = flat[at + seq_rows:at + seq_rows + f], flat[at + seq_rows + f:]
            buf.input_ids.index_copy_(0, index, self.last_sampled.index_select(0, rows))
        md = AttentionMetadata(
            slot_mapping=buf.slot_mapping[:padded], block_tables=buf.block_tables[:seq_rows],
            seq_lens=buf.seq_lens[:seq_rows], query_start_loc=buf.query_start_loc[: seq_rows + 1],
            num_actual_tokens=n, max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=bs,
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return md, dispatch

    def _forward_whole(self, host: HostStep) -> torch.Tensor:
        """One forward over the step: hidden states in token order."""
        md, dispatch = self._fill(host, self.buffers)
        padded = dispatch.padded_tokens
        with self.graphs.forward_context(md, self.kv_caches, dispatch):
            return self.graphs.run(dispatch, self.buffers.input_ids[:padded], self.buffers.positions[:padded])

    def _forward_dbo(self, host: HostStep, split: list[UBatchSlice]) -> torch.Tensor:
        """Two micro-batches, each on its own stream (and, with collectives, its own thread, the two
        taking turns at every collective); hidden rows joined back in the step's token order
        (micro-batch 0 holds the first half of the flat tokens)."""
        steps = []
        for i, part in enumerate(split):
            sub = host.part(part)
            md, dispatch = self._fill(sub, self.ubatch_buffers[i], ubatch=i)
            steps.append((i, md, dispatch, len(sub.ids)))

        def micro_batch(i: int, md: AttentionMetadata, dispatch: Dispatch, n: int):
            buf, padded = self.ubatch_buffers[i], dispatch.padded_tokens
            with self.graphs.forward_context(md, self.kv_caches, dispatch):
                return self.graphs.run(dispatch, buf.input_ids[:padded], buf.positions[:padded])[:n]

        trace: list[YieldPoint] = []
        fns = [lambda step=step: micro_batch(*step) for step in steps]
        ordered = cuts_a_request(split)
        if self.ubatch_threads is not None:
            parts = self.ubatch_threads.run(fns, trace, ordered=ordered)
        else:
            parts = run_in_turn(fns, self.ubatch_streams, ordered=ordered)
        self.dbo_steps += 1
        self.last_dbo_trace = trace
        return torch.cat(parts)

    def forward_step(self, host: HostStep) -> torch.Tensor:
        """The model forward of a step, split into DBO micro-batches when it reaches a threshold
        (vision models are not split: their M-RoPE positions live in one step-wide buffer)."""
        split = plan_ubatches(host.query_lens, self.dbo) if self.dbo is not None and self.multimodal is None else None
        return self._forward_dbo(host, split) if split else self._forward_whole(host)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, generators: dict[str, torch.Generator]) -> PendingStep:
        """Launch a step; its sampled tokens stay on the device (the next step may read them there) while
        their copy to the host is queued behind it."""
        self.block_table.release(output.finished_ids + output.preempted_ids)
        host = self._host_step(output.scheduled)
        if self.multimodal is not None:  # vision models: M-RoPE positions, encoder runs, image rows (in place)
            self.multimodal.prepare(output.scheduled, len(host.ids))
        hidden = self.forward_step(host)
        sampling = [item for item in output.scheduled if item.samples]
        if not sampling:
            return PendingStep.empty()
        if len(host.ids) == len(sampling):  # every request decodes one token: its row is its last
            # Over the rows the graph ran, padding included: the lm_head GEMM then has one M per graph
            # size (hence one kernel, one rounding), however many of its rows are live this step.
            logits = self.model.compute_logits(hidden)[:len(sampling)]
        else:  # the last token row of each sampling request (prefill chunks may sample nothing yet)
            ends = itertools.accumulate(host.query_lens)
            rows = [end - 1 for end, item in zip(ends, output.scheduled) if item.samples]
            last_hidden = hidden[current_platform.to_device(rows, torch.int64, self.device)]
            logits = self.model.compute_logits(last_hidden)
        requests = [item.request for item in sampling]
        _suppress_stop_tokens_before_min(logits, sampling)
        result = self.sampler(logits, self._sampling_batch(requests, logits.shape[-1], generators))
        self.last_sampled = result.sampled_token_ids
        self.last_sampled_rows = {r.request_id: i for i, r in enumerate(requests)}
        return PendingStep.start(requests, result)


def _raise_not_in_flight(scheduled: list[ScheduledRequest], sampled_last: dict[str, int]) -> None:
    missing = [item.request.request_id for item in scheduled
               if item.start_pos + item.num_new_tokens > item.request.num_tokens
               and item.request.request_id not in sampled_last]
    raise RuntimeError(f"requests {missing}: an input token is not on the host, and the last step did not sample "
                       "it (one step in flight at most)")


def _suppress_stop_tokens_before_min(logits: torch.Tensor, sampling: list[ScheduledRequest]) -> None:
    """A request below its min_tokens must not sample EOS or a stop token id (one masked write for the
    whole step, its indices copied without making the host wait)."""
    rows: list[int] = []
    tokens: list[int] = []
    for row, item in enumerate(sampling):
        req = item.request
        min_tokens = req.sampling_params.min_tokens
        if not min_tokens:
            continue  # most requests
        # Output tokens before this step's: its last input position is the last of them (also while the
        # one before is still in flight, and during a recompute after preemption).
        if item.start_pos + item.num_new_tokens - len(req.prompt_token_ids) < min_tokens:
            banned = sorted(req.stop_token_set)
            rows.extend([row] * len(banned))
            tokens.extend(banned)
    if rows:
        index = current_platform.to_device([rows, tokens], torch.int64, logits.device)
        logits[index[0], index[1]] = float("-inf")
