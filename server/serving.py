"""Serving logic of the OpenAI endpoints, free of HTTP: request models in, response models (or chunks) out.

Flow of one request: check the model name, turn the prompt into token ids, build SamplingParams (400 on
anything out of range), start one engine request per prompt, and turn each choice's token deltas into
text with a ``ChoiceText`` (incremental detokenization, stop strings, logprobs). Leaving an engine
iterator early aborts that engine request, so every early exit (stop string, error, disconnect) frees
its KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from model.sampling_params import clamp_top_k
from model.tokenizer import Tokenizer
from server.budget import admitted
from server.engine.engine import EngineDeadError, QueueFullError
from server.engine.request import (
    CompletionOutput,
    RequestOutput,
    SamplingParams,
    StructuredSpec,
    TokenLogprob,
)
from server.guided import GrammarChecker, structured_spec
from server.logs import current_request_id
from server.metrics import RequestTimer, ServerMetrics
from server.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    FunctionCallDelta,
    PromptLogprob,
    PromptTokensDetails,
    SamplingFields,
    TokenizeChatRequest,
    ToolCall,
    ToolCallDelta,
    UsageInfo,
)
from server.stop_strings import StopMatcher, stop_matcher
from server.tools import ToolPlan, ToolTextFilter, render_messages, tool_plan

OutputHook = Callable[[int, RequestOutput], None]
MAX_PROMPT_LOGPROBS = 20  # as top_logprobs


class EngineClient(Protocol):
    def check_capacity(self, num_sequences: int) -> None: ...
    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        group_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]: ...
    def abort(self, request_id: str, index: int | None = None) -> Any: ...


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on what one request may ask for, checked before work proportional to it is done."""

    max_prompts: int = 2048
    max_stop_strings: int = 64
    max_stop_string_length: int = 256
    max_logit_bias: int = 1024
    max_stop_token_ids: int = 1024
    max_logprob_entries: int = 300_000
    tokenize_inline_chars: int = 4096  # longer texts are tokenized on a worker thread


# ---- text of one choice -----------------------------------------------------------------------------


@dataclass
class TextDelta:
    index: int
    text: str
    logprobs: list[tuple[TokenLogprob | None, int]]  # (logprob, text offset) of tokens released with the text
    finish_reason: str | None
    stop_reason: int | str | None = None  # the stop string or stop_token_ids id that ended the choice
    token_ids: list[int] = field(default_factory=list)  # counted since the last delta (return_token_ids)


class ChoiceText:
    """Turns one choice's token deltas into text deltas.

    Text that could be the start of a stop string is held back until it is known not to be one, so a
    stop string spanning several tokens is cut cleanly while streaming, and the joined stream equals
    the non-streamed text. Stop strings are looked for in the generated text only (not in an echoed
    prompt), at a bounded cost per character (server/stop_strings.py).
    """

    def __init__(
        self,
        index: int,
        tokenizer: Tokenizer,
        stop: StopMatcher | None,
        prefix: str = "",
        include_stop: bool = False,
        echo_only: bool = False,
        min_tokens: int = 0,
        lead: bytes = b"",
        skip_special_tokens: bool = True,
    ) -> None:
        self.index = index
        self._min_tokens = min_tokens  # stop strings count only from this many tokens on, as EOS does
        self._include_stop = include_stop  # vLLM's include_stop_str_in_output: the stop string or token stays
        self._echo_only = (
            echo_only  # echo with max_tokens 0: the prompt is all (the engine's one token dropped)
        )
        # lead: the bytes of the prompt's incomplete last character. The output is decoded after them (as
        # vLLM does), so a character the output completes is its text, whole, and the echoed prompt
        # (`prefix`) leaves out its U+FFFD; one the output does not complete stays the prompt's
        self._decoder = tokenizer.incremental_decoder(skip_special_tokens=skip_special_tokens, lead=lead)
        self._held_echo = ""
        if lead and prefix.endswith("\ufffd"):
            prefix, self._held_echo = prefix[:-1], prefix[-1]
        self._eos = tokenizer.eos_token_id
        self._stop = stop
        self._state = 0  # the stop matcher's state
        self._pending = prefix  # decoded, not yet released
        self._pending_lp: list[tuple[TokenLogprob | None, int]] = []
        self._offset = len(prefix)  # length of all text decoded so far (offsets of logprobs)
        self.text = ""  # all released text
        self.num_tokens = 0
        self.token_ids: list[int] = []  # every token counted, the stop token too (vLLM's token_ids)
        self._released_ids = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # vLLM's: which stop string or stop token id ended it
        self._cut = False  # a stop string ended the text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_prefix_logprobs(self, entries: list[tuple[TokenLogprob | None, int]]) -> None:
        self._pending_lp.extend(entries)

    def add(self, out: CompletionOutput) -> TextDelta | None:
        if self.finished:
            return None  # tokens the engine made after our stop string: not counted, not shown
        if self._echo_only:
            self.finish_reason = "length"
            return self._release()
        last = len(out.new_token_ids) - 1
        for k, token_id in enumerate(out.new_token_ids):
            self.num_tokens += 1
            self.token_ids.append(token_id)
            stopped = k == last and out.finish_reason == "stop" and token_id in (out.stop_token_id, self._eos)
            if stopped and token_id != self._eos:
                self.stop_reason = token_id  # one of stop_token_ids (EOS is no stop reason, as vLLM's)
            if stopped and not self._include_stop:
                continue  # the stop token (EOS or a stop_token_ids one) is counted, not shown: nor its logprob
            if out.logprobs is not None:
                self._pending_lp.append((out.logprobs[k], self._offset))
            piece = self._decoder.push([token_id])
            if piece and self._held_echo:
                if self._decoder.lead_dropped:  # not completed by the output: the prompt's U+FFFD is echoed
                    self._pending += self._held_echo
                    self._offset += len(self._held_echo)
                    if out.logprobs is not None:
                        self._pending_lp[-1] = (out.logprobs[k], self._offset)
                self._held_echo = ""
            self._offset += len(piece)
            if self._append(piece):
                return self._release()
        if out.finish_reason is not None:
            # what the decoder still holds is a character whose bytes did not all come (cut by max_tokens):
            # dropped, as vLLM and llama.cpp do, rather than shown as U+FFFD
            self._decoder.flush()
            self._pending += self._held_echo
            self.finish_reason = out.finish_reason
        return self._release()

    def _append(self, piece: str) -> bool:
        """Add decoded text; True when it completes a stop string (the text is cut where it begins)."""
        if self._stop is None or not piece:
            self._pending += piece
            return False
        self._state, hit = self._stop.feed(self._state, piece)
        start = 0
        while hit is not None and self.num_tokens < self._min_tokens:  # too early to stop (vLLM's min_tokens)
            start += hit[0]
            self._state, hit = self._stop.feed(self._state, piece[start:])
            hit = None if hit is None else (start + hit[0], hit[1])
        if hit is None:
            self._pending += piece
            return False
        end, length = hit
        keep = len(self._pending) + end - (0 if self._include_stop else length)
        through = self._pending + piece[:end]
        self.stop_reason = through[len(through) - length :]
        self._pending = through[:keep]
        self.finish_reason = "stop"
        self._cut = True
        return True

    def _release(self) -> TextDelta | None:
        keep = 0 if self.finished or self._stop is None else self._stop.held(self._state)
        cut = len(self._pending) - keep
        text, self._pending = self._pending[:cut], self._pending[cut:]
        end = len(self.text) + len(text)
        # a token's logprob goes with its text: held while its text is (it may begin a stop string), and
        # dropped with it when a stop string cuts it off; otherwise all go out at the end
        if self.finished and not self._cut:
            logprobs, self._pending_lp = self._pending_lp, []
        else:
            n = next(
                (k for k, (_, offset) in enumerate(self._pending_lp) if offset >= end), len(self._pending_lp)
            )
            logprobs, self._pending_lp = self._pending_lp[:n], [] if self.finished else self._pending_lp[n:]
        if not text and not logprobs and not self.finished:
            return None
        self.text += text
        ids, self._released_ids = self.token_ids[self._released_ids :], len(self.token_ids)
        return TextDelta(self.index, text, logprobs, self.finish_reason, self.stop_reason, ids)


# ---- engine plumbing ------------------------------------------------------------------------------


async def merge_streams(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams as outputs arrive; closing this closes (aborts) them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]):  # type: ignore[type-var]
            async for out in streams[0]:
                yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream):  # type: ignore[type-var]
                async for out in stream:
                    await queue.put((i, out))
            await queue.put((i, None))
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class PromptInput:
    token_ids: list[int]
    text: str | None = None  # known when the client sent text


@dataclass
class _Run:
    """One HTTP request's engine requests and the state of every choice."""

    client_id: str  # the X-Request-Id (or a fresh id): the response's id is f"{prefix}-{client_id}"
    request_id: str
    prompts: list[PromptInput]
    n: int
    choices: list[ChoiceText] = field(default_factory=list)
    timers: list[RequestTimer] = field(default_factory=list)
    engine_ids: list[str] = field(default_factory=list)  # the engine request of each prompt
    tools: ToolPlan = field(default_factory=lambda: ToolPlan("none"))  # chat: what tool calls mean
    # the choices' num_tokens summed as `step` adds them: usage may be asked for every chunk
    # (continuous_usage_stats), and a sum over thousands of prompts and choices each time would not do
    completion_tokens: int = 0
    cached_tokens: dict[int, int] = field(default_factory=dict)  # by prompt: its tokens the prefix cache held
    prompt_logprobs: dict[int, list[TokenLogprob | None]] = field(default_factory=dict)  # by prompt, as sent

    def usage(self) -> UsageInfo:
        prompt = self.prompt_tokens
        completion = self.completion_tokens
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())),
        )

    @functools.cached_property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    def prompt_done(self, p: int) -> bool:
        return all(c.finished for c in self.choices[p * self.n : (p + 1) * self.n])


class OpenAIServing:
    """What completions and chat share: model check, prompt checks, sampling params, engine calls."""

    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Tokenizer,
        model_name: str,
        max_model_len: int,
        metrics: ServerMetrics | None,
        limits: RequestLimits | None = None,
        grammars: GrammarChecker | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.limits = limits or RequestLimits()
        self.grammars = grammars or GrammarChecker(tokenizer)  # one per server: completions and chat share it
        # a pass over the vocabulary, made at start rather than in the first request
        self.chars_per_token = tokenizer.max_chars_per_token

    # ---- bounds checked before the work they bound ----------------------------------------------
    def check_text_length(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing, text that holds more tokens than the context allows whatever the
        tokenization (each token covers at most `max_chars_per_token` characters)."""
        per_token = self.tokenizer.max_chars_per_token
        if per_token is not None and -(-chars // per_token) >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                           f"{param} has {chars} characters, which is more than that many tokens.",
                           param=param)  # fmt: skip

    async def encode(
        self, texts: list[str], param: str = "prompt", add_special_tokens: bool = False, bounded: bool = True
    ) -> list[list[int]]:
        """Token ids of each text; long inputs are tokenized on a worker thread, not the event loop.
        bounded: a text longer than the context is refused (a prompt), else counted in full (/tokenize,
        whose work the body limit bounds)."""
        if bounded:
            for text in texts:
                self.check_text_length(len(text), param)

        def encode_all() -> list[list[int]]:
            if not bounded:
                return [self.tokenizer.encode(t, add_special_tokens) for t in texts]
            return [self._encode_bounded(t, add_special_tokens, param) for t in texts]

        if sum(len(t) for t in texts) <= self.limits.tokenize_inline_chars:
            return encode_all()
        return await asyncio.to_thread(encode_all)

    def _encode_bounded(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of `text`, refusing a long text whose beginning alone holds more tokens than the
        context, without tokenizing the rest. The beginning is cut before whitespace (a space, or the
        newlines of a rendered chat template), where the pre-tokenizer splits the whole text the same way,
        so it has at most one token more than the same span of it."""
        probe = self.max_model_len * _PROBE_CHARS_PER_TOKEN
        if len(text) > probe:
            cut = max(text.rfind(space, 0, probe) for space in " \n\t")
            if (
                cut > 0
                and len(self.tokenizer.encode(text[:cut], add_special_tokens)) - 1 >= self.max_model_len
            ):
                raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                               f"first {cut} characters of the {param} alone are more tokens than that.",
                               param=param)  # fmt: skip
        return self.tokenizer.encode(text, add_special_tokens)

    def check_sizes(self, req: SamplingFields, num_prompts: int) -> None:
        """Bounds on the request's lists, and room in the queue for all its sequences (429 at once)."""
        lim = self.limits
        stops = self.stop_strings(req.stop)
        checks = [
            (len(stops) <= lim.max_stop_strings, "stop", f"at most {lim.max_stop_strings} stop strings are "
             f"allowed, got {len(stops)}"),
            (all(len(s) <= lim.max_stop_string_length for s in stops), "stop",
             f"each stop string may have at most {lim.max_stop_string_length} characters"),
            (len(req.logit_bias or ()) <= lim.max_logit_bias, "logit_bias",
             f"at most {lim.max_logit_bias} logit_bias entries are allowed, got {len(req.logit_bias or ())}"),
            (len(req.stop_token_ids or ()) <= lim.max_stop_token_ids, "stop_token_ids",
             f"at most {lim.max_stop_token_ids} stop_token_ids are allowed, got {len(req.stop_token_ids or ())}"),
        ]  # fmt: skip
        for ok, param, message in checks:
            if not ok:
                raise APIError(400, message[0].upper() + message[1:] + ".", param=param)
        self.reserve(req.n * num_prompts, "n" if req.n > 1 else "prompt")

    def reserve(self, num_sequences: int, param: str = "n") -> None:
        try:
            self.engine.check_capacity(num_sequences)
        except QueueFullError as e:
            raise APIError(429, f"The server is at capacity: {e}. Retry later.", "rate_limit_error") from e
        except EngineDeadError as e:
            raise APIError(503, f"The engine is not running: {e}", "service_unavailable") from e
        except ValueError as e:
            raise APIError(400, f"{str(e)[0].upper()}{str(e)[1:]}.", param=param) from e

    def check_logprob_budget(self, n: int, tokens: int, top: int | None, param: str) -> None:
        """Log-probability entries are built, held and serialized per token: bound their total."""
        if top is None:
            return
        entries = n * tokens * (top + 1)
        limit = self.limits.max_logprob_entries
        if entries > limit:
            raise APIError(400, f"The request could produce {entries} log-probability entries (choices x "
                           f"tokens x (top logprobs + 1)); the limit is {limit}. Lower n, max_tokens or "
                           f"{param}.", param=param)  # fmt: skip

    def prompt_logprobs_asked(self, req: SamplingFields, prompts: list[PromptInput]) -> int | None:
        """vLLM's prompt_logprobs (top-N of each prompt position, 0 to 20), checked against the budget of
        log-probability entries; not with a stream, as vLLM's."""
        top = req.prompt_logprobs
        if top is None:
            return None
        if not 0 <= top <= MAX_PROMPT_LOGPROBS:
            raise APIError(400, f"prompt_logprobs must be in [0, {MAX_PROMPT_LOGPROBS}], got {top}.",
                           param="prompt_logprobs")  # fmt: skip
        if req.stream:
            raise APIError(400, "prompt_logprobs is not available with stream.", param="prompt_logprobs")
        self.check_logprob_budget(1, sum(len(p.token_ids) for p in prompts), top, "prompt_logprobs")
        return top

    @staticmethod
    def keep_prompt_logprobs(run: _Run, p: int, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            run.prompt_logprobs[p] = out.prompt_logprobs

    def prompt_logprob_list(self, run: _Run, p: int, top: int) -> list[dict[str, PromptLogprob] | None]:
        """vLLM's shape: per prompt position after the first, the prompt's token then the top-N, by id."""
        out: list[dict[str, PromptLogprob] | None] = [None]
        decode = self.tokenizer.decode
        entries = run.prompt_logprobs.get(p) or []
        for tid, entry in zip(run.prompts[p].token_ids[1:], entries[1:], strict=False):
            if entry is None:
                out.append(None)
                continue
            at = {
                str(tid): PromptLogprob(
                    logprob=_finite(entry.logprob), rank=entry.rank, decoded_token=decode([tid])
                )
            }
            for rank, (t, value) in enumerate(entry.top[:top], 1):
                at.setdefault(
                    str(t), PromptLogprob(logprob=_finite(value), rank=rank, decoded_token=decode([t]))
                )
            out.append(at)
        return out

    @staticmethod
    def check_refused(req: Any) -> None:
        """A field the SDK can send that this server cannot honour is a 400 naming it, never ignored."""
        refused = req.refused_field()
        if refused is not None:
            raise APIError(400, f"{refused[0]}: {refused[1]}", param=refused[0])

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           "invalid_request_error", "model")  # fmt: skip

    def check_prompt(self, ids: list[int], room: int = 1) -> None:
        """room: the tokens the request must be able to add (0 for a prompt only scored)."""
        if not ids:
            raise APIError(400, "The prompt is empty; send at least one token.", param="prompt")
        if len(ids) > self.max_model_len - room:
            why = ", which leaves no room for output" if room and len(ids) <= self.max_model_len else ""
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the prompt "
                           f"has {len(ids)} tokens{why}.", param="prompt")  # fmt: skip
        try:
            self.tokenizer.check_ids(ids)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e

    def truncation(self, req: SamplingFields, room: int = 1) -> int | None:
        """vLLM's truncate_prompt_tokens: how many of the prompt's last tokens to keep (-1: as many as the
        context holds with `room` to spare); None: the prompt is taken whole or refused."""
        k = req.truncate_prompt_tokens
        if k is None:
            return None
        if k == 0:
            raise APIError(400, "truncate_prompt_tokens must be at least 1 (or -1, the context's length).",
                           param="truncate_prompt_tokens")  # fmt: skip
        return self.max_model_len - room if k == -1 else k

    def sampling_params(
        self, req: SamplingFields, max_tokens: int | None, logprobs: int | None, prompt_len: int,
        names: dict[str, str] | None = None, scoring: bool = False,
    ) -> SamplingParams:  # fmt: skip
        """names: the request's own name of a field where it differs (chat's max_completion_tokens and
        top_logprobs), so that an error names what the client sent. scoring: the one token max_tokens asks
        for is dropped, so it needs no room (the engine stops a sequence at the context's end)."""
        names = names or {}
        room = self.max_model_len - prompt_len
        if max_tokens is not None and max_tokens > room and not scoring:
            name = names.get("max_tokens", "max_tokens")
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. The prompt has "
                           f"{prompt_len} tokens and {name} is {max_tokens}: {prompt_len} + {max_tokens} = "
                           f"{prompt_len + max_tokens} > {self.max_model_len}. Lower {name} or the prompt.",
                           param=name)  # fmt: skip
        if req.top_k is not None and req.top_k < -1:
            raise APIError(
                400, f"top_k must be -1 or 0 (off), or at least 1; got {req.top_k}.", param="top_k"
            )
        params = SamplingParams(
            n=req.n,
            max_tokens=room if max_tokens is None else max_tokens,
            min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=clamp_top_k(req.top_k, self.tokenizer.vocab_size),
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=self._logit_bias(req.logit_bias),
            seed=req.seed,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
        )
        try:
            params.validate(self.tokenizer.vocab_size)
        except ValueError as e:
            field, _, rest = str(e).partition(" ")
            name = names.get(field, field)
            raise APIError(400, f"{name} {rest}", param=name) from e
        if self.tokenizer.extra_eos_token_ids and not req.ignore_eos:
            # the model's other end-of-text ids (generation_config.json's eos_token_id list) stop it too,
            # as in transformers and vLLM, which add them to the request's stop_token_ids
            params.stop_token_ids = list(
                dict.fromkeys([*params.stop_token_ids, *self.tokenizer.extra_eos_token_ids])
            )
        return params

    @staticmethod
    def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        # ASCII digits only: int() would also take "+5", " 42 ", "1_000" and other scripts' digits
        bad = next((k for k in bias if not (k.isascii() and k.isdigit() and len(k) <= 18)), None)
        if bad is not None:
            raise APIError(400, f"logit_bias keys must be token ids (digits as a string), got {bad[:40]!r}.",
                           param="logit_bias")  # fmt: skip
        return {int(k): v for k, v in bias.items()}

    async def structured(self, req: SamplingFields) -> StructuredSpec | None:
        """The request's output constraint, compiled once here (GrammarChecker) so that a bad schema,
        regex or grammar is a 400 naming its field before anything is queued."""
        found = structured_spec(req)
        if found is None:
            return None
        return await self.compiled(*found)

    async def compiled(self, spec: StructuredSpec, field: str) -> StructuredSpec:
        """`spec` once it compiled; a 400 naming `field` if it does not."""
        await self.grammars.check(spec, field)
        return spec

    @staticmethod
    def stop_strings(stop: str | list[str] | None) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    def stop_matcher(self, stop: str | list[str] | None) -> StopMatcher | None:
        return stop_matcher(tuple(self.stop_strings(stop)))

    def _submit(
        self, request_id: str, prompt: PromptInput, params: SamplingParams, group_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Queue one engine request. The engine refuses at once (full queue, dead), before any response byte."""
        try:
            return self.engine.generate(request_id, prompt.token_ids, params, group_id)
        except QueueFullError as e:
            raise APIError(429, f"The server is at capacity: {e}. Retry later.", "rate_limit_error") from e
        except EngineDeadError as e:
            raise APIError(503, f"The engine is not running: {e}", "service_unavailable") from e
        except ValueError as e:
            if "already running" in str(e):  # the client's X-Request-Id names a request still running
                client_id = request_id.rsplit("#", 1)[0]
                raise APIError(400, f"A request with X-Request-Id {client_id!r} is still running; send "
                               "a new X-Request-Id.") from e  # fmt: skip
            # the engine's checks name the field first ("logit_bias names token ..."); the rest are the prompt's
            field = str(e).split(" ", 1)[0]
            raise APIError(
                400, str(e), param=field if field in SamplingFields.model_fields else "prompt"
            ) from e

    async def start(
        self, run: _Run, params: list[SamplingParams]
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """One engine request per prompt (params[i] for prompt i), merged into one stream."""
        # Engine ids come from the client's id, whatever the endpoint, with a "#" no X-Request-Id can hold:
        # two requests running under one client id collide (400), two different ones never do
        run.engine_ids = [f"{run.client_id}#p{i}" for i in range(len(run.prompts))]
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for rid, prompt, sp in zip(run.engine_ids, run.prompts, params, strict=True):
                streams.append(self._submit(rid, prompt, sp, run.client_id))
        except BaseException:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
            raise
        run.timers = [RequestTimer(self.metrics, len(p.token_ids), run.n) for p in run.prompts]
        admitted()
        return merge_streams(streams)

    def step(self, run: _Run, p: int, out: RequestOutput) -> list[TextDelta]:
        """Feed one engine output of prompt `p` to its choices; returns the text deltas it produced."""
        if out.error is not None:
            if out.error_status == 503:
                raise APIError(503, f"The request was ended: {out.error}.", "service_unavailable")
            raise APIError(500, f"The engine failed on this request: {out.error}", "internal_error")
        deltas = []
        timer = run.timers[p]
        if out.queue_time is not None:
            timer.queued(out.queue_time)
        if out.num_cached_tokens:
            run.cached_tokens[p] = out.num_cached_tokens
        for o in out.outputs:
            choice = run.choices[p * run.n + o.index]
            before = choice.num_tokens
            was_finished = choice.finished
            delta = choice.add(o)
            timer.tokens(o.index, choice.num_tokens - before)
            run.completion_tokens += choice.num_tokens - before
            if choice.finished and not was_finished:
                timer.finished(choice.finish_reason or "stop")
                if o.finish_reason is None:  # a stop string ended it here: the engine would go on
                    self.engine.abort(run.engine_ids[p], o.index)
            if delta is not None:
                deltas.append(delta)
        return deltas

    async def deltas(
        self, run: _Run, stream: AsyncIterator[tuple[int, RequestOutput]], on_output: OutputHook | None = None
    ) -> AsyncGenerator[TextDelta, None]:
        """Text deltas of all choices until each has finished. Leaving early (stop strings, errors, a
        client that went away) closes `stream`, which aborts the engine requests; unfinished choices
        are counted as aborted."""
        try:
            async with aclosing(stream):  # type: ignore[type-var]
                async for p, out in stream:
                    if on_output is not None:
                        on_output(p, out)
                    for delta in self.step(run, p, out):
                        yield delta
                    if all(c.finished for c in run.choices):
                        break
        finally:
            for c in run.choices:
                if not c.finished and run.timers:
                    run.timers[c.index // run.n].finished("abort")


_INLINE_MESSAGES = 64  # longer conversations render on a worker thread, however short each message
_PROBE_CHARS_PER_TOKEN = 8  # twice what prose averages: a text that fits is rarely probed for nothing


def _marker() -> str:
    """A string no client can spell (a private-use character and a fresh id), to find where the chat
    template puts a text it is given."""
    return f"\ue000{uuid.uuid4().hex}"


def _every(_: str) -> bool:
    return True


def _spells(value: Any, spelled: Callable[[str], bool]) -> bool:
    """Whether a string in `value` (JSON-like: lists, dicts and their keys) is one `spelled` picks."""
    todo = [value]
    while todo:  # not recursive: a client's tool schema may nest as deep as its JSON parses
        v = todo.pop()
        if isinstance(v, str):
            if spelled(v):
                return True
        elif isinstance(v, dict):
            todo += v.keys()
            todo += v.values()
        elif isinstance(v, list | tuple):
            todo += v
    return False


def _marked(value: Any, marker: str, texts: list[str], which: Callable[[str], bool]) -> Any:
    """`value` (JSON-like) with each string `which` picks, dict keys too, replaced by the marker and
    the string's index in `texts`, where it is appended."""
    if isinstance(value, str):
        if not which(value):
            return value
        texts.append(value)
        return f"{marker}{len(texts) - 1}\ue001"
    if isinstance(value, dict):
        return {_marked(k, marker, texts, which): _marked(v, marker, texts, which) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_marked(v, marker, texts, which) for v in value]
    return value


def _continuous_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    options = req.stream_options
    return options is not None and options.include_usage and options.continuous_usage_stats


def _client_id() -> str:
    """The X-Request-Id inside an HTTP request (so a response is found in the logs by its id), else fresh."""
    return current_request_id() or uuid.uuid4().hex


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number, so clamp an impossible token's log-probability.
    return max(x, -9999.0)


# ---- /v1/completions ---------------------------------------------------------------------------------


class ServingCompletion(OpenAIServing):
    @staticmethod
    def prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(x, int) for x in prompt):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    async def prompts(
        self,
        items: list[str | list[int]],
        room: int = 1,
        keep: int | None = None,
        add_special_tokens: bool = True,
    ) -> list[PromptInput]:
        """keep: only the last `keep` tokens of each prompt are run (text then echoes those tokens only);
        a longer text is then tokenized whole, its work bounded by the body's size limit."""
        if not items:
            raise APIError(400, "The prompt is empty; send at least one token.", param="prompt")
        texts = [item for item in items if isinstance(item, str)]
        encoded = iter(await self.encode(texts, add_special_tokens=add_special_tokens, bounded=keep is None))
        out = [
            PromptInput(next(encoded), item) if isinstance(item, str) else PromptInput(list(item))
            for item in items
        ]
        if keep is not None:
            out = [p if len(p.token_ids) <= keep else PromptInput(p.token_ids[-keep:]) for p in out]
        for p in out:
            self.check_prompt(p.token_ids, room)
        return out

    async def prepare(self, req: CompletionRequest) -> tuple[_Run, AsyncIterator[tuple[int, RequestOutput]]]:
        self.check_model(req.model)
        self.check_refused(req)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
        items = self.prompt_items(req.prompt)
        if len(items) > self.limits.max_prompts:
            raise APIError(400, f"At most {self.limits.max_prompts} prompts are allowed in one request, got "
                           f"{len(items)}.", param="prompt")  # fmt: skip
        self.check_sizes(req, len(items))
        # OpenAI's (and vLLM's) echo with max_tokens 0 scores a prompt: its text and logprobs, nothing
        # generated; the engine makes one token, which is dropped, so the prompt may fill the context
        echo_only = req.echo and req.max_tokens == 0
        room = 0 if echo_only else 1
        prompts = await self.prompts(items, room, self.truncation(req, room), req.add_special_tokens)
        params = [
            self.sampling_params(
                req, 1 if echo_only else req.max_tokens, req.logprobs, len(p.token_ids), scoring=echo_only
            )  # fmt: skip
            for p in prompts
        ]
        echoed = sum(len(p.token_ids) for p in prompts) if req.echo else 0
        produced = sum(sp.max_tokens or 0 for sp in params)
        self.check_logprob_budget(req.n, produced + echoed, req.logprobs, "logprobs")
        asked = self.prompt_logprobs_asked(
            req, prompts
        )  # before the grammar's compile: refusals cost nothing
        spec = await self.structured(req)
        for sp in params:
            sp.structured = spec
        echoed_top = req.logprobs if req.echo else None
        if echoed_top is not None or asked is not None:
            for sp in params:
                sp.prompt_logprobs = max(echoed_top or 0, asked or 0)
        client_id = _client_id()
        run = _Run(client_id, f"cmpl-{client_id}", prompts, req.n)
        stop = self.stop_matcher(req.stop)
        for p in prompts:
            echo = (p.text if p.text is not None else self.tokenizer.decode(p.token_ids)) if req.echo else ""
            # a prompt of ids may end inside a character, which the output's first bytes may complete
            lead = b"" if echo_only else self.tokenizer.incomplete_tail(p.token_ids)
            base = len(run.choices)
            include = req.include_stop_str_in_output
            run.choices += [
                ChoiceText(
                    base + i,
                    self.tokenizer,
                    stop,
                    echo,
                    include,
                    echo_only,
                    req.min_tokens,
                    lead,
                    req.skip_special_tokens,
                )  # fmt: skip
                for i in range(req.n)
            ]
        return run, await self.start(run, params)

    def _prompt_hook(self, req: CompletionRequest, run: _Run) -> OutputHook | None:
        want_echo = req.echo and req.logprobs is not None
        if not want_echo and req.prompt_logprobs is None:
            return None

        def hook(p: int, out: RequestOutput) -> None:
            if want_echo:
                self._echo_logprobs(run, p, out, req.logprobs or 0)
            self.keep_prompt_logprobs(run, p, out)

        return hook

    def _echo_logprobs(self, run: _Run, p: int, out: RequestOutput, top: int) -> None:
        """With echo + logprobs, the prompt's tokens lead the logprobs (the first has none)."""
        if out.prompt_logprobs is None:
            return
        decoder = self.tokenizer.incremental_decoder()  # special tokens too: the echoed prompt shows them
        offset, entries = 0, list[tuple[TokenLogprob | None, int]]()
        for tid, lp in zip(run.prompts[p].token_ids, out.prompt_logprobs, strict=False):
            if lp is not None and len(lp.top) > top:  # computed for a larger prompt_logprobs
                lp = TokenLogprob(lp.token_id, lp.logprob, lp.rank, lp.top[:top])
            entries.append((lp if lp is not None else TokenLogprob(tid, float("nan"), 0, []), offset))
            offset += len(decoder.push([tid]))
        for c in run.choices[p * run.n : (p + 1) * run.n]:
            c.add_prefix_logprobs(entries)

    def _token(self, token_id: int, as_id: bool = False) -> str:
        """A token as the legacy logprobs name it: its text, or "bytes:\\xNN..." (OpenAI's form) where its
        bytes are part of a character, whose text (U+FFFD) would not tell such tokens apart; "token_id:N"
        with vLLM's return_tokens_as_token_ids."""
        if as_id:
            return f"token_id:{token_id}"
        text = self.tokenizer.decode([token_id])
        if "\ufffd" not in text:
            return text
        raw = self.tokenizer.token_bytes(token_id)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text

    def _logprobs(
        self, entries: list[tuple[TokenLogprob | None, int]], as_ids: bool = False
    ) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for entry, offset in entries:
            assert entry is not None
            first_prompt_token = entry.logprob != entry.logprob  # NaN marks "no logprob" (first prompt token)
            token = self._token(entry.token_id, as_ids)
            lp.tokens.append(token)
            lp.text_offset.append(offset)
            lp.token_logprobs.append(None if first_prompt_token else _finite(entry.logprob))
            if first_prompt_token:
                lp.top_logprobs.append(None)
                continue
            top = {self._token(t, as_ids): _finite(v) for t, v in entry.top}
            # the chosen token is always listed, even outside the top N (up to N + 1 entries), as OpenAI's
            top.setdefault(token, _finite(entry.logprob))
            lp.top_logprobs.append(top)
        return lp

    def _choice(self, delta: TextDelta, want_logprobs: bool, as_ids: bool) -> CompletionChoice:
        logprobs = self._logprobs(delta.logprobs, as_ids) if want_logprobs else None
        return CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs,
                                finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)  # fmt: skip

    async def create(self, req: CompletionRequest) -> CompletionResponse:
        run, stream = await self.prepare(req)
        want = req.logprobs is not None
        logprobs: dict[int, list[tuple[TokenLogprob | None, int]]] = {i: [] for i in range(len(run.choices))}
        async for d in self.deltas(run, stream, self._prompt_hook(req, run)):
            logprobs[d.index] += d.logprobs
        choices = [
            CompletionChoice(
                index=c.index,
                text=c.text,
                logprobs=self._logprobs(logprobs[c.index], req.return_tokens_as_token_ids) if want else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                prompt_token_ids=run.prompts[c.index // run.n].token_ids if req.return_token_ids else None,
                token_ids=c.token_ids if req.return_token_ids else None,
                prompt_logprobs=None
                if req.prompt_logprobs is None
                else self.prompt_logprob_list(run, c.index // run.n, req.prompt_logprobs),
            )
            for c in run.choices
        ]
        return CompletionResponse(
            id=run.request_id, model=self.model_name, choices=choices, usage=run.usage()
        )

    async def stream(self, req: CompletionRequest) -> AsyncIterator[CompletionResponse]:
        """Chunks of the streamed response; ``prepare`` has already run, so errors here are mid-stream."""
        run, stream = await self.prepare(req)
        return self._stream(req, run, stream)

    async def _stream(
        self, req: CompletionRequest, run: _Run, stream: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[CompletionResponse]:
        want = req.logprobs is not None
        created = int(time.time())
        hook = self._prompt_hook(req, run)
        continuous = _continuous_usage(req)
        unnamed = set(range(len(run.choices))) if req.return_token_ids else set()  # no prompt ids sent yet
        async with aclosing(self.deltas(run, stream, hook)) as deltas:  # closed at once if the client leaves
            async for d in deltas:
                choice = self._choice(d, want, req.return_tokens_as_token_ids)
                if req.return_token_ids:
                    choice.token_ids = d.token_ids
                    if d.index in unnamed:
                        unnamed.discard(d.index)
                        choice.prompt_token_ids = run.prompts[d.index // run.n].token_ids
                usage = run.usage() if continuous else None
                yield CompletionResponse(
                    id=run.request_id, created=created, model=self.model_name, choices=[choice], usage=usage
                )
        if req.stream_options and req.stream_options.include_usage:
            yield CompletionResponse(
                id=run.request_id, created=created, model=self.model_name, choices=[], usage=run.usage()
            )


# ---- /v1/chat/completions ----------------------------------------------------------------------------


class ServingChat(OpenAIServing):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_per_turn = self._fewest_tokens_per_turn()

    async def prompt_ids(
        self, messages: list[ChatMessage], add_generation_prompt: bool = True, tools: ToolPlan | None = None,
        bounded: bool = True, continue_final: bool = False,
    ) -> list[int]:  # fmt: skip
        """The rendered chat template's token ids; long conversations render and tokenize on a worker
        thread. bounded: as for encode(). continue_final: the last message is left open for the model to
        go on with (vLLM's continue_final_message), instead of closed and followed by a new turn."""
        turns = sum(1 for m in messages if m.role in ("user", "assistant"))
        if bounded and turns * self.tokens_per_turn > self.max_model_len:  # refused before rendering them
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; "
                           f"{turns} user and assistant messages take at least {self.tokens_per_turn} "
                           "each in its chat template.", param="messages")  # fmt: skip
        tools = tools or ToolPlan("none")
        native = "tools" in (self.tokenizer.chat_template or "")  # the template renders tools itself
        plain = render_messages(messages, tools, native)
        listed = [t.model_dump(exclude_none=True) for t in tools.tools] if native and tools.tools else None
        chars = sum(len(str(m.get("content") or "")) for m in plain)
        if bounded:
            self.check_text_length(chars, "messages")
        if _spells([plain, listed], self.tokenizer.has_special_text):
            return await asyncio.to_thread(
                self._guarded_ids, plain, add_generation_prompt, listed, continue_final
            )
        render = functools.partial(self._render, plain, add_generation_prompt, listed, continue_final)
        if chars <= self.limits.tokenize_inline_chars and len(plain) <= _INLINE_MESSAGES:
            return self.tokenizer.encode(render())
        text = await asyncio.to_thread(render)
        return (await self.encode([text], "messages", bounded=bounded))[0]

    def _guarded_ids(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[dict[str, Any]] | None,
        continue_final: bool,
    ) -> list[int]:  # fmt: skip
        """Token ids of a conversation whose message text spells a special token (`<|im_end|>` in a user
        message): each such spelling is tokenized as plain text, so a message cannot end its turn and open
        another (a system one) by writing the tokens that do; everything else is tokenized as it always is
        (the rendered text is split at those spellings only, as a real special token splits it).
        The template is rendered twice, with each message's text and with a marker in its place, to find
        where the texts are; a template that changes a text it is given (trims it, escapes it) cannot be
        split so, and such a conversation is refused."""
        tok = self.tokenizer
        marker = _marker()
        texts: list[str] = []  # what each marker stands for
        marked = [
            {
                k: _marked(v, marker, texts, _every if k == "content" else tok.has_special_text)
                for k, v in m.items()
            }
            for m in messages
        ]
        try:
            listed = _marked(tools, marker, texts, tok.has_special_text)
        except RecursionError as e:
            raise APIError(400, "The tools are nested too deeply.", param="tools") from e
        text = self._render(messages, add_generation_prompt, tools, continue_final)
        layout = self._render(marked, add_generation_prompt, listed, continue_final)
        pieces = re.split(f"{marker}(\\d+)\ue001", layout)  # template text, text's index, template text, ...
        indices = [int(i) for i in pieces[1::2]]
        contents = [texts[i] for i in indices]
        rebuilt = "".join(p for pair in zip(pieces[::2], [*contents, ""], strict=True) for p in pair)
        if rebuilt != text or len(set(indices)) != len(indices):
            raise APIError(400, "A message spells one of the model's control tokens (such as "
                           f"{tok.special_texts()[-1]!r}), and this chat template cannot keep it "
                           "as plain text.", param="messages")  # fmt: skip
        spelled: list[tuple[int, int]] = []  # where the messages' texts spell control tokens, in `text`
        at = 0
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                at += len(piece)
                continue
            content = contents[k // 2]
            spelled += [(at + m.start(), at + m.end()) for m in tok.special_pattern().finditer(content)]
            at += len(content)
        ids: list[int] = []
        last = 0
        for start, end in spelled:
            ids += tok.encode(text[last:start]) + tok.encode_plain(text[start:end])
            last = end
        ids += tok.encode(text[last:])
        specials = tok.special_ids()
        if sum(i in specials for i in ids) == sum(i in specials for i in tok.encode(layout)):
            return ids
        # a message's text and the template's around it spell a control token together: texts apart
        ids = []
        for k, piece in enumerate(pieces):
            ids += tok.encode(piece) if k % 2 == 0 else tok.encode_plain(contents[k // 2])
        return ids

    def _fewest_tokens_per_turn(self) -> int:
        """The fewest tokens the chat template adds for a user or an assistant message (empty ones, each
        measured as the third message of a conversation); 1 where the template cannot render those."""

        def count(roles: list[str]) -> int:
            return len(
                self.tokenizer.encode(self._render([{"role": r, "content": ""} for r in roles], False, None))
            )

        try:
            two = count(["user", "assistant"])
            fewest = min(
                count(["user", "assistant", "user"]) - two,
                count(["assistant", "user", "assistant"]) - count(["assistant", "user"]),
            )
        except APIError:
            return 1
        return max(1, fewest)

    def _render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[dict[str, Any]] | None,
        continue_final: bool = False,
    ) -> str:  # fmt: skip
        """The chat template's text. continue_final: it stops right after the last message's text, which
        the template is given as a marker to find where that is (its own end-of-turn text that follows
        could hold the same characters), and the text goes in the marker's place as sent."""
        final = str(messages[-1].get("content") or "") if continue_final else ""
        marker = f"{_marker()}\ue001"
        if continue_final:
            if not final:
                raise APIError(400, "continue_final_message needs a last message with text to continue.",
                               param="continue_final_message")  # fmt: skip
            messages = [*messages[:-1], {**messages[-1], "content": marker}]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt and not continue_final, tools=tools
            )
        except ValueError as e:
            raise APIError(
                400, f"The messages could not be rendered with the chat template: {e}", param="messages"
            ) from e
        if not continue_final:
            return text
        if text.count(marker) != 1:
            raise APIError(400, "continue_final_message: this chat template does not show the last message's "
                           "text once, so it cannot be continued.", param="continue_final_message")  # fmt: skip
        return text[: text.index(marker)] + final

    @staticmethod
    def continue_final(req: ChatCompletionRequest | TokenizeChatRequest) -> bool:
        """continue_final_message, refused beside an add_generation_prompt the client set true (vLLM's)."""
        if (
            req.continue_final_message
            and req.add_generation_prompt
            and "add_generation_prompt" in req.model_fields_set
        ):
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true: the last "
                           "message is either continued or followed by a new turn.", param="continue_final_message")  # fmt: skip
        return req.continue_final_message

    async def prompt(self, req: ChatCompletionRequest, tools: ToolPlan) -> PromptInput:
        keep = self.truncation(req)
        ids = await self.prompt_ids(
            req.messages, req.add_generation_prompt, tools, bounded=keep is None,
            continue_final=self.continue_final(req),
        )  # fmt: skip
        prompt = PromptInput(ids if keep is None else ids[-keep:])
        self.check_prompt(prompt.token_ids)
        return prompt

    async def prepare(
        self, req: ChatCompletionRequest
    ) -> tuple[_Run, AsyncIterator[tuple[int, RequestOutput]]]:
        self.check_model(req.model)
        self.check_refused(req)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
        if req.top_logprobs and not req.logprobs:  # 0 asks for nothing: clients that always send it pass
            raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
        self.check_sizes(req, 1)
        tools = tool_plan(req)
        if req.continue_final_message and (tools.spec is not None or structured_spec(req) is not None):
            raise APIError(400, "continue_final_message cannot be combined with an output constraint (response_format, "
                           "structured_outputs, tool_choice required or named): the constraint would hold for the "
                           "continuation alone, not the message it continues.", param="continue_final_message")  # fmt: skip
        prompt = await self.prompt(req, tools)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        names = {"logprobs": "top_logprobs"}
        max_tokens = req.max_tokens
        if req.max_completion_tokens is not None:
            max_tokens, names["max_tokens"] = req.max_completion_tokens, "max_completion_tokens"
        params = self.sampling_params(req, max_tokens, logprobs, len(prompt.token_ids), names)
        self.check_logprob_budget(req.n, params.max_tokens or 0, logprobs, "top_logprobs")
        params.prompt_logprobs = self.prompt_logprobs_asked(req, [prompt])
        if tools.spec is None:
            params.structured = await self.structured(req)
        else:
            # The output is the call, held to its schema; a response_format shapes text, which a forced
            # call does not write (OpenAI accepts the two together, and clients such as instructor send both)
            params.structured = await self.compiled(tools.spec, "tools")
            # The output is the call, held to its schema until it is whole: a stop string or stop token
            # would cut its arguments off mid-JSON and return that as a finished call. They apply to text.
            params.stop_token_ids = [
                t for t in params.stop_token_ids if t in self.tokenizer.extra_eos_token_ids
            ]
        client_id = _client_id()
        run = _Run(client_id, f"chatcmpl-{client_id}", [prompt], req.n, tools=tools)
        stop = None if tools.spec is not None else self.stop_matcher(req.stop)
        include = req.include_stop_str_in_output
        run.choices = [
            ChoiceText(
                i,
                self.tokenizer,
                stop,
                include_stop=include,
                min_tokens=req.min_tokens,
                skip_special_tokens=req.skip_special_tokens,
            )  # fmt: skip
            for i in range(req.n)
        ]
        return run, await self.start(run, [params])

    def _logprobs(self, entries: list[tuple[TokenLogprob | None, int]], as_ids: bool = False) -> ChatLogprobs:
        content = []
        token_bytes = self.tokenizer.token_bytes  # whole even for part of a character (clients join them)
        decode = self.tokenizer.decode
        for entry, _ in entries:
            assert entry is not None
            token = f"token_id:{entry.token_id}" if as_ids else decode([entry.token_id])
            top = []
            for tid, value in entry.top:
                text = f"token_id:{tid}" if as_ids else decode([tid])
                top.append(ChatTopLogprob(token=text, logprob=_finite(value), bytes=list(token_bytes(tid))))
            content.append(
                ChatTokenLogprob(
                    token=token, logprob=_finite(entry.logprob), bytes=list(token_bytes(entry.token_id)),
                    top_logprobs=top,
                )
            )  # fmt: skip
        return ChatLogprobs(content=content)

    async def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        run, stream = await self.prepare(req)
        logprobs: dict[int, list[tuple[TokenLogprob | None, int]]] = {i: [] for i in range(req.n)}
        hook = functools.partial(self.keep_prompt_logprobs, run)
        async for d in self.deltas(run, stream, hook if req.prompt_logprobs is not None else None):
            logprobs[d.index] += d.logprobs
        choices = [
            self._chat_choice(
                run.tools,
                c,
                self._logprobs(logprobs[c.index], req.return_tokens_as_token_ids) if req.logprobs else None,
            )
            for c in run.choices
        ]
        if req.return_token_ids:
            for choice, c in zip(choices, run.choices, strict=True):
                choice.token_ids = c.token_ids
        return ChatCompletionResponse(
            id=run.request_id, model=self.model_name, choices=choices, usage=run.usage(),
            prompt_token_ids=run.prompts[0].token_ids if req.return_token_ids else None,
            prompt_logprobs=None if req.prompt_logprobs is None else self.prompt_logprob_list(run, 0, req.prompt_logprobs),
        )  # fmt: skip

    @staticmethod
    def _chat_choice(tools: ToolPlan, c: ChoiceText, logprobs: ChatLogprobs | None) -> ChatChoice:
        content, calls = tools.parse(c.text)
        reason = tools.finish_reason(calls, c.finish_reason)
        message = ChatResponseMessage(content=content, tool_calls=calls)
        stop_reason = None if calls else c.stop_reason
        return ChatChoice(
            index=c.index, message=message, logprobs=logprobs, finish_reason=reason, stop_reason=stop_reason
        )

    async def stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        run, stream = await self.prepare(req)
        return self._stream(req, run, stream)

    async def _stream(
        self, req: ChatCompletionRequest, run: _Run, stream: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[ChatCompletionChunk]:
        created = int(time.time())
        continuous = _continuous_usage(req)

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=run.request_id,
                created=created,
                model=self.model_name,
                choices=choices,
                usage=usage or (run.usage() if continuous else None),
            )

        for i in range(req.n):  # OpenAI's first chunk of each choice carries the role
            first = chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            if req.return_token_ids and i == 0:
                first.prompt_token_ids = run.prompts[0].token_ids
            yield first
        filters = [ToolTextFilter(run.tools) for _ in range(req.n)] if run.tools.mode != "none" else None
        held_ids: list[list[int]] = [[] for _ in range(req.n)]  # of deltas a tool filter held back
        async with aclosing(self.deltas(run, stream)) as deltas:  # closed at once if the client leaves
            async for d in deltas:
                logprobs = (
                    self._logprobs(d.logprobs, req.return_tokens_as_token_ids) if req.logprobs else None
                )
                if filters is None:
                    delta, reason = DeltaMessage(content=d.text), d.finish_reason
                else:
                    delta, reason = self._tool_delta(filters[d.index], d)
                    if not (delta.content or delta.tool_calls or reason or logprobs):
                        held_ids[d.index] += d.token_ids
                        continue  # text held back as a possible tool call: nothing to send yet
                stop_reason = d.stop_reason if reason == d.finish_reason else None  # not for tool calls
                ids = None
                if req.return_token_ids:
                    ids, held_ids[d.index] = held_ids[d.index] + d.token_ids, []
                choice = ChatStreamChoice(
                    index=d.index, delta=delta, logprobs=logprobs, finish_reason=reason, stop_reason=stop_reason,
                    token_ids=ids,
                )  # fmt: skip
                yield chunk([choice])
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], run.usage())

    @staticmethod
    def _tool_delta(tools: ToolTextFilter, d: TextDelta) -> tuple[DeltaMessage, str | None]:
        """Content that cannot be part of a tool call streams as it comes; the calls go whole in the
        choice's last chunk (id, name and arguments together), whose finish_reason is "tool_calls"."""
        content = tools.feed(d.text)
        if d.finish_reason is None:
            return DeltaMessage(content=content), None
        rest, calls = tools.finish()
        deltas = [_call_delta(i, call) for i, call in enumerate(calls)] or None
        reason = tools.plan.finish_reason(calls, d.finish_reason)
        return DeltaMessage(content=(content + rest) or None, tool_calls=deltas), reason


def _call_delta(index: int, call: ToolCall) -> ToolCallDelta:
    function = FunctionCallDelta(name=call.function.name, arguments=call.function.arguments)
    return ToolCallDelta(index=index, id=call.id, type="function", function=function)
