"""LLMEngine: requests in, RequestOutputs out, over an EngineCore."""

from __future__ import annotations

import logging
import os
import time

from tokenmill.config import EngineArgs
from tokenmill.engine.builder import (
    build_drafter,
    build_runner,
    build_scheduler,
    load_draft_model,
    resolve_model,
)
from tokenmill.engine.core import EngineCore
from tokenmill.engine.events import EngineStats
from tokenmill.engine.input_processor import InputProcessor, PromptType
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.loader.hf import load_generation_config
from tokenmill.loader.tokenizer import load_tokenizer
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "PromptType"]


class LLMEngine:
    """Runs requests to completion on one device, batching them continuously.

    Its step is the core's step between the input side (tokenize, validate)
    and the output side (detokenize, stop strings, outputs)."""

    def __init__(self, args: EngineArgs, defer_graphs: bool = False):
        """defer_graphs: leave committing the KV cache and capturing decode
        graphs to `runner.finish_start_up_step()` (a server calls it while
        idle, after it answers /health)."""
        t0 = time.monotonic()
        self.args = args
        spec = resolve_model(args)
        self.hf_config = spec.hf_config
        self.max_model_len = spec.max_model_len
        self.tokenizer = load_tokenizer(args.tokenizer or spec.path, args.trust_remote_code)
        if args.chat_template:
            self.tokenizer.chat_template = _read_template(args.chat_template)
        draft = load_draft_model(args, spec)
        runner = build_runner(args, spec, defer_graphs=defer_graphs, draft=draft)
        self.core = EngineCore(
            build_scheduler(args, spec, runner.num_blocks, runner.graph_tokens),
            runner,
            build_drafter(draft, runner),
        )
        self.inputs = InputProcessor(
            self.tokenizer,
            load_generation_config(spec.path),
            spec.hf_config,
            self.max_model_len,
            args,
        )
        self.outputs = OutputProcessor(self.tokenizer)
        logger.info(
            "engine ready in %.1f s: %s on %s, max_model_len=%d",
            time.monotonic() - t0,
            spec.hf_config.architectures[0],
            spec.device,
            self.max_model_len,
        )

    @property
    def runner(self):
        return self.core.runner

    @property
    def workers(self) -> list:
        """The tensor-parallel worker processes this engine spawned."""
        group = self.core.runner.workers
        return group.processes if group is not None else []

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        priority: int = 0,
    ) -> None:
        """Queues a request. Raises InvalidParameterError for input that can never run."""
        params = params or SamplingParams()
        self.outputs.check_new(request_id)
        text, ids = self.inputs.tokenize(prompt)
        self._add(
            request_id, text, ids, params, self.inputs.sampling_request(ids, params, priority)
        )

    def add_beam_request(
        self, request_id: str, prompt: PromptType, params: BeamSearchParams
    ) -> None:
        """Queues a beam search; its single output lists the hypotheses, best first."""
        self.outputs.check_new(request_id)
        text, ids = self.inputs.tokenize(prompt)
        self._add(request_id, text, ids, params, self.inputs.beam_request(ids, params))

    def _add(self, request_id, text, ids, params, request) -> None:
        first_seq = self.core.add_request(request)
        self.outputs.add(request_id, request.request_id, first_seq, text, ids, params)

    def abort_request(self, request_id: str) -> None:
        """Stops a request now and frees its KV blocks."""
        core_id = self.outputs.abort(request_id)
        if core_id is not None:
            self.core.abort_request(core_id)

    def has_unfinished_requests(self) -> bool:
        return self.outputs.has_unfinished() or self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns the outputs of requests that made progress."""
        self.core.finish_sequences(self.outputs.take_stopped())
        return self.outputs.process(self.core.step())

    def stats(self) -> EngineStats:
        return self.core.stats()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (if any); the engine is unusable afterwards."""
        self.core.runner.shutdown()


def _read_template(value: str) -> str:
    if os.path.exists(value):
        with open(value) as f:
            return f.read()
    return value
