"""Continuous (in-flight) batching generation engine.

One worker thread owns the model and a running batch of sequences that share one KV cache (a transformers
`DynamicCache`, rows left-padded to a common width). At every step it first admits queued requests — their
prompts run through one prefill forward pass and their cache rows join the running batch — then runs one decode
forward pass for every running sequence. A sequence leaves the batch the moment it ends (an end-of-sequence id,
its token budget, one of its stop strings, or its client going away), so nobody waits for the longest request of
a group. Results and streamed text go back to the event loop through futures and `call_soon_threadsafe`.

Scoring a prompt without continuing it (`/v1/completions` with `max_tokens: 0`: a served teacher's requests)
skips all of that: a `ScoringJob` of many prompts is one forward pass over them (right-padded, no cache, no
sampling), run between two decode steps, and answered with tensors (`PromptScores`), not per-token objects.
The head, log-softmax and top-k of that pass run a chunk of positions at a time (`chunk_rows`, as training
and evaluation chunk them), so no [rows, width, vocab] tensor exists whole.

Why not transformers' own `ContinuousBatchingManager`: measured on this CPU it was slower than this loop (see
docs/ARCHITECTURE.md), and it has one sampling configuration per manager, no per-request seed and no stop
strings. Token choice uses transformers' logits processors and `StopStringCriteria`; only the batch bookkeeping
(which row joins and leaves the shared cache when) is written here.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TextStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nlm.distill.engines.chunks import chunk_rows
from nlm.models.generation import eos_token_ids
from nlm.models.heads import capture_hidden, head_reproduces_logits, output_head, sliced_head
from nlm.models.speculative import DraftCounts, configure_draft, count_verify_steps

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


class WorkerStopped(RuntimeError):
    """The generation worker is gone (it died, or the server is shutting down): the request cannot be served."""


class ScoringTooLarge(RuntimeError):
    """A scoring job ran out of memory: the same request would fail again, so it is the client's to make smaller."""


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError ("can't allocate memory")."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc)))


@dataclass(frozen=True)
class SamplingKey:
    """How one request chooses its tokens."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    num_return_sequences: int


@dataclass(frozen=True)
class LogprobSpec:
    """The log-probabilities a job asks for: the top `generated` of each generated token (None: none), the top
    `prompt` of each prompt token after the first (None: none; 0: only the prompt token's own), taken from
    log_softmax(logits / temperature) over the real vocabulary (the head's padding rows excluded). The
    temperature is 1 — the model's own distribution — whatever the sampling settings, unless the request
    uses nlm's `logprobs_temperature` extension."""

    generated: int | None = None
    prompt: int | None = None
    temperature: float = 1.0


@dataclass
class PositionLogprobs:
    """One position's log-probabilities: the token there, its log-prob, and the top ones, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int = 1  # 1 + how many tokens are more likely than `token`


@dataclass
class PromptScores:
    """One prompt's log-probabilities as CPU tensors: row i is the distribution at position i + 1, predicted from
    the prompt's first i + 1 tokens (the first token has none). `ranks` is 1 + how many tokens are more likely
    than the prompt's own token there."""

    token_logprobs: torch.Tensor  # [L-1] float32: the log-prob of each prompt token after the first
    ranks: torch.Tensor  # [L-1] int64
    top_ids: torch.Tensor  # [L-1, k] int64, most likely first
    top_logprobs: torch.Tensor  # [L-1, k] float32

    def positions(self, prompt: list[int]) -> list[PositionLogprobs | None]:
        """The per-token objects the OpenAI and vLLM shapes are built from: None for the first token."""
        return [None] + [PositionLogprobs(token, value, list(zip(ids, values, strict=True)), rank)
                         for token, value, rank, ids, values in zip(
                             prompt[1:], self.token_logprobs.tolist(), self.ranks.tolist(), self.top_ids.tolist(),
                             self.top_logprobs.tolist(), strict=True)]


@dataclass
class ScoringJob:
    """Prompts to score, not to continue: one forward pass over them all, nothing generated."""

    prompts: list[list[int]]
    spec: LogprobSpec
    adapter: str | None = None
    cancelled: bool = False
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingKey
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: Callable[[str], None] | None = None  # called (from the worker) with each new piece of text
    adapter: str | None = None  # the PEFT adapter that serves this request (several LoRA students, one base)
    logprobs: LogprobSpec | None = None  # log-probabilities to return (scoring, distillation from a served teacher)
    cancelled: bool = False
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None


@dataclass
class GenerationOutput:
    texts: list[str]
    completion_tokens: int
    finish_reasons: list[str]
    token_ids: list[list[int]] = field(default_factory=list)  # the generated tokens of each sequence
    logprobs: list[list[PositionLogprobs]] | None = None  # per sequence, per generated token (when asked)
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # per prompt token; None for the first (when asked)


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


def context_length(config: Any) -> int | None:
    """The most positions a model can attend over, from its config (None when it declares none)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _Sequence:
    """One row of the running batch: one return sequence of one job."""

    def __init__(self, job: GenerationJob, state: _JobState) -> None:
        self.job, self.state = job, state
        self.tokens: list[int] = []
        self.logprobs: list[PositionLogprobs] = []  # one per generated token, when the job asks
        self.reason: str | None = None  # "stop" | "length" | "cancelled" once finished
        self.eos = False

    @property
    def position(self) -> int:
        """Position id of the last token fed so far (prompt positions start at 0)."""
        return len(self.job.prompt_ids) + len(self.tokens) - 1


class _JobState:
    """What the engine keeps per job while its sequences run: processors, generator, stop criteria, streamer."""

    def __init__(self, job: GenerationJob, tokenizer: Any, device: torch.device) -> None:
        sampling = job.sampling
        self.processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if sampling.do_sample:
            if sampling.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                self.processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(sampling.top_p))
        # A request's own random stream: a seed makes it reproducible without touching anyone else's samples.
        self.generator = torch.Generator(device=device)
        if job.seed is not None:
            self.generator.manual_seed(job.seed)
        else:
            self.generator.seed()
        self.stop_criteria = StopStringCriteria(tokenizer, job.stop) if job.stop else None
        self.streamer = _StopStringsStreamer(tokenizer, job) if job.stream is not None else None
        if self.streamer is not None:
            self.streamer.put(torch.tensor(job.prompt_ids))  # the prompt: skipped, as TextStreamer expects
        self.sequences: list[_Sequence] = []
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None


class GenerationEngine:
    # Declared capability (the app reads it, never probes): `score` answers max_tokens-0 prompts in one forward pass.
    scores_prompts = True

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 32, batch_window_ms: float = 10.0,
                 observe_batch: Callable[[int], None] | None = None, multi_adapter: bool = False,
                 draft: Any = None, num_assistant_tokens: int = 5,
                 observe_draft: Callable[[DraftCounts], None] | None = None) -> None:
        self.model = model
        # Speculative decoding (see `_draftable`): the draft proposes, the model verifies, through transformers'
        # assisted generation; `observe_draft` receives what each drafting stretch did (for /metrics).
        self.draft = draft
        if draft is not None:
            configure_draft(draft, num_assistant_tokens)
        self.observe_draft = observe_draft or (lambda counts: None)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window_ms / 1000
        self.observe_batch = observe_batch or (lambda size: None)
        self.multi_adapter = multi_adapter
        self.device = next(model.parameters()).device
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.context = context_length(model.config)
        self.vocab_width = len(tokenizer)  # log-probabilities cover the real tokens, never the head's padding rows
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers 5.x renames `past_key_values` to `cache`; take whichever this model's forward names.
        parameters = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        # Prefill needs the logits of each prompt's last position only, not [rows, width, vocab].
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        # Scoring: positions per head chunk (None: `chunk_rows` for the vocabulary and device), and whether the
        # head may run apart from the forward (decided at the first scoring job; False: the model post-processes
        # its logits, or its head is not a plain Linear, so whole logits are taken a few rows per forward).
        self.score_chunk: int | None = None
        self._head_apart: bool | None = None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.pad_id = int(pad)
        self._queue: queue.Queue[GenerationJob | ScoringJob | None] = queue.Queue()
        self._waiting: collections.deque[GenerationJob] = collections.deque()  # taken from the queue, not yet admitted
        self._scoring: collections.deque[ScoringJob] = collections.deque()  # scoring jobs taken, not yet run
        self._thread: threading.Thread | None = None
        self._closing = False
        self._last_batch = 1
        # The running batch: one row per sequence, a shared cache and its [rows, width] attention mask.
        self._rows: list[_Sequence] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._admitting: list[GenerationJob] = []  # jobs in their prefill (not yet rows of the batch)
        self._states: dict[int, _JobState] = {}  # by id(job), while the job's sequences run

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._waiting) + len(self._scoring)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False before start and after it died)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="nlm-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)

    async def refresh_metrics(self, metrics: Any) -> None:
        """Nothing to fetch before a /metrics scrape: this engine reports as it goes (`observe_draft`)."""

    def warm_up(self) -> None:
        """One short generation through the whole loop, so the first request does not pay for lazy initialisation."""
        ids = self.tokenizer("hello", add_special_tokens=True)["input_ids"] or [self.pad_id]
        self._waiting.append(GenerationJob(ids, 2, SamplingKey(False, 1.0, 1.0, 0, 1.0, 1)))
        with torch.inference_mode():
            while self._waiting or self._rows:
                self._step()

    async def generate(self, job: GenerationJob) -> GenerationOutput:
        if self._thread is not None and not self._thread.is_alive():
            raise WorkerStopped("the generation worker has stopped")
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        self._queue.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    async def score(self, job: ScoringJob) -> list[PromptScores]:
        """Each prompt's log-probabilities (`job.spec`), from one forward pass between decode steps."""
        return await self.generate(job)  # type: ignore[arg-type]  # the same queue and future; `_accept` sorts

    # --- worker thread ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def _work(self) -> None:
        try:
            while not (self._closing and not self._rows and not self._waiting and not self._scoring):
                self._take(block=not self._rows and not self._waiting and not self._scoring)
                self._step()
        except BaseException:
            # Whatever killed the loop (a step's own errors are caught in `_step`), nobody may wait forever:
            # every admitted or queued request gets an answer, and `alive` turns False for /ping.
            logger.critical("the generation worker died", exc_info=True)
            self._fail_everyone(WorkerStopped("the generation worker died"))
            raise

    def _fail_everyone(self, error: Exception) -> None:
        jobs = {id(row.job): row.job for row in self._rows}
        jobs.update({id(job): job for job in self._admitting})
        jobs.update({id(job): job for job in self._waiting})
        jobs.update({id(job): job for job in self._scoring})
        try:
            while True:
                job = self._queue.get_nowait()
                if job is not None:
                    jobs[id(job)] = job
        except queue.Empty:
            pass
        for job in jobs.values():
            self._deliver(job, error)
        self._rows, self._waiting, self._cache, self._mask = [], collections.deque(), None, None
        self._scoring = collections.deque()

    def _take(self, block: bool) -> None:
        """Move queued jobs to the waiting line; when idle, block for the first and wait a little for company."""
        try:
            if block and not self._closing:
                self._accept(self._queue.get())
                # Wait for company only when there is evidence of concurrent traffic: a lone client would
                # otherwise pay the window on every request for nothing.
                if self._last_batch > 1 and self.batch_window > 0:
                    time.sleep(self.batch_window)
            while True:
                self._accept(self._queue.get_nowait())
        except queue.Empty:
            pass

    def _accept(self, job: GenerationJob | ScoringJob | None) -> None:
        if job is None:
            self._closing = True
        elif isinstance(job, ScoringJob):
            self._scoring.append(job)
        else:
            self._waiting.append(job)

    def _step(self) -> None:
        """Run the scoring jobs, admit what fits, then one decode step for every running sequence."""
        while self._scoring:
            self._score(self._scoring.popleft())
        free = self.max_batch_size - len(self._rows)
        admitted: list[GenerationJob] = []
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if job.sampling.num_return_sequences > free and (self._rows or admitted):
                break
            admitted.append(self._waiting.popleft())
            free -= job.sampling.num_return_sequences
        if admitted and (self._rows and not self._joinable()):
            self._waiting.extendleft(reversed(admitted))  # sliding-window caches cannot merge: wait for a drain
            admitted = []
        if admitted and not self._rows and len(admitted) == 1 and self._draftable(admitted[0]):
            self._start_alone(admitted[0])  # its prefill happens inside the drafting stretch
            admitted = []
        # Jobs that score their prompt need logits at every prompt position: they prefill apart, so the
        # others keep the last-position-only prefill (no [rows, width, vocab] tensor for them).
        for group in _prefill_groups(admitted):
            self._admitting = group
            try:
                self._prefill(group)
            except Exception as exc:  # noqa: BLE001 - only these requests fail; the running batch goes on
                logger.exception("prefill failed for %d request(s)", len(group))
                for job in group:
                    self._states.pop(id(job), None)
                    self._deliver(job, exc)
            self._admitting = []
        if self._rows:
            try:
                self._decode_drafted() if len(self._rows) == 1 and self._draftable(self._rows[0].job) else self._decode()
            except Exception as exc:  # noqa: BLE001 - delivered to each running request as its own failure
                logger.exception("decode step failed for a batch of %d", len(self._rows))
                for job in {id(row.job): row.job for row in self._rows}.values():
                    self._states.pop(id(job), None)
                    self._deliver(job, exc)
                self._rows, self._cache, self._mask = [], None, None
        self._last_batch = max(len(self._rows), len(admitted))

    def _draftable(self, job: GenerationJob) -> bool:
        """When to draft: a draft is loaded, this is the only sequence (nothing runs beside it, nothing waits),
        and the request is plain greedy (one sequence, no repetition penalty, no adapter routing).

        Why only then: one sequence per decode step is the case where a forward pass costs reading the weights
        for one token, which verifying several drafted tokens at once amortises; with two or more rows the
        continuous batch already amortises the weights over its rows, and transformers' assisted generation
        verifies one row at a time. A drafting stretch ends at the first arrival (`_YieldToArrivals`); the row
        then rejoins batched decoding with the cache the library leaves it. Greedy only: the result is then the
        model's own greedy output; sampled requests keep their per-request seeded generator, which the
        library's speculative sampling would not use.
        """
        sampling = job.sampling
        return (self.draft is not None and not self.multi_adapter and not sampling.do_sample
                and sampling.num_return_sequences == 1 and sampling.repetition_penalty == 1.0 and job.logprobs is None
                and not self._waiting and self._queue.empty())

    def _start_alone(self, job: GenerationJob) -> None:
        state = self._states[id(job)] = _JobState(job, self.tokenizer, self.device)
        state.sequences = [_Sequence(job, state)]
        self._rows, self._cache, self._mask = state.sequences, None, None

    def _decode_drafted(self) -> None:
        """Decode the only row with the draft until it ends or another request arrives (see `_draftable`).

        transformers' `generate(assistant_model=...)` drafts and verifies; every token it accepts goes through
        `_advance` as it comes (streaming, stop strings, budget, cancellation), and a stopping criterion ends the
        call once the row has ended or someone waits. It starts from the whole sequence so far: assisted
        generation does not take a filled cache, so the first verify step recomputes it (one prefill per stretch).
        """
        row = self._rows[0]
        self.observe_batch(1)
        ids = torch.tensor([row.job.prompt_ids + row.tokens], device=self.device)
        budget = row.job.max_new_tokens - len(row.tokens)
        if self.context is not None:
            budget = min(budget, self.context - ids.shape[1])
        feed = _RowFeed(self, row)
        with count_verify_steps(self.model) as counts:
            output = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), assistant_model=self.draft, max_new_tokens=max(budget, 1),
                do_sample=False, eos_token_id=sorted(self.eos_ids) or None, pad_token_id=self.pad_id, streamer=feed,
                stopping_criteria=StoppingCriteriaList([_YieldToArrivals(self, row)]), return_dict_in_generate=True)
        counts.new_tokens = feed.fed
        self.observe_draft(counts)
        if row.reason is None:  # someone arrived: the row goes back to batched decoding with the library's cache
            cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
            width = len(row.job.prompt_ids) + len(row.tokens) - 1
            if cache is None or cache.get_seq_length() != width:
                raise RuntimeError(f"assisted generation left a cache of {cache and cache.get_seq_length()} "
                                   f"positions; expected {width}")
            self._cache, self._mask = cache, torch.ones((1, width), dtype=torch.long, device=self.device)
        self._retire()

    def _joinable(self) -> bool:
        """Rows can join a running cache when every layer is a plain growing cache (no sliding window)."""
        return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(self._cache, "layers", []))

    def _forward(self, rows: list[_Sequence], cache: Any, all_positions: bool = False, **inputs: Any) -> torch.Tensor:
        inputs[self._cache_arg] = cache
        if self.multi_adapter:
            inputs["adapter_names"] = [row.job.adapter or BASE_ADAPTER for row in rows]
        output = self.model(**inputs, use_cache=True)
        return output.logits if all_positions else output.logits[:, -1, :]  # [rows, width, vocab] or [rows, vocab]

    def _prefill(self, jobs: list[GenerationJob]) -> None:
        rows: list[_Sequence] = []
        for job in jobs:
            state = self._states[id(job)] = _JobState(job, self.tokenizer, self.device)
            state.sequences = [_Sequence(job, state) for _ in range(job.sampling.num_return_sequences)]
            rows.extend(state.sequences)
        width = max(len(row.job.prompt_ids) for row in rows)
        # Left padding: every row's last column is its last real token, so one decode step serves all rows.
        ids = torch.tensor([[self.pad_id] * (width - len(r.job.prompt_ids)) + r.job.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.job.prompt_ids)) + [1] * len(r.job.prompt_ids) for r in rows], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        scoring = _scores_prompt(jobs[0])  # groups are all-scoring or none (`_prefill_groups`)
        logits = self._forward(rows, cache, all_positions=scoring, input_ids=ids, attention_mask=mask,
                               position_ids=positions, **({} if scoring else self._last_logits_only))
        if scoring:
            for job in jobs:
                row = rows.index(self._states[id(job)].sequences[0])
                prompt = logits[row, width - len(job.prompt_ids):]  # [prompt, vocab]: its real positions
                self._states[id(job)].prompt_logprobs = [None] + self._position_logprobs(
                    prompt[:-1], job.prompt_ids[1:], job.logprobs.prompt or 0, job.logprobs.temperature)
            logits = logits[:, -1, :]
        tokens = self._choose(rows, logits)
        self._record(rows, logits, tokens)
        generating = [i for i, row in enumerate(rows) if row.job.max_new_tokens > 0]
        for row in rows:  # max_tokens 0: the prompt is scored, nothing is generated
            if row.job.max_new_tokens == 0:
                row.reason = "length"
        self._advance([rows[i] for i in generating], [tokens[i] for i in generating])
        self._join(rows, cache, mask)
        self._retire()

    def _join(self, rows: list[_Sequence], cache: Any, mask: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        assert self._mask is not None
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            if getattr(old, "keys", None) is None or getattr(new, "keys", None) is None:
                continue
            old.keys = torch.cat([_left_pad(old.keys, width, -2), _left_pad(new.keys, width, -2)])
            old.values = torch.cat([_left_pad(old.values, width, -2), _left_pad(new.values, width, -2)])
        self._mask = torch.cat([_left_pad(self._mask, width, -1), _left_pad(mask, width, -1)])
        self._rows = self._rows + rows

    def _decode(self) -> None:
        rows = self._rows
        assert self._mask is not None
        self.observe_batch(len(rows))
        ids = torch.tensor([[row.tokens[-1]] for row in rows], device=self.device)
        positions = torch.tensor([[row.position] for row in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(rows, self._cache, input_ids=ids, attention_mask=mask, position_ids=positions)
        self._mask = mask
        tokens = self._choose(rows, logits)
        self._record(rows, logits, tokens)
        self._advance(rows, tokens)
        self._retire()

    def _score(self, job: ScoringJob) -> None:
        """One scoring job: its prompts in forward passes of at most `max_batch_size` rows; a failure is its own."""
        if job.cancelled:
            return
        try:
            scores: list[PromptScores] = []
            for start in range(0, len(job.prompts), self.max_batch_size):
                scores.extend(self._score_rows(job.prompts[start:start + self.max_batch_size], job))
        except Exception as exc:  # noqa: BLE001 - only this request fails; the running batch goes on
            if _out_of_memory(exc):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                longest = max(len(prompt) for prompt in job.prompts)
                message = (f"scoring {len(job.prompts)} prompt(s) of up to {longest} tokens in one request ran out of "
                           f"memory on {self.device}; send fewer prompts per request (a served teacher: a smaller batch)")
                logger.warning(message)
                exc = ScoringTooLarge(message)
            else:
                logger.exception("scoring failed for %d prompt(s)", len(job.prompts))
            self._deliver(job, exc)
            return
        self._deliver(job, scores)

    def _score_rows(self, prompts: list[list[int]], job: ScoringJob) -> list[PromptScores]:
        """Right-padded rows (as a training collator pads them), one forward pass without a cache; the scores
        of the real positions only, a chunk at a time (`_position_logits`)."""
        self.observe_batch(len(prompts))
        width = max(len(prompt) for prompt in prompts)
        ids = torch.tensor([p + [self.pad_id] * (width - len(p)) for p in prompts], device=self.device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=self.device)
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.multi_adapter:
            inputs["adapter_names"] = [job.adapter or BASE_ADAPTER] * len(prompts)
        real = mask[:, 1:].bool()  # [rows, width-1]: the positions that predict a prompt token
        targets = ids[:, 1:][real]  # [n], prompt after prompt
        top, temperature = job.spec.prompt or 0, job.spec.temperature
        parts, start = [], 0
        for logits in self._position_logits(inputs, real):  # [c, vocab]
            parts.append(self._scores(logits, targets[start:start + logits.shape[0]], top, temperature))
            start += logits.shape[0]
        columns = [torch.cat(column) for column in zip(*parts, strict=True)]
        lengths = [len(prompt) - 1 for prompt in prompts]
        return [PromptScores(*row) for row in zip(*(column.split(lengths) for column in columns), strict=True)]

    def _position_logits(self, inputs: dict[str, Any], real: torch.Tensor) -> Iterator[torch.Tensor]:
        """The logits [c, vocab] of the `real` [rows, width-1] positions in order, at most `score_chunk` (else
        `chunk_rows`) positions at a time; at least one chunk, empty when there are no positions."""
        step = self.score_chunk or chunk_rows(self.vocab_width, self.device)
        if self._head_runs_apart(inputs["input_ids"][:1, :8]):
            with capture_hidden(self.model) as (store, _):
                self.model(**inputs, use_cache=False)
            hidden = store.pop("hidden")[:, :-1][real]  # [n, H]: the head runs per chunk below
            head = sliced_head(self.model, self.vocab_width)
            for start in range(0, max(hidden.shape[0], 1), step):
                yield head(hidden[start:start + step])
            return
        # Whole logits (the model post-processes them, or its head is not a plain Linear): as many rows per
        # forward as `step` positions hold, at least one.
        rows = max(1, step // max(real.shape[1], 1))
        yield real.new_zeros((0, self.vocab_width), dtype=torch.float32)
        for first in range(0, real.shape[0], rows):
            part = {name: value[first:first + rows] for name, value in inputs.items()}
            logits = self.model(**part, use_cache=False).logits[:, :-1][real[first:first + rows]]  # [m, vocab]
            for start in range(0, logits.shape[0], step):
                yield logits[start:start + step]

    def _head_runs_apart(self, sample: torch.Tensor) -> bool:
        """Whether the head may run apart from the forward: a plain Linear head whose product equals the
        model's logits (no soft-capping or scaling after it). Checked once, on `sample` [1, s] ids."""
        if self._head_apart is None:
            self._head_apart = (type(output_head(self.model)) is torch.nn.Linear
                                       and head_reproduces_logits(self.model, sample))
        return self._head_apart

    def _scores(self, logits: torch.Tensor, tokens: torch.Tensor, top: int, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of `logits` [n, vocab]: the log-prob and rank of `tokens[n]` and the `top` most likely, at
        `temperature`, over the real vocabulary, in float32, on the CPU."""
        logp = torch.log_softmax(logits[:, : self.vocab_width].float() / temperature, dim=-1)  # [n, V]
        picked = logp.gather(1, tokens.to(logp.device).unsqueeze(1))  # [n, 1]
        ranks = (logp > picked).sum(-1) + 1
        best = logp.topk(min(top, logp.shape[1]), dim=-1)  # top 0: [n, 0]
        return picked.squeeze(1).cpu(), ranks.cpu(), best.indices.cpu(), best.values.cpu()

    def _position_logprobs(self, logits: torch.Tensor, tokens: list[int], top: int,
                           temperature: float) -> list[PositionLogprobs]:
        """Per row of `logits` [n, vocab]: the log-prob of `tokens[i]` and the `top` most likely, at
        `temperature`, over the real vocabulary, in float32."""
        scores = PromptScores(*self._scores(logits, torch.tensor(tokens), top, temperature))
        return scores.positions([0, *tokens])[1:]  # type: ignore[return-value]

    def _record(self, rows: list[_Sequence], logits: torch.Tensor, tokens: list[int]) -> None:
        """Keep the log-probs of each chosen token for the rows whose job asks (the model's own distribution,
        not the sampling processors')."""
        for index, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            spec = row.job.logprobs
            if spec is not None and spec.generated is not None and row.job.max_new_tokens > 0:
                row.logprobs.extend(self._position_logprobs(logits[index:index + 1], [token], spec.generated, spec.temperature))

    def _choose(self, rows: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """The next token of each row: argmax for plain greedy rows (one call), processors and sampling otherwise."""
        chosen = logits.argmax(dim=-1).tolist()
        for index, row in enumerate(rows):
            state = row.state
            if not state.processors and not row.job.sampling.do_sample:
                continue
            scores = logits[index:index + 1].float()  # [1, vocab]
            if state.processors:
                seen = torch.tensor([row.job.prompt_ids + row.tokens], device=self.device)
                scores = state.processors(seen, scores)
            if row.job.sampling.do_sample:
                probs = torch.softmax(scores, dim=-1)
                chosen[index] = int(torch.multinomial(probs, 1, generator=state.generator).item())
            else:
                chosen[index] = int(scores.argmax(dim=-1).item())
        return chosen

    def _advance(self, rows: list[_Sequence], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens, strict=True):
            row.tokens.append(token)
            state = row.state
            if token in self.eos_ids:
                row.reason, row.eos = "stop", True
            elif state.streamer is not None:
                state.streamer.put(torch.tensor([token]))
            if row.reason is None and state.stop_criteria is not None:
                if bool(state.stop_criteria(torch.tensor([row.tokens]), None)[0]):
                    row.reason = "stop"
            if row.reason is None and (len(row.tokens) >= row.job.max_new_tokens
                                       or (self.context is not None and row.position + 1 >= self.context)):
                row.reason = "length"
            if row.job.cancelled:
                row.reason = "cancelled"

    def _retire(self) -> None:
        """Drop finished rows from the batch (and their cache rows), and answer every job whose rows all ended."""
        for row in self._rows:
            if row.job.cancelled and row.reason is None:
                row.reason = "cancelled"
        keep = [i for i, row in enumerate(self._rows) if row.reason is None]
        if len(keep) == len(self._rows):
            return
        finished = {id(row.job): row.job for row in self._rows if row.reason is not None}
        if keep:
            index = torch.tensor(keep, device=self.device)
            self._cache.batch_select_indices(index)
            assert self._mask is not None
            mask = self._mask[index]
            start = int(mask.any(dim=0).int().argmax())  # leading columns that are padding in every row go
            if start > 0 and self._joinable():
                for layer in self._cache.layers:
                    if getattr(layer, "keys", None) is not None:
                        layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
                mask = mask[:, start:]
            self._mask = mask
            self._rows = [self._rows[i] for i in keep]
        else:
            self._rows, self._cache, self._mask = [], None, None
        for job in finished.values():
            if all(row.reason is not None for row in self._states[id(job)].sequences):
                self._finish(job)

    def _finish(self, job: GenerationJob) -> None:
        state = self._states.pop(id(job))
        texts, reasons, count, ids, logprobs = [], [], 0, [], []
        for row in state.sequences:
            tokens = row.tokens[:-1] if row.eos else row.tokens
            text, hit = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), job.stop)
            if hit:
                tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            count += len(tokens)
            texts.append(text)
            reasons.append("stop" if row.eos or hit else "length")
            ids.append(list(tokens))
            logprobs.append(row.logprobs[: len(tokens)])
        if state.streamer is not None and not job.cancelled:
            state.streamer.end()
        if not job.cancelled:
            wanted = job.logprobs is not None and job.logprobs.generated is not None
            self._deliver(job, GenerationOutput(texts, count, reasons, ids, logprobs if wanted else None,
                                                state.prompt_logprobs))

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


class _RowFeed:
    """The streamer handed to `generate` in a drafting stretch: each accepted token goes through the engine's
    `_advance` (the first `put` is the prompt, as for every transformers streamer)."""

    def __init__(self, engine: GenerationEngine, row: _Sequence) -> None:
        self.engine, self.row, self.prompt_seen, self.fed = engine, row, False, 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.row.reason is not None:
                break
            self.engine._advance([self.row], [int(token)])
            self.fed += 1

    def end(self) -> None:
        pass


class _YieldToArrivals(StoppingCriteria):
    """Ends a drafting stretch when its row has ended or another request waits."""

    def __init__(self, engine: GenerationEngine, row: _Sequence) -> None:
        self.engine, self.row = engine, row

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self.row.reason is not None or self.row.job.cancelled or not self.engine._queue.empty() or bool(self.engine._waiting)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _scores_prompt(job: GenerationJob) -> bool:
    return job.logprobs is not None and job.logprobs.prompt is not None


def _prefill_groups(jobs: list[GenerationJob]) -> list[list[GenerationJob]]:
    """The admitted jobs split into those that score their prompt and the others (either may be empty)."""
    groups = [[job for job in jobs if not _scores_prompt(job)], [job for job in jobs if _scores_prompt(job)]]
    return [group for group in groups if group]


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros added before its entries along `dim` (-1 or -2) up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = (missing, 0) if dim == -1 else (0, 0, missing, 0)
    return torch.nn.functional.pad(tensor, pad)
