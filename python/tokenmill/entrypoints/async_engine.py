"""The engine behind the server: the step loop on its own thread, requests as
asyncio streams of outputs."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenmill.engine.llm_engine import LLMEngine, PromptType
from tokenmill.entrypoints.metrics import EngineMetrics
from tokenmill.errors import InvalidParameterError, TokenmillError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams
from tokenmill.structured_output import StructuredOutputError

logger = logging.getLogger("tokenmill.engine")


class EngineDeadError(TokenmillError):
    """The step loop stopped; no request can make progress."""


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams | BeamSearchParams
    priority: int
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future


class AsyncEngine:
    """Owns an LLMEngine; every engine call happens on the loop thread."""

    def __init__(self, engine: LLMEngine, model_name: str, log_interval: float = 10.0):
        self.engine = engine
        self.metrics = EngineMetrics(model_name)
        self.log_interval = log_interval
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)

    # ----------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.engine.shutdown()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def grammars(self):
        """The engine's grammar compiler (structured outputs)."""
        return self.engine.inputs.grammars

    async def compile_constraint(self, spec: StructuredOutputsParams, field: str) -> None:
        """Compiles an output constraint off the step loop; a bad one raises
        InvalidParameterError naming `field`, the request's own name for it."""
        try:
            await asyncio.wrap_future(self.grammars.compile(spec))
        except StructuredOutputError as e:
            reason = e.message.split(": ", 1)[-1]
            raise InvalidParameterError(field, f"{field} cannot be used: {reason}") from e

    # ------------------------------------------------------------ requests
    async def generate(
        self, request_id: str, prompt: PromptType, params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Streams snapshots of the request's outputs; the last one has finished=True.

        Raises InvalidParameterError before the first output if the engine
        refuses the request. Closing the iterator early aborts the request.
        """
        if not self.alive:
            raise EngineDeadError("the engine loop is not running")
        spec = getattr(params, "structured_outputs", None)
        if spec is not None:  # compiled here, off the step loop; a bad constraint raises
            await asyncio.wrap_future(self.grammars.compile(spec))
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self._commands.put(_Add(request_id, prompt, params, priority, stream, loop, accepted))
        self._wake.set()
        await accepted
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # ----------------------------------------------------------- loop thread
    def _run(self) -> None:
        last_log = time.monotonic()
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self.metrics.observe_engine(self.engine.stats())
                    if self.engine.runner.finish_start_up_step():
                        continue  # deferred start-up work, a piece at a time while idle
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out)
                self.metrics.observe_engine(self.engine.stats())
                steps = self.engine.core.step_times
                self.metrics.observe_steps(steps)
                steps.clear()
                if time.monotonic() - last_log > self.log_interval:
                    last_log = time.monotonic()
                    self._log_stats()
        except BaseException as e:  # noqa: BLE001  (any failure must reach the waiting requests)
            logger.exception("engine loop failed")
            self.error = e
            dead = EngineDeadError(f"engine loop failed: {e!r}")
            for stream, loop in list(self._streams.values()):
                loop.call_soon_threadsafe(stream.put_nowait, dead)
            self._streams.clear()

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, tuple):
                _, rid = cmd
                if rid in self._streams:
                    self.engine.abort_request(rid)
                    self._streams.pop(rid, None)
                    self.metrics.aborted.inc()
                continue
            try:
                if isinstance(cmd.params, BeamSearchParams):
                    self.engine.add_beam_request(cmd.request_id, cmd.prompt, cmd.params)
                else:
                    self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.priority)
            except Exception as e:  # noqa: BLE001  (handed to the caller)
                cmd.loop.call_soon_threadsafe(_settle, cmd.accepted, e)
                continue
            self._streams[cmd.request_id] = (cmd.stream, cmd.loop)
            cmd.loop.call_soon_threadsafe(_settle, cmd.accepted, None)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is None:
            return
        if out.finished:
            self._streams.pop(out.request_id, None)
            self.metrics.observe_finished(out)
            m = out.metrics
            logger.info(
                "request %s: %d prompt + %d output tokens in %.3f s, finish %s",
                out.request_id,
                len(out.prompt_token_ids),
                sum(len(c.token_ids) for c in out.outputs),
                (m.finished_time or time.monotonic()) - m.arrival_time,
                ",".join(str(c.finish_reason) for c in out.outputs),
            )
        stream, loop = target
        loop.call_soon_threadsafe(stream.put_nowait, out)

    def _log_stats(self) -> None:
        st = self.engine.stats()
        fitted, fixed, per_token, per_row, per_context = self.engine.core.scheduler.cost_model
        logger.info(
            "running %d seqs, waiting %d reqs, KV cache %.1f%% used, %d prompt + %d generated "
            "tokens so far; step cost %s",
            st.num_running_seqs,
            st.num_waiting_requests,
            100 * st.kv_cache_usage,
            st.prompt_tokens,
            st.generation_tokens,
            f"{fixed:.1f} ms + {per_token:.3f} ms/prompt token + {per_row:.3f} ms/decode row "
            f"+ {per_context:.3f} ms/1k tokens of attention context"
            if fitted
            else "not fitted yet",
        )


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
