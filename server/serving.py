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
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from model.tokenizer import Tokenizer
from server.engine.request import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob
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
    SamplingFields,
    UsageInfo,
)

try:  # the engine may land after this module; the names only matter once it exists
    from server.engine.engine import EngineDeadError, QueueFullError
except ImportError:  # pragma: no cover

    class QueueFullError(Exception):  # type: ignore[no-redef]
        pass

    class EngineDeadError(Exception):  # type: ignore[no-redef]
        pass


OutputHook = Callable[[int, RequestOutput], None]


class EngineClient(Protocol):
    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]: ...
    def abort(self, request_id: str, index: int | None = None) -> Any: ...


# ---- text of one choice -----------------------------------------------------------------------------


@dataclass
class TextDelta:
    index: int
    text: str
    logprobs: list[tuple[TokenLogprob | None, int]]  # (logprob, text offset) of tokens released with the text
    finish_reason: str | None


class ChoiceText:
    """Turns one choice's token deltas into text deltas.

    Text that could be the start of a stop string is held back until it is known not to be one, so a
    stop string spanning several tokens is cut cleanly while streaming, and the joined stream equals
    the non-streamed text.
    """

    def __init__(self, index: int, tokenizer: Tokenizer, stop: Sequence[str], prefix: str = "") -> None:
        self.index = index
        self._decoder = tokenizer.incremental_decoder(skip_special_tokens=True)
        self._stop = [s for s in stop if s]
        self._pending = prefix  # decoded, not yet released
        self._pending_lp: list[tuple[TokenLogprob | None, int]] = []
        self._offset = len(prefix)  # length of all text decoded so far (offsets of logprobs)
        self.text = ""  # all released text
        self.num_tokens = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_prefix_logprobs(self, entries: list[tuple[TokenLogprob | None, int]]) -> None:
        self._pending_lp.extend(entries)

    def add(self, out: CompletionOutput) -> TextDelta | None:
        if self.finished:
            return None  # tokens the engine made after our stop string: not counted, not shown
        for k, token_id in enumerate(out.new_token_ids):
            self.num_tokens += 1
            if out.logprobs is not None:
                self._pending_lp.append((out.logprobs[k], self._offset))
            piece = self._decoder.push([token_id])
            self._offset += len(piece)
            self._pending += piece
            if self._cut_at_stop():
                return self._release()
        if out.finish_reason is not None:
            tail = self._decoder.flush()
            self._pending += tail
            self._offset += len(tail)
            if not self._cut_at_stop():
                self.finish_reason = out.finish_reason
        return self._release()

    def _cut_at_stop(self) -> bool:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if not hits:
            return False
        self._pending = self._pending[: min(hits)]
        self.finish_reason = "stop"
        return True

    def _holdback(self) -> int:
        """Length of the longest suffix of the pending text that begins some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self) -> TextDelta | None:
        keep = 0 if self.finished else self._holdback()
        cut = len(self._pending) - keep
        text, self._pending = self._pending[:cut], self._pending[cut:]
        if not text and not self._pending_lp and not self.finished:
            return None
        self.text += text
        logprobs, self._pending_lp = self._pending_lp, []
        return TextDelta(self.index, text, logprobs, self.finish_reason)


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

    request_id: str
    prompts: list[PromptInput]
    n: int
    choices: list[ChoiceText] = field(default_factory=list)
    timers: list[RequestTimer] = field(default_factory=list)
    engine_ids: list[str] = field(default_factory=list)  # the engine request of each prompt

    def usage(self) -> UsageInfo:
        prompt = sum(len(p.token_ids) for p in self.prompts)
        completion = sum(c.num_tokens for c in self.choices)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

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
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           "NotFoundError", "model")  # fmt: skip

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise APIError(400, "The prompt is empty; send at least one token.", param="prompt")
        try:
            self.tokenizer.check_ids(ids)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e
        if len(ids) >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the prompt "
                           f"has {len(ids)} tokens, which leaves no room for output.", param="prompt")  # fmt: skip

    def sampling_params(
        self, req: SamplingFields, max_tokens: int | None, logprobs: int | None, prompt_len: int
    ) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. The prompt has "
                           f"{prompt_len} tokens and max_tokens is {max_tokens}: {prompt_len} + {max_tokens} = "
                           f"{prompt_len + max_tokens} > {self.max_model_len}. Lower max_tokens or the prompt.",
                           param="max_tokens")  # fmt: skip
        params = SamplingParams(
            n=req.n,
            max_tokens=room if max_tokens is None else max_tokens,
            min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=self._top_k(req.top_k),
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
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from e
        return params

    def _top_k(self, top_k: int | None) -> int:
        # top_k at or above the vocabulary keeps every token: the same as off, and torch.topk cannot take it.
        if top_k is None or top_k >= self.tokenizer.vocab_size:
            return -1
        return top_k

    @staticmethod
    def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        try:
            return {int(k): v for k, v in bias.items()}
        except ValueError as e:
            raise APIError(
                400, f"logit_bias keys must be token ids (integers as strings): {e}", param="logit_bias"
            ) from e

    @staticmethod
    def stop_strings(stop: str | list[str] | None) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    def _submit(
        self, request_id: str, prompt: PromptInput, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Queue one engine request. The engine refuses at once (full queue, dead), before any response byte."""
        try:
            return self.engine.generate(request_id, prompt.token_ids, params)
        except QueueFullError as e:
            raise APIError(429, f"The server is at capacity: {e}. Retry later.", "rate_limit_error") from e
        except EngineDeadError as e:
            raise APIError(503, f"The engine is not running: {e}", "service_unavailable") from e
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e

    async def start(
        self, run: _Run, params: list[SamplingParams]
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """One engine request per prompt (params[i] for prompt i), merged into one stream."""
        many = len(run.prompts) > 1
        run.engine_ids = [
            f"{run.request_id}-p{i}" if many else run.request_id for i in range(len(run.prompts))
        ]
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for rid, prompt, sp in zip(run.engine_ids, run.prompts, params, strict=True):
                streams.append(self._submit(rid, prompt, sp))
        except BaseException:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
            raise
        run.timers = [RequestTimer(self.metrics, len(p.token_ids), run.n) for p in run.prompts]
        return merge_streams(streams)

    def step(self, run: _Run, p: int, out: RequestOutput) -> list[TextDelta]:
        """Feed one engine output of prompt `p` to its choices; returns the text deltas it produced."""
        if out.error is not None:
            raise APIError(500, f"The engine failed on this request: {out.error}", "internal_error")
        deltas = []
        timer = run.timers[p]
        if out.queue_time is not None:
            timer.queued(out.queue_time)
        for o in out.outputs:
            choice = run.choices[p * run.n + o.index]
            before = choice.num_tokens
            was_finished = choice.finished
            delta = choice.add(o)
            timer.tokens(o.index, choice.num_tokens - before)
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


def _new_id(prefix: str) -> str:
    """`cmpl-<X-Request-Id>` inside an HTTP request, so a response is found in the logs by its id."""
    return f"{prefix}-{current_request_id() or uuid.uuid4().hex}"


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number, so clamp an impossible token's log-probability.
    return max(x, -9999.0)


# ---- /v1/completions ---------------------------------------------------------------------------------


class ServingCompletion(OpenAIServing):
    def prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[PromptInput]:
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(x, int) for x in prompt):
            items = [prompt]  # type: ignore[list-item]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items:
            raise APIError(400, "The prompt is empty; send at least one token.", param="prompt")
        out = []
        for item in items:
            p = (
                PromptInput(self.tokenizer.encode(item), item)
                if isinstance(item, str)
                else PromptInput(list(item))
            )
            self.check_prompt(p.token_ids)
            out.append(p)
        return out

    async def prepare(self, req: CompletionRequest) -> tuple[_Run, AsyncIterator[tuple[int, RequestOutput]]]:
        self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
        prompts = self.prompts(req.prompt)
        params = [self.sampling_params(req, req.max_tokens, req.logprobs, len(p.token_ids)) for p in prompts]
        if req.echo and req.logprobs is not None:
            for sp in params:
                sp.prompt_logprobs = req.logprobs
        run = _Run(_new_id("cmpl"), prompts, req.n)
        stop = self.stop_strings(req.stop)
        for p in prompts:
            echo = (p.text if p.text is not None else self.tokenizer.decode(p.token_ids)) if req.echo else ""
            base = len(run.choices)
            run.choices += [ChoiceText(base + i, self.tokenizer, stop, echo) for i in range(req.n)]
        return run, await self.start(run, params)

    def _echo_logprobs(self, run: _Run, p: int, out: RequestOutput) -> None:
        """With echo + logprobs, the prompt's tokens lead the logprobs (the first has none)."""
        if out.prompt_logprobs is None:
            return
        decoder = self.tokenizer.incremental_decoder(skip_special_tokens=True)
        offset, entries = 0, list[tuple[TokenLogprob | None, int]]()
        for tid, lp in zip(run.prompts[p].token_ids, out.prompt_logprobs, strict=False):
            entries.append((lp if lp is not None else TokenLogprob(tid, float("nan"), 0, []), offset))
            offset += len(decoder.push([tid]))
        for c in run.choices[p * run.n : (p + 1) * run.n]:
            c.add_prefix_logprobs(entries)

    def _logprobs(self, entries: list[tuple[TokenLogprob | None, int]]) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for entry, offset in entries:
            assert entry is not None
            first_prompt_token = entry.logprob != entry.logprob  # NaN marks "no logprob" (first prompt token)
            lp.tokens.append(self.tokenizer.decode([entry.token_id]))
            lp.text_offset.append(offset)
            lp.token_logprobs.append(None if first_prompt_token else _finite(entry.logprob))
            lp.top_logprobs.append(
                None if first_prompt_token else {self.tokenizer.decode([t]): _finite(v) for t, v in entry.top}
            )
        return lp

    def _choice(self, delta_text: str, delta: TextDelta, want_logprobs: bool) -> CompletionChoice:
        logprobs = self._logprobs(delta.logprobs) if want_logprobs else None
        return CompletionChoice(
            index=delta.index, text=delta_text, logprobs=logprobs, finish_reason=delta.finish_reason
        )

    async def create(self, req: CompletionRequest) -> CompletionResponse:
        run, stream = await self.prepare(req)
        want = req.logprobs is not None
        logprobs: dict[int, list[tuple[TokenLogprob | None, int]]] = {i: [] for i in range(len(run.choices))}
        hook = functools.partial(self._echo_logprobs, run) if req.echo and want else None
        async for d in self.deltas(run, stream, hook):
            logprobs[d.index] += d.logprobs
        choices = [
            CompletionChoice(
                index=c.index,
                text=c.text,
                logprobs=self._logprobs(logprobs[c.index]) if want else None,
                finish_reason=c.finish_reason,
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
        hook = functools.partial(self._echo_logprobs, run) if req.echo and want else None
        async with aclosing(self.deltas(run, stream, hook)) as deltas:  # closed at once if the client leaves
            async for d in deltas:
                choice = self._choice(d.text, d, want)
                yield CompletionResponse(
                    id=run.request_id, created=created, model=self.model_name, choices=[choice]
                )
        if req.stream_options and req.stream_options.include_usage:
            yield CompletionResponse(
                id=run.request_id, created=created, model=self.model_name, choices=[], usage=run.usage()
            )


# ---- /v1/chat/completions ----------------------------------------------------------------------------


class ServingChat(OpenAIServing):
    def prompt_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        plain = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise APIError(
                400, f"The messages could not be rendered with the chat template: {e}", param="messages"
            ) from e
        return self.tokenizer.encode(text)

    def prompt(self, req: ChatCompletionRequest) -> PromptInput:
        prompt = PromptInput(self.prompt_ids(req.messages, req.add_generation_prompt))
        self.check_prompt(prompt.token_ids)
        return prompt

    async def prepare(
        self, req: ChatCompletionRequest
    ) -> tuple[_Run, AsyncIterator[tuple[int, RequestOutput]]]:
        self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
        prompt = self.prompt(req)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self.sampling_params(req, max_tokens, logprobs, len(prompt.token_ids))
        run = _Run(_new_id("chatcmpl"), [prompt], req.n)
        stop = self.stop_strings(req.stop)
        run.choices = [ChoiceText(i, self.tokenizer, stop) for i in range(req.n)]
        return run, await self.start(run, [params])

    def _logprobs(self, entries: list[tuple[TokenLogprob | None, int]]) -> ChatLogprobs:
        content = []
        for entry, _ in entries:
            assert entry is not None
            token = self.tokenizer.decode([entry.token_id])
            top = []
            for tid, value in entry.top:
                text = self.tokenizer.decode([tid])
                top.append(ChatTopLogprob(token=text, logprob=_finite(value), bytes=list(text.encode())))
            content.append(
                ChatTokenLogprob(
                    token=token, logprob=_finite(entry.logprob), bytes=list(token.encode()), top_logprobs=top
                )
            )
        return ChatLogprobs(content=content)

    async def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        run, stream = await self.prepare(req)
        logprobs: dict[int, list[tuple[TokenLogprob | None, int]]] = {i: [] for i in range(req.n)}
        async for d in self.deltas(run, stream):
            logprobs[d.index] += d.logprobs
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=self._logprobs(logprobs[c.index]) if req.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for c in run.choices
        ]
        return ChatCompletionResponse(
            id=run.request_id, model=self.model_name, choices=choices, usage=run.usage()
        )

    async def stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        run, stream = await self.prepare(req)
        return self._stream(req, run, stream)

    async def _stream(
        self, req: ChatCompletionRequest, run: _Run, stream: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[ChatCompletionChunk]:
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=run.request_id, created=created, model=self.model_name, choices=choices, usage=usage
            )

        for i in range(req.n):  # OpenAI's first chunk of each choice carries the role
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async with aclosing(self.deltas(run, stream)) as deltas:  # closed at once if the client leaves
            async for d in deltas:
                logprobs = self._logprobs(d.logprobs) if req.logprobs else None
                delta = DeltaMessage(content=d.text)
                yield chunk(
                    [
                        ChatStreamChoice(
                            index=d.index, delta=delta, logprobs=logprobs, finish_reason=d.finish_reason
                        )
                    ]
                )
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], run.usage())
