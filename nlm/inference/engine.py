"""Dynamic batching generation engine.

Requests are queued from the event loop; one worker thread takes whatever arrives within a short window
(up to `max_batch_size`), groups requests that can share one `generate` call (same sampling settings),
left-pads them and runs one forward pass per step for the whole group. Results go back to the event loop
through futures, so generation never blocks it. Seeded or streaming requests run alone: a seed fixes one
request's random stream, and a streamer follows one sequence.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingKey:
    """Requests with equal keys can share one generate call."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    num_return_sequences: int


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingKey
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: Callable[[str], None] | None = None  # called (from the worker) with each new piece of text
    cancelled: bool = False
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None

    @property
    def solo(self) -> bool:
        return self.seed is not None or self.stream is not None


@dataclass
class GenerationOutput:
    texts: list[str]
    completion_tokens: int
    finish_reasons: list[str]


class _Cancelled(StoppingCriteria):
    def __init__(self, jobs: list[GenerationJob]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        stop = all(job.cancelled for job in self.jobs)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _StopStrings(StoppingCriteria):
    """Finishes a row as soon as its new text contains one of its job's stop strings (no wasted steps)."""

    def __init__(self, tokenizer: Any, jobs: list[GenerationJob], prompt_width: int, per_job: int) -> None:
        self.tokenizer, self.jobs, self.prompt_width, self.per_job = tokenizer, jobs, prompt_width, per_job

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = []
        for row, ids in enumerate(input_ids[:, self.prompt_width:].tolist()):
            stops = self.jobs[row // self.per_job].stop
            done.append(bool(stops) and cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stops)[1])
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _StopStringsStreamer(TextStreamer):
    """Sends decoded text pieces to a callback, holding back text that may be the start of a stop string."""

    def __init__(self, tokenizer: Any, job: GenerationJob) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.job = job
        self.sent = ""
        self.text = ""
        self.stopped = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.stopped:
            return
        self.text += text
        visible, hit = cut_at_stop(self.text, self.job.stop)
        if hit:
            self.stopped = True
        elif not stream_end:
            # Hold back a tail that could still grow into a stop string.
            hold = max((len(s) - 1 for s in self.job.stop), default=0)
            visible = visible[: max(len(self.sent), len(visible) - hold)]
        if len(visible) > len(self.sent):
            assert self.job.stream is not None
            self.job.stream(visible[len(self.sent):])
            self.sent = visible


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    positions = [text.find(stop) for stop in stops if stop and text.find(stop) >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


class GenerationEngine:
    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 8, batch_window_ms: float = 10.0,
                 observe_batch: Callable[[int], None] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window_ms / 1000
        self.observe_batch = observe_batch or (lambda size: None)
        self.device = next(model.parameters()).device
        self._queue: queue.Queue[GenerationJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one generate at a time, also for warm-up
        self._last_batch = 1

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="nlm-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)

    def warm_up(self) -> None:
        """One short generation, so the first request does not pay for lazy initialisation."""
        ids = self.tokenizer("hello", add_special_tokens=True)["input_ids"] or [self.tokenizer.eos_token_id or 0]
        job = GenerationJob(ids, 1, SamplingKey(False, 1.0, 1.0, 0, 1.0, 1))
        self._run_group([job])

    async def generate(self, job: GenerationJob) -> GenerationOutput:
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        self._queue.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    # --- worker thread ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            # Wait for company only when there is evidence of concurrent traffic: a lone client would
            # otherwise pay the window on every request for nothing.
            window = self.batch_window if (self._last_batch > 1 or not self._queue.empty()) else 0.0
            deadline = time.perf_counter() + window
            while len(batch) < self.max_batch_size and not job.solo:
                remaining = deadline - time.perf_counter()
                try:
                    extra = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if extra is None:
                    self._queue.put(None)
                    break
                batch.append(extra)
            self._last_batch = len(batch)
            for group in self._groups(batch):
                self._run_safely(group)

    @staticmethod
    def _groups(batch: list[GenerationJob]) -> list[list[GenerationJob]]:
        shared: dict[SamplingKey, list[GenerationJob]] = {}
        groups: list[list[GenerationJob]] = []
        for job in batch:
            if job.cancelled:
                continue
            if job.solo:
                groups.append([job])
            else:
                shared.setdefault(job.sampling, []).append(job)
        return groups + list(shared.values())

    def _run_safely(self, group: list[GenerationJob]) -> None:
        try:
            outputs = self._run_group(group)
        except Exception as exc:  # noqa: BLE001 - delivered to each waiting request as its own failure
            logger.exception("generation failed for a batch of %d", len(group))
            for job in group:
                self._deliver(job, exc)
            return
        for job, output in zip(group, outputs, strict=True):
            self._deliver(job, output)

    @staticmethod
    def _deliver(job: GenerationJob, result: Any) -> None:
        if job.loop is None or job.future is None:
            return

        def settle() -> None:
            if job.future is not None and not job.future.done():
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

        job.loop.call_soon_threadsafe(settle)

    @torch.inference_mode()
    def _run_group(self, group: list[GenerationJob]) -> list[GenerationOutput]:
        self.observe_batch(len(group))
        tokenizer, pad = self.tokenizer, self.tokenizer.pad_token_id
        pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
        width = max(len(job.prompt_ids) for job in group)
        # Left padding: every row's last position is its last real token, as decoder-only generation needs.
        input_ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in group], device=self.device)
        attention = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in group], device=self.device)
        sampling = group[0].sampling
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(job.max_new_tokens for job in group),
            "do_sample": sampling.do_sample,
            "num_return_sequences": sampling.num_return_sequences,
            "repetition_penalty": sampling.repetition_penalty,
            "pad_token_id": pad,
            "eos_token_id": tokenizer.eos_token_id,
            "stopping_criteria": StoppingCriteriaList(
                [_Cancelled(group)]
                + ([_StopStrings(tokenizer, group, width, sampling.num_return_sequences)] if any(j.stop for j in group) else [])
            ),
        }
        if sampling.do_sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        streamer = None
        if len(group) == 1 and group[0].stream is not None:
            streamer = _StopStringsStreamer(tokenizer, group[0])
            kwargs["streamer"] = streamer
        with self._lock:
            if group[0].seed is not None:
                torch.manual_seed(group[0].seed)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new_tokens = output[:, width:]
        results = []
        n = sampling.num_return_sequences
        for index, job in enumerate(group):
            texts, reasons, count = [], [], 0
            for row in new_tokens[index * n:(index + 1) * n].tolist():
                row = row[: job.max_new_tokens]
                finished = tokenizer.eos_token_id in row
                if finished:
                    row = row[: row.index(tokenizer.eos_token_id)]
                text, hit = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), job.stop)
                if hit:
                    row = tokenizer(text, add_special_tokens=False)["input_ids"]
                count += len(row)
                texts.append(text)
                reasons.append("stop" if finished or hit else "length")
            results.append(GenerationOutput(texts, count, reasons))
        return results
