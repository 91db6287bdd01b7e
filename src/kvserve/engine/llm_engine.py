"""LLMEngine: add requests, step the batch, collect RequestOutputs.

One `step()` is five moves:

    output = scheduler.schedule()          # which sequences run now: a plain-data SchedulerOutput
    result = executor.execute(output)      # forward + sample, on however many ranks
    update = scheduler.update(output, result)   # tokens appended, outputs forked, beams stepped, stops
    detokenize, apply stop strings          # per request
    -> RequestOutputs

The engine holds no model and no KV cache (the executor's workers do) and
writes no sequence status, count or block (the scheduler does): it keeps what
the user sees of each request (`request.py`) and the tokenizer. Outsiders read
its state through `stats()`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from kvserve import startup
from kvserve.attention.kv_quant import describe as describe_kv_cache
from kvserve.attention.sliding_window import block_window, layer_windows
from kvserve.config import EngineConfig
from kvserve.engine.beam_search import BeamSearch
from kvserve.engine.model_runner import kv_bytes_per_token
from kvserve.engine.request import OutputState, Request
from kvserve.engine.runner_output import ModelRunnerOutput
from kvserve.engine.scheduler import Scheduler, SchedulerStats
from kvserve.engine.scheduler_output import SchedulerOutput
from kvserve.engine.sequence import Sequence
from kvserve.engine.sequence_group import SequenceGroup
from kvserve.engine.snapshot import EngineSnapshot
from kvserve.executor.abstract import Executor, ExecutorDeadError, WorkerInfo
from kvserve.executor.factory import make_executor
from kvserve.generation_config import sampling_defaults
from kvserve.models.loader import load_hf_config, resolve_model_path
from kvserve.spec_decode.draft_runner import check_draft_model, draft_model_config
from kvserve.outputs import CompletionOutput, Logprob, RequestOutput
from kvserve.sampling_params import BeamSearchParams, SamplingParams
from kvserve.structured_output.compiler import GrammarCompiler
from kvserve.tokenizer import IncrementalDetokenizer, load_chat_template, load_tokenizer
from kvserve.validation import brief, utf8_error

logger = logging.getLogger("kvserve")

UNBOUNDED = 2**62  # max_seq_len of a streaming engine: sequences end by max_tokens, a stop, or an abort
_MAX_UNCONFIRMED_FAULTS = 3  # single-request steps failing in a row before the engine itself is blamed
_MAX_ERROR_CHARS = 500


class EngineDeadError(RuntimeError):
    """A step failed in a way no single request explains: the engine cannot be trusted to step again."""


@dataclass
class StepStats:
    """What the last step did (for metrics and tests)."""

    num_seqs: int = 0
    num_tokens: int = 0
    num_prefill_tokens: int = 0
    num_preempted: int = 0
    duration_s: float = 0.0
    num_context_tokens: int = 0  # keys its attention read (SchedulerUpdate)
    num_attention_pairs: int = 0  # (query, key) pairs its attention weighed
    num_generated_tokens: int = 0  # tokens appended to outputs: every output of n > 1, accepted proposals included

    @property
    def num_decode_tokens(self) -> int:
        return self.num_tokens - self.num_prefill_tokens


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None, block_share: tuple[int, int] = (0, 1)) -> None:
        """`executor`: one already running (a pipeline's virtual engines share one), else a new one is started.
        `block_share` (i, n): this engine schedules the i-th of n equal parts of the executor's KV blocks."""
        started = time.perf_counter()
        self.config = config
        path = resolve_model_path(config.model, config.revision)
        self.model_path = path
        with startup.phase("reading the model's config"):
            hf_config = load_hf_config(path)
        config.resolve(hf_config)
        self.hf_config = hf_config
        # None under skip_tokenizer_init: prompts are token ids, outputs carry ids and empty text
        with startup.phase("loading the tokenizer"):
            self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.tokenizer or path, config.revision)
        if config.chat_template is not None:
            if self.tokenizer is None:
                raise ValueError("chat_template needs the tokenizer, which skip_tokenizer_init=True left unloaded")
            self.tokenizer.chat_template = load_chat_template(config.chat_template)
        self.eos_token_ids = self._eos_token_ids(path)
        draft = draft_model_config(config.speculative_config)
        self.draft_hf_config = None if draft is None else draft[1]
        if draft is not None:
            check_draft_model(hf_config, draft[1])
        # structured output: compiles constraints (xgrammar is imported at the first one); thread-safe, so the
        # server compiles a request's constraint before it queues it and this engine finds it cached
        self.grammar_compiler = GrammarCompiler(self.tokenizer, hf_config.vocab_size, self.eos_token_ids)
        # what a request leaves unset takes these first (--generation-config), then SamplingParams' own defaults
        self.sampling_defaults = sampling_defaults(config.generation_config, path)
        window = config.sliding_window or block_window(layer_windows(hf_config))

        share, shares = block_share
        if executor is None:
            with startup.phase("loading the model"):
                executor = make_executor(config, hf_config, path, self.eos_token_ids)
            num_kv_blocks = self._num_kv_blocks(executor.available_kv_cache_memory(), shares * self._blocks_needed(window))
            with startup.phase("allocating the KV cache"):
                executor.initialize_cache(num_kv_blocks)
        self.executor = executor
        num_blocks = executor.num_blocks // shares
        self.worker_info = executor.info()
        self.max_seq_len = self._max_seq_len(num_blocks, window)
        self.scheduler = Scheduler(
            num_blocks, config.block_size, config.enable_prefix_caching, config.max_num_seqs, config.max_num_batched_tokens,
            config.enable_chunked_prefill, self.max_seq_len, self.eos_token_ids, window, config.attention_sinks,
            share * num_blocks, config.speculative_config,
        )
        self.requests: dict[str, Request] = {}
        self._token_texts: dict[int, str] = {}
        self.last_step = StepStats()
        self.total_steps = 0
        self._unconfirmed_faults = 0
        self._step_started = 0.0
        if share == 0:
            startup.ready(f"the engine for {os.path.basename(os.path.normpath(path))}", started)

    @classmethod
    def from_engine_args(cls, **kwargs: Any) -> "LLMEngine":
        return cls(EngineConfig(**kwargs))

    # ---- start-up -----------------------------------------------------------------

    def _eos_token_ids(self, path: str) -> set[int]:
        ids: set[int] = set()
        if os.path.isdir(path):
            try:
                from transformers import GenerationConfig

                eos = GenerationConfig.from_pretrained(path).eos_token_id
                ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            except Exception:
                pass
        config_eos = getattr(self.hf_config, "eos_token_id", None)
        ids.update(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def kv_bytes_per_token(self) -> int:
        """KV bytes per token on the rank that holds the most (its stage's layers, its share of the heads), a
        draft model's cache included (it has the same blocks: spec_decode/draft_runner.py)."""
        config = self.config
        draft = self.draft_hf_config
        return max(kv_bytes_per_token(self.hf_config, config.torch_dtype, config.kv_cache_dtype, context)
                   for context in config.rank_layout()) + (
            0 if draft is None else kv_bytes_per_token(draft, config.torch_dtype, config.kv_cache_dtype))

    def _blocks_needed(self, window: int | None) -> int:
        """The most KV blocks the scheduler can ever hold at once: max_num_seqs sequences of max_model_len
        tokens each (for a streaming engine, of the most tokens a streaming sequence holds)."""
        config = self.config
        per_sequence = self._held_at_most(window) if config.streaming_window else config.max_model_len
        return config.max_num_seqs * -(-per_sequence // config.block_size)

    def _num_kv_blocks(self, budget: int, needed: int) -> int:
        """Blocks every rank can hold in `budget` bytes (per rank): each block is the same tokens on every rank.

        The default budget (neither kv_cache_memory_bytes nor gpu_memory_utilization given) is a share of the
        memory, capped at the `needed` blocks that max_num_seqs full-length sequences can use: a small model
        with a short context does not take gigabytes it could never fill."""
        config = self.config
        per_token = self.kv_bytes_per_token()
        per_block = per_token * config.block_size
        if config.num_gpu_blocks_override is not None:
            num_blocks = config.num_gpu_blocks_override
        else:
            num_blocks = budget // per_block
            if num_blocks < 1:
                raise ValueError(
                    f"kv_cache_memory_bytes={budget} holds no KV block of {per_block} bytes "
                    f"({per_token} bytes per token x block_size {config.block_size}); raise it"
                )
            if config.kv_cache_memory_bytes is None and config.gpu_memory_utilization is None and needed < num_blocks:
                logger.info(
                    "KV cache sized by need: max_num_seqs %d x max_model_len %d tokens fit in %d blocks (%.1f MiB), "
                    "less than the memory share (%.1f MiB); set kv_cache_memory_bytes or gpu_memory_utilization for "
                    "more (room for the prefix cache)", config.max_num_seqs, config.max_model_len, needed,
                    needed * per_block / 2**20, num_blocks * per_block / 2**20,
                )
                num_blocks = needed
        tokens = num_blocks * config.block_size
        ranks = f" per rank, {config.world_size} ranks" if config.world_size > 1 else ""
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %d bytes/token%s, %s); max_model_len %d",
            num_blocks, config.block_size, tokens, num_blocks * per_block / 2**20, per_token, ranks,
            describe_kv_cache(config.kv_cache_dtype, config.torch_dtype), config.max_model_len,
        )
        return num_blocks

    def _max_seq_len(self, num_blocks: int, window: int | None) -> int:
        """The longest a sequence may grow: max_model_len, or what the whole KV cache holds if that is less;
        unbounded (`UNBOUNDED`) for a streaming engine (`sliding_window` set) whose cache holds a sequence's
        most blocks.

        With a sliding window on every layer (`window`) and chunked prefill, a sequence holds only the
        blocks of its window and of one chunk, at most window + max_num_batched_tokens + 2 blocks' worth of
        tokens (the window's first block and the chunk's last may be partly used), and its sink blocks:
        where the cache holds that, any length up to max_model_len fits, and a streaming sequence may grow
        past it, its `max_tokens` permitting (positions within the sink + window cache never pass
        attention_sinks + sliding_window: attention/attention_sinks.py). Without chunked prefill a
        recomputed sequence (after a preemption) needs the blocks of all its tokens at once.
        """
        config = self.config
        tokens = num_blocks * config.block_size
        per_sequence = tokens
        held_at_most = None if window is None else self._held_at_most(window)
        if held_at_most is not None and config.enable_chunked_prefill and tokens >= held_at_most:
            per_sequence = UNBOUNDED if config.streaming_window else config.max_model_len
            logger.info("every layer attends through a sliding window of at most %d tokens%s: a sequence holds at most "
                        "%d tokens of KV cache%s", window, f" and {config.attention_sinks} sinks" if config.attention_sinks else "",
                        held_at_most, ", and may grow past max_model_len" if config.streaming_window else "")
        elif config.streaming_window:
            logger.warning("sliding_window %d: the KV cache (%d tokens) cannot hold a sequence's window and a prefill "
                           "chunk (%d tokens, with chunked prefill on): sequences stop at %d tokens", window, tokens,
                           held_at_most, min(config.max_model_len, tokens))
        if per_sequence < config.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, fewer than max_model_len %d: sequences stop at %d tokens. "
                "Raise kv_cache_memory_bytes or lower max_model_len.", tokens, config.max_model_len, tokens,
            )
        return per_sequence if per_sequence == UNBOUNDED else min(config.max_model_len, per_sequence)

    def _held_at_most(self, window: int) -> int:
        """The most tokens of KV cache a sequence holds when every layer attends through `window` (and chunked
        prefill is on): its sink blocks, its window and one prefill chunk, with a partly used block at each end."""
        config = self.config
        sink_tokens = -(-config.attention_sinks // config.block_size) * config.block_size
        return sink_tokens + window + config.max_num_batched_tokens + 2 * config.block_size

    # ---- requests -------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt is text, but skip_tokenizer_init=True loaded no tokenizer to encode it: "
                             "give the prompt as token ids")
        error = utf8_error(prompt)
        if error is not None:
            raise ValueError(f"prompt must be valid Unicode text, but {error}")
        return self.tokenizer(prompt).input_ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | None,
        params: SamplingParams | BeamSearchParams | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (and queues nothing) for a bad prompt or parameter.

        `BeamSearchParams` make it a beam search; its single RequestOutput comes
        when the search ends and holds the beams, best first.
        """
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {brief(request_id)} is already in use")
        text, prompt_token_ids = self.prompt_text_and_ids(prompt, prompt_token_ids)
        self._validate_prompt(prompt_token_ids)
        if isinstance(params, BeamSearchParams):
            request, group = self._beam_request(request_id, prompt_token_ids, params, text)
        else:
            request, group = self._sampling_request(request_id, prompt_token_ids, params, text)
        self.requests[request_id] = request
        self.scheduler.add(group)

    def prompt_text_and_ids(self, prompt: str | list[int] | None, prompt_token_ids: list[int] | None) -> tuple[str | None, list[int]]:
        """The prompt's text (None for token ids alone) and its token ids, encoding the text when no ids are given."""
        if prompt_token_ids is not None:
            return (prompt if isinstance(prompt, str) else None), prompt_token_ids
        if isinstance(prompt, str):
            return prompt, self.encode(prompt) if prompt else []
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _sampling_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, text: str | None) -> tuple[Request, SequenceGroup]:
        self._validate_params(params)
        bad_words = self._bad_words_token_ids(params.bad_words)
        constraint = params.structured_outputs
        outputs = []
        for i in range(params.best_of):
            seq = Sequence(request_id, prompt_ids, params, text, seed=params.seed_for_output(i))
            seq.bad_words_token_ids = bad_words
            if constraint is not None:  # each output walks the grammar on its own
                seq.grammar = self.grammar_compiler.new_state(constraint)
            if i > 0:
                seq.prompt_logprobs = None
            detokenizer = None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            outputs.append(OutputState(seq, detokenizer))
        seqs = [o.seq for o in outputs]
        return Request(request_id, seqs[0], params.n, outputs), SequenceGroup(request_id, seqs[0], seqs[1:])

    def _beam_request(self, request_id: str, prompt_ids: list[int], params: BeamSearchParams, text: str | None) -> tuple[Request, SequenceGroup]:
        if params.beam_width > self.config.max_num_seqs:
            raise ValueError(f"beam_width must be <= max_num_seqs ({self.config.max_num_seqs}), got {params.beam_width}")
        seq = Sequence(request_id, prompt_ids, SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True), text)
        seq.is_beam = True
        max_new_tokens = min(params.max_tokens, self.max_seq_len - len(prompt_ids))
        search = BeamSearch(params, self.eos_token_ids, max_new_tokens, seq)
        return Request(request_id, seq, params.beam_width, beam=search), SequenceGroup(request_id, seq, beam=search)

    def _validate_params(self, params: SamplingParams) -> None:
        """The checks SamplingParams cannot make alone: limits set by this engine and this model's vocabulary."""
        if params.best_of > self.config.max_num_seqs:
            raise ValueError(f"best_of must be <= max_num_seqs ({self.config.max_num_seqs}), got {params.best_of}")
        if self.tokenizer is None:
            needs_text = [name for name, value in (("stop", params.stop_list), ("bad_words", params.bad_words)) if value]
            if needs_text:
                raise ValueError(f"{' and '.join(needs_text)} need the tokenizer, which skip_tokenizer_init=True left "
                                 "unloaded (stop_token_ids work on token ids)")
        vocab = self.hf_config.vocab_size
        if params.top_k > vocab:
            raise ValueError(f"top_k must be in [1, {vocab}] (the vocabulary size), or 0 / -1 to disable, got {brief(params.top_k)}")
        for name, ids in (("logit_bias", list(params.logit_bias or ())), ("allowed_token_ids", params.allowed_token_ids or [])):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name} token ids must be in [0, {vocab - 1}], got {brief(bad[:5])}")

    def _bad_words_token_ids(self, words: list[str] | None) -> list[list[int]]:
        """Each bad word as token ids, alone and after a space (a word inside a text usually starts with one)."""
        found: list[list[int]] = []
        for word in words or []:
            for variant in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in found:
                    found.append(ids)
        return found

    def _validate_prompt(self, ids: list[int]) -> None:
        """A streaming engine (`sliding_window` set) takes prompts of any length its cache can stream through
        (`_max_seq_len`): each chunk only reads the sinks and its window."""
        if len(ids) == 0:
            raise ValueError("prompt must not be empty (0 tokens)")
        if len(ids) >= self.config.max_model_len and self.max_seq_len != UNBOUNDED:
            raise ValueError(
                f"prompt is {len(ids)} tokens long, but the model's context (max_model_len) is "
                f"{self.config.max_model_len} tokens, and at least one token must be generated"
            )
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens long, but the whole KV cache holds only {self.max_seq_len} tokens; "
                "raise kv_cache_memory_bytes"
            )
        vocab = self.hf_config.vocab_size  # scanned last: a too-long prompt is refused without a pass over its ids
        bad = [t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab - 1}], got {brief(bad[:5])}")

    def rank_infos(self) -> list[WorkerInfo]:
        """What each rank of the model holds (weights, KV bytes, sequences it keeps state for), by global rank."""
        return self.executor.rank_infos()

    def shutdown(self) -> None:
        """Stop the executor's worker processes (nothing to do when the model runs in this process)."""
        self.executor.shutdown()

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks. Unknown ids are ignored."""
        if self.requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def unfinished_request_ids(self) -> list[str]:
        return list(self.requests)

    def stats(self) -> SchedulerStats:
        """A snapshot of the queues and the KV block pool: what the server, metrics, estimator and bench read."""
        return self.scheduler.stats()

    def snapshot(self) -> EngineSnapshot:
        """Every block's state and every running sequence's block table (the live dashboard's view; a copy)."""
        return EngineSnapshot([self.scheduler.snapshot()])

    # ---- the step ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step. A request whose forward, sampling or post-processing fails ends alone, with an
        error output; a fault that no single request explains raises `EngineDeadError`."""
        return self.finish_step(self.start_step())

    def start_step(self) -> SchedulerOutput | None:
        """Schedule a step and hand it to the executor (which may run it in other processes while this one
        goes on: data-parallel replicas start their steps one after the other, then finish them); None
        when there is nothing to run."""
        self._step_started = time.perf_counter()
        output = self.scheduler.schedule()
        try:
            if output.is_empty() and not output.finished_seq_ids:
                self.last_step = StepStats(num_preempted=output.num_preempted)
                return None
            self.executor.submit(output)  # an empty step still tells the ranks which sequences to forget
        except ExecutorDeadError as exc:
            raise EngineDeadError(f"a rank of the model is gone: {exc}") from exc
        return output

    def finish_step(self, output: SchedulerOutput | None) -> list[RequestOutput]:
        """Collect the step `start_step` began and turn its result into RequestOutputs."""
        if output is None:
            return []
        started = self._step_started
        try:
            result = self.executor.collect()
        except ExecutorDeadError as exc:
            raise EngineDeadError(f"a rank of the model is gone: {exc}") from exc
        except Exception as exc:
            failed = self._requests_failing_alone(output, exc)
            self.last_step = StepStats(num_preempted=output.num_preempted, duration_s=time.perf_counter() - started)
            return [self._fail_request(self.requests[rid], exc) for rid in failed]
        if output.is_empty():
            self.last_step = StepStats(num_preempted=output.num_preempted)
            return []
        self._unconfirmed_faults = 0
        update = self.scheduler.update(output, result)
        now = time.monotonic()
        self._record_logprobs(update.grown, update.num_new_tokens, result)
        self._record_prompt_logprobs(update.scheduled, result)
        grown_by_request: dict[str, list[Sequence]] = {}
        for seq in update.grown:
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            grown_by_request.setdefault(seq.request_id, []).append(seq)
        ended_searches = {group.request_id for group in update.finished_beam_groups}
        outputs = []
        for request_id in [*grown_by_request, *(r for r in ended_searches if r not in grown_by_request)]:
            request = self.requests[request_id]
            try:
                for seq in grown_by_request.get(request_id, []):
                    self._update_text(request.output_of(seq), update.num_new_tokens[seq.seq_id], result.logprobs.get(seq.seq_id))
                if request_id in ended_searches:
                    request.beam_texts = [self._decode(h.token_ids) for h in request.beam.results()] \
                        if self.tokenizer is not None else ["" for _ in request.beam.results()]
                if request.finished or request.streams:
                    outputs.append(request.make_output())
            except Exception as exc:
                outputs.append(self._fail_request(request, exc))
                continue
            if request.finished:
                self.requests.pop(request_id, None)
                self.scheduler.forget(request_id)
        self.last_step = StepStats(
            len(output.num_scheduled_tokens), output.total_num_scheduled_tokens, update.num_prefill_tokens, output.num_preempted,
            time.perf_counter() - started, update.num_context_tokens, update.num_attention_pairs,
            sum(update.num_new_tokens.values()),
        )
        self.total_steps += 1
        return outputs

    # ---- faults ---------------------------------------------------------------------

    def _requests_failing_alone(self, output: SchedulerOutput, exc: Exception) -> list[str]:
        """The requests of a failed step that fail on their own, found by bisection over the step's requests.

        A probe (`SchedulerOutput.restricted_to`) is a real forward of part of the step: it rewrites the
        same K/V slots with the same values, and the runner keeps nothing from it (seeded generators
        rewound), so the requests that pass simply run again next step. Raises `EngineDeadError` when no
        request, or every one of several, fails alone (the engine itself is broken), or when steps of a
        single request keep failing with nothing succeeding in between.
        """
        groups: dict[str, set[int]] = {}
        for seq_id, request_id in output.request_ids().items():
            groups.setdefault(request_id, set()).add(seq_id)

        def fails(request_ids: list[str]) -> bool:
            try:
                self.executor.execute(output.restricted_to(set().union(*(groups[rid] for rid in request_ids))))
                return False
            except Exception:
                return True

        def bisect(request_ids: list[str]) -> list[str]:
            if len(request_ids) == 1:
                return request_ids
            mid = len(request_ids) // 2
            halves = (request_ids[:mid], request_ids[mid:])
            return [rid for half in halves if fails(half) for rid in bisect(half)]

        request_ids = list(groups)
        failed = bisect(request_ids)
        if not failed or (len(failed) == len(request_ids) > 1):
            raise EngineDeadError(f"an engine step failed and no single request explains it: {exc!r}") from exc
        if len(request_ids) == 1:
            self._unconfirmed_faults += 1
            if self._unconfirmed_faults > _MAX_UNCONFIRMED_FAULTS:
                raise EngineDeadError(
                    f"{self._unconfirmed_faults} steps in a row failed, each running one request: {exc!r}"
                ) from exc
        else:
            self._unconfirmed_faults = 0  # the others ran: the engine works
        return failed

    def _fail_request(self, request: Request, exc: BaseException) -> RequestOutput:
        """End `request` now with finish_reason "error" and free its blocks; the other requests go on."""
        logger.error("request %s failed inside an engine step and was ended: %r", request.request_id, exc, exc_info=exc)
        self.scheduler.abort(request.request_id, "error")
        self.requests.pop(request.request_id, None)
        seq = request.prompt_seq
        completions = [
            CompletionOutput(i, state.text, list(state.seq.output_token_ids), finish_reason="error")
            for i, state in enumerate(request.outputs[: request.num_returned])
        ] or [CompletionOutput(0, "", [], finish_reason="error")]
        return RequestOutput(
            request.request_id, seq.prompt, seq.token_ids[: seq.num_prompt_tokens], completions, finished=True,
            new_text=[""] * len(completions), new_token_ids=[[] for _ in completions],
            error=f"the request failed inside the engine: {exc!r}"[:_MAX_ERROR_CHARS],
        )

    def _token_text(self, token: int) -> str | None:
        """The token's text for a Logprob (None without a tokenizer, as in vLLM)."""
        if self.tokenizer is None:
            return None
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    def _record_logprobs(self, grown: list[Sequence], num_new_tokens: dict[int, int], result: ModelRunnerOutput) -> None:
        """The top-logprob entries of the new tokens of the sequences that asked for them."""
        for seq in grown:
            tops = result.top_logprobs.get(seq.seq_id)
            if seq.logprobs is None or tops is None:
                continue
            count = num_new_tokens[seq.seq_id]
            for token, top, value in zip(seq.token_ids[len(seq) - count :], tops, result.logprobs[seq.seq_id]):
                ids, values, rank = top
                entry = {t: Logprob(v, r + 1, self._token_text(t)) for r, (t, v) in enumerate(zip(ids, values))}
                entry.setdefault(token, Logprob(value, rank, self._token_text(token)))
                seq.logprobs.append(entry)

    def _record_prompt_logprobs(self, scheduled: dict[int, Sequence], result: ModelRunnerOutput) -> None:
        for seq_id, plp in result.prompt_logprobs.items():
            seq = scheduled[seq_id]
            for token, value, rank, top_ids, top_values in zip(plp.token_ids, plp.logprobs, plp.ranks, plp.top_ids, plp.top_logprobs):
                entry = {t: Logprob(v, r + 1, self._token_text(t)) for r, (t, v) in enumerate(zip(top_ids, top_values))}
                entry.setdefault(token, Logprob(value, rank, self._token_text(token)))
                seq.prompt_logprobs.append(entry)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _update_text(self, state: OutputState, count: int, logprobs: list[float] | None) -> None:
        """Detokenize one output's `count` new tokens (more than one when speculative proposals were accepted),
        one at a time, applying its stop strings after each: a stop string that ends at an earlier one ends the
        output there, and the tokens after it are dropped (`logprobs`: the new tokens', to take theirs back out
        of the cumulative logprob).

        Only the tail that the new text can complete is searched: earlier text held no stop string,
        so a long generation costs the same per token as a short one.
        """
        if state.detokenizer is None:  # skip_tokenizer_init: no text (and no stop strings, refused at add_request)
            return
        seq = state.seq
        params = seq.params
        new = seq.token_ids[len(seq) - count :]
        for i, token in enumerate(new):
            delta = state.detokenizer.add_tokens([token])
            text = state.detokenizer.text
            if params.stop_list:
                start = max(0, len(text) - len(delta) - max(len(s) for s in params.stop_list) + 1)
                end, stop = self._find_stop(text, start, params)
                if stop is not None:
                    text = text[:end]
                    if not seq.is_finished:
                        self.scheduler.finish(seq, "stop", stop)
                    if i + 1 < count:
                        self.scheduler.truncate_output(seq, count - i - 1, sum(logprobs[i + 1 :]) if logprobs else 0.0)
                        if seq.logprobs is not None:
                            del seq.logprobs[len(seq.logprobs) - (count - i - 1) :]
                    state.text = text
                    return
            state.text = text

    @staticmethod
    def _find_stop(text: str, start: int, params: SamplingParams) -> tuple[int, str | None]:
        """Where the visible text ends at the first stop string found at or after `start`, and that string."""
        best, best_stop = -1, None
        for stop in params.stop_list:
            idx = text.find(stop, start)
            if idx != -1 and (best == -1 or idx < best):
                best, best_stop = idx, stop
        if best_stop is None:
            return len(text), None
        return (best + len(best_stop) if params.include_stop_str_in_output else best), best_stop
