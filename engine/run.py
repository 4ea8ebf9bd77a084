"""Run a workload to completion: the single code path behind the CLI, the dashboard and the
benchmarks. Requests arrive on the wall clock (seconds from run start); when nothing is running
and the next request has not arrived yet, the loop waits for it."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from engine.config import RunConfig
from engine.device import resolve_device, torch_dtype
from engine.kv_cache.spec import kv_bytes_per_token
from engine.llm_engine import LLMEngine
from engine.models.config import PRETRAINED
from engine.models.hf_config import looks_like_path
from engine.models.loader import LoadedModel, load_model
from engine.run_result import RunResult, RunSummary
from engine.sequence import Sequence, SequenceStatus
from engine.telemetry import TelemetrySampler, device_description
from engine.trace import RequestRecord, StepRecord, TelemetrySample, TraceSink
from engine.workload import WorkloadRequest, build_workload

IDLE_POLL_S = 0.02  # how often an idle run checks should_stop while it waits for an arrival


ModelKey = tuple[str, str, str, int]  # (model, device type, dtype, weights seed)


def model_key(config: RunConfig) -> ModelKey:
    """What tells two loaded models apart: the seed only picks the weights of random models,
    so every config of a real model (SmolLM2, a model folder) shares one load (the dashboard
    caches by this key)."""
    device = resolve_device(config.device)
    real = config.model in PRETRAINED or looks_like_path(config.model)
    seed = 0 if real else config.seed
    return config.model, device.type, config.resolved_dtype(device.type), seed


def load_model_by_key(key: ModelKey) -> LoadedModel:
    name, device, dtype, seed = key
    return load_model(name, resolve_device(device), torch_dtype(dtype), seed=seed)


def load_model_for(config: RunConfig) -> LoadedModel:
    return load_model_by_key(model_key(config))


def run(
    config: RunConfig,
    sink: TraceSink,
    *,
    model: LoadedModel | None = None,
    requests: list[WorkloadRequest] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """Serve `requests` (default: the config's workload) and trace every step into `sink`.

    `model` reuses an already loaded model (the dashboard caches one); `should_stop` is polled
    every step and ends the run cleanly: unfinished requests are recorded as aborted.
    """
    loaded = model if model is not None else load_model_for(config)
    if requests is None:
        requests = build_workload(config.workload, config.seed, tokenizer=loaded.tokenizer)
    engine = LLMEngine(config, loaded)
    sequences = [_to_sequence(r, loaded) for r in requests]
    record_telemetry = getattr(sink, "record_telemetry", None)
    arrivals = deque(sorted(zip((r.arrival for r in requests), sequences, strict=True),
                            key=lambda pair: pair[0]))
    records: list[RequestRecord] = []
    sink.record_keyframe(engine.kv_cache_manager.snapshot(0))
    totals = _StepTotals()
    start = time.monotonic()
    sampler = None
    if config.telemetry_hz > 0:
        sampler = TelemetrySampler(engine.device, config.telemetry_hz,
                                   engine.memory.nvml_handle).start(start)
        engine.telemetry = sampler
    try:
        stopped = _serve(engine, config, sink, arrivals, records, totals, start, on_step,
                         should_stop, sampler, record_telemetry)
    finally:
        if sampler is not None:
            sampler.stop()
            engine.telemetry = None
            if record_telemetry is not None:
                sampler.drain(record_telemetry)
    elapsed = time.monotonic() - start
    for seq in sequences:
        if seq.status is not SequenceStatus.FINISHED and seq.finish_reason is None:
            record = engine.request_record(seq)  # finish_reason "aborted"
            records.append(record)
            sink.record_request(record)
    summary = _summarise(config, engine, records, elapsed, totals, stopped)
    tokenizer = loaded.tokenizer
    return RunResult(
        summary=summary,
        output_token_ids={s.request_id: s.output_token_ids for s in sequences},
        output_text={s.request_id: tokenizer.decode(s.output_token_ids) for s in sequences}
        if tokenizer is not None else {},
    )


def _serve(engine: LLMEngine, config: RunConfig, sink: TraceSink, arrivals: deque,
           records: list[RequestRecord], totals: _StepTotals, start: float,
           on_step: Callable[[StepRecord], None] | None,
           should_stop: Callable[[], bool] | None, sampler: TelemetrySampler | None,
           record_telemetry: Callable[[TelemetrySample], None] | None) -> bool:
    """The step loop; returns whether `should_stop` ended it."""
    while arrivals or engine.has_work:
        if should_stop is not None and should_stop():
            return True
        now = time.monotonic() - start
        while arrivals and arrivals[0][0] <= now:
            rejected = engine.add_request(arrivals.popleft()[1], now)
            if rejected is not None:
                records.append(rejected)
                sink.record_request(rejected)
        if not engine.has_work:
            if arrivals:
                time.sleep(min(arrivals[0][0] - now, IDLE_POLL_S))
            continue
        out = engine.step(start)
        sink.record_step(out.record, out.block_events, out.request_events)
        if sampler is not None and record_telemetry is not None:
            sampler.drain(record_telemetry)
        for record in out.finished:
            records.append(record)
            sink.record_request(record)
        if out.record.step % config.keyframe_interval == 0:
            sink.record_keyframe(engine.kv_cache_manager.snapshot(out.record.step))
        totals.add(out.record)
        if on_step is not None:
            on_step(out.record)
    return False


def _to_sequence(request: WorkloadRequest, loaded: LoadedModel) -> Sequence:
    ids = request.token_ids(loaded.tokenizer)
    return Sequence(request_id=request.request_id, token_ids=list(ids),
                    num_prompt_tokens=len(ids), max_tokens=request.max_tokens,
                    label=request.label)


class _StepTotals:
    """Run-wide sums of the per-step counters."""

    def __init__(self) -> None:
        self.prefix_query_tokens = self.prefix_hit_tokens = 0
        self.evictions = self.peak_blocks_used = 0

    def add(self, record: StepRecord) -> None:
        self.prefix_query_tokens += record.prefix_query_tokens
        self.prefix_hit_tokens += record.prefix_hit_tokens
        self.evictions += record.num_evicted
        self.peak_blocks_used = max(self.peak_blocks_used, record.blocks_used)


def _summarise(config: RunConfig, engine: LLMEngine, records: list[RequestRecord],
               elapsed: float, totals: _StepTotals, stopped: bool) -> RunSummary:
    query = totals.prefix_query_tokens
    output_tokens = sum(r.output_tokens for r in records)
    return RunSummary(
        num_requests=len(records),
        num_finished=sum(r.finish_reason in ("stop", "length") for r in records),
        num_rejected=sum(r.finish_reason.startswith("rejected") for r in records),
        prompt_tokens=sum(r.prompt_tokens for r in records),
        output_tokens=output_tokens,
        steps=engine.step_count,
        elapsed_s=elapsed,
        output_tokens_per_s=output_tokens / elapsed if elapsed > 0 else 0.0,
        prefix_hit_rate=totals.prefix_hit_tokens / query if query else 0.0,
        num_preemptions=sum(r.num_preemptions for r in records),
        num_evictions=totals.evictions,
        peak_blocks_used=totals.peak_blocks_used,
        num_blocks=engine.num_blocks,
        kv_bytes_per_token=_whole(kv_bytes_per_token(engine.kv_groups)),
        kv_page_size_bytes=engine.kv_cache.page_size_bytes,
        kv_allocated_bytes_per_token=_whole(engine.kv_cache.allocated_bytes_per_token),
        kv_groups=[g.to_dict() for g in engine.kv_groups],
        device=str(engine.device),
        dtype=str(engine.loaded.dtype).removeprefix("torch."),
        kv_dtype=engine.kv_dtype_name,
        stopped=stopped,
        gpu_note=engine.memory.gpu_note,
        memory_profile=engine.memory_profile.to_dict(),
        device_info=device_description(engine.device),
        bandwidth_bytes_per_s=engine.bandwidth,
    )


def _whole(x: float) -> int | float:
    """46080.0 -> 46080: byte counts read as integers unless a format really has fractions."""
    return int(x) if float(x).is_integer() else x
