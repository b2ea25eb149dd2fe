"""The step loop: schedule -> forward -> sample -> update -> detokenize."""

from __future__ import annotations

import itertools
import logging
import os
import time
import weakref
from collections import defaultdict

import numpy as np
import torch

from tokenmill import _core, distributed
from tokenmill.config import EngineArgs
from tokenmill.devices import resolve_device
from tokenmill.engine.beam_search import BeamSearchState
from tokenmill.engine.detokenizer import IncrementalDetokenizer, StopChecker
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.request import RequestState, SequenceState
from tokenmill.engine.sampler import Sampler, SamplerOutput, SampleSlot, picks_argmax
from tokenmill.errors import InvalidParameterError, PromptTooLongError
from tokenmill.loader.config import load_config
from tokenmill.loader.gguf import gguf_to_hf
from tokenmill.loader.hf import load_generation_config, resolve_model_path
from tokenmill.loader.tokenizer import load_tokenizer
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


class LLMEngine:
    """Runs requests to completion on one device, batching them continuously."""

    def __init__(self, args: EngineArgs, tp_rank: int = 0, tp_init_method: str | None = None):
        t0 = time.monotonic()
        self.args = args
        self.workers = []
        path = resolve_model_path(args.model, args.revision)
        if path.endswith(".gguf"):
            path = gguf_to_hf(path)
        self.model_path = path
        self.hf_config = load_config(path)
        self.tokenizer = load_tokenizer(args.tokenizer or path, args.trust_remote_code)
        if args.chat_template:
            self.tokenizer.chat_template = _read_template(args.chat_template)
        self.generation_config = load_generation_config(path)
        self.max_model_len = self._max_model_len()
        self.device = resolve_device(args.device)
        torch.manual_seed(args.seed)
        if args.tensor_parallel_size > 1:
            self._start_tensor_parallel(tp_rank, tp_init_method)
        self.runner = ModelRunner(args, self.hf_config, path, self.device, self.max_model_len)
        self.scheduler = _core.Scheduler(self._scheduler_config())
        self.eos_token_id, self.extra_stop_ids = self._eos_ids()
        self.sampler = Sampler(args.seed)
        self.requests: dict[int, RequestState] = {}
        self.internal_ids: dict[str, int] = {}
        self._next_id = itertools.count()
        self.counters = defaultdict(int)
        logger.info(
            "engine ready in %.1f s: %s on %s, max_model_len=%d",
            time.monotonic() - t0,
            self.hf_config.architectures[0],
            self.device,
            self.max_model_len,
        )

    # ------------------------------------------------------------------ setup
    def _start_tensor_parallel(self, rank: int, init_method: str | None) -> None:
        world = self.args.tensor_parallel_size
        cfg = self.hf_config
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        if heads % world or (kv % world and world % kv):
            raise InvalidParameterError(
                "tensor_parallel_size",
                f"tensor_parallel_size {world} must divide num_attention_heads ({heads}) and divide or be a "
                f"multiple of num_key_value_heads ({kv})",
            )
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        if init_method is None and launched_by_torchrun():
            init_method, rank = "env://", int(os.environ["RANK"])
            if int(os.environ["WORLD_SIZE"]) != world:
                raise InvalidParameterError(
                    "tensor_parallel_size",
                    f"tensor_parallel_size {world} differs from WORLD_SIZE {os.environ['WORLD_SIZE']}",
                )
        if rank == 0 and init_method is None:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
            self.workers = distributed.spawn_workers(world, init_method, self.args)
            self._finalizer = weakref.finalize(self, _stop_workers, self.workers)
        distributed.init(rank, world, init_method, self.device)

    def check_workers(self) -> None:
        """Raises WorkerDiedError when a tensor-parallel worker process is gone."""
        for i, p in enumerate(self.workers, start=1):
            if p.poll() is not None:
                raise WorkerDiedError(f"tensor-parallel worker {i} exited with code {p.returncode}")

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (if any); the engine is unusable afterwards."""
        group = distributed.tp()
        if group.world > 1 and group.rank == 0:
            try:
                distributed.broadcast_step(None)
            except Exception:  # noqa: BLE001  (workers may be gone already)
                pass
            _stop_workers(self.workers)
            self.workers = []
            distributed.shutdown()

    def _max_model_len(self) -> int:
        cfg = self.hf_config
        model_max = (
            getattr(cfg, "max_position_embeddings", None)
            or getattr(cfg, "n_positions", None)
            or 2048
        )
        if self.args.max_model_len is None:
            return model_max
        if self.args.max_model_len > model_max:
            raise InvalidParameterError(
                "max_model_len",
                f"max_model_len {self.args.max_model_len} exceeds the model's context of {model_max} tokens",
            )
        return self.args.max_model_len

    def _scheduler_config(self) -> _core.SchedulerConfig:
        c = _core.SchedulerConfig()
        c.num_blocks = self.runner.num_blocks
        c.block_size = self.args.block_size
        c.max_num_seqs = self.args.max_num_seqs
        c.max_num_batched_tokens = max(
            self.args.max_num_batched_tokens,
            1 if self.args.enable_chunked_prefill else self.max_model_len,
        )
        c.max_model_len = self.max_model_len
        c.enable_chunked_prefill = self.args.enable_chunked_prefill
        c.enable_prefix_caching = self.args.enable_prefix_caching
        c.priority_policy = self.args.scheduling_policy == "priority"
        return c

    def _eos_ids(self) -> tuple[int | None, list[int]]:
        ids = self.generation_config.get(
            "eos_token_id", getattr(self.hf_config, "eos_token_id", None)
        )
        if ids is None:
            ids = self.tokenizer.eos_token_id
        ids = ids if isinstance(ids, list) else ([] if ids is None else [ids])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.insert(0, self.tokenizer.eos_token_id)
        return (ids[0] if ids else None), ids[1:]

    # --------------------------------------------------------------- requests
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return None, list(prompt)
        raise InvalidParameterError(
            "prompt", "prompt must be a string, a list of token ids or a dict"
        )

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        priority: int = 0,
    ) -> None:
        """Queues a request. Raises InvalidParameterError for input that can never run."""
        params = params or SamplingParams()
        if request_id in self.internal_ids:
            raise InvalidParameterError("request_id", f"duplicate request id {request_id!r}")
        text, ids = self.tokenize(prompt)
        self._validate(ids, params)
        max_tokens = (
            params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        )
        internal = next(self._next_id)
        core = _core.RequestParams()
        core.max_tokens = max(1, max_tokens)
        core.min_tokens = min(params.min_tokens, core.max_tokens)
        core.n = params.num_sequences
        core.stop_token_ids = list(params.stop_token_ids) + (
            [] if params.ignore_eos else self.extra_stop_ids
        )
        core.eos_token_id = -1 if self.eos_token_id is None else self.eos_token_id
        core.ignore_eos = params.ignore_eos
        core.priority = priority
        if params.prompt_logprobs is not None:
            # Cached prompt blocks would skip the forward that yields their logprobs.
            core.cache_salt = (1 << 63) | internal
        try:
            seq_id = self.scheduler.add_request(internal, ids, core)
        except ValueError as e:
            raise InvalidParameterError("prompt", str(e)) from e
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        state = RequestState(
            request_id,
            internal,
            text,
            ids,
            params,
            StopChecker(params.stop, params.include_stop_str_in_output),
            generator,
        )
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        state.seqs.append(
            SequenceState(seq_id, 0, detok, logprobs=[] if params.needs_logprobs else None)
        )
        self.requests[internal] = state
        self.internal_ids[request_id] = internal
        self.counters["prompt_tokens"] += len(ids)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidParameterError("prompt", "prompt must not be empty")
        if len(ids) > self.max_model_len:
            raise PromptTooLongError(
                "prompt",
                f"this model's maximum context length is {self.max_model_len} tokens, "
                f"but the prompt has {len(ids)} tokens",
            )
        vocab = self.hf_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidParameterError("prompt", f"prompt token ids must be in [0, {vocab})")
        if params.num_sequences > self.args.max_num_seqs:
            raise InvalidParameterError(
                "n", f"n must be at most {self.args.max_num_seqs} sequences per request"
            )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > self.args.max_logprobs:
                raise InvalidParameterError(
                    name, f"{name} must be at most {self.args.max_logprobs}"
                )

    def abort_request(self, request_id: str) -> None:
        """Stops a request now and frees its KV blocks."""
        internal = self.internal_ids.pop(request_id, None)
        if internal is None:
            return
        self.scheduler.abort_request(internal)
        state = self.requests.pop(internal)
        for s in state.seqs:
            if not s.finished:
                s.finish_reason = "abort"
        state.finished = True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns the outputs of requests that made progress."""
        if self.workers:
            self.check_workers()
        out = self.scheduler.schedule()
        self.counters["preemptions"] += len(out.preempted)
        for internal in out.preempted:  # beam searches restart from their prompt
            state = self.requests.get(internal)
            if state is not None and state.beam is not None:
                state.beam = BeamSearchState(
                    state.beam.params, state.beam.eos, state.seqs[0].seq_id
                )
        touched: dict[int, RequestState] = {}
        for internal in out.aborted:
            state = self.requests.get(internal)
            if state:
                for s in state.seqs:
                    s.finish_reason = s.finish_reason or "abort"
                touched[internal] = state
        if out.num_seqs == 0:
            return self._finish_step(touched)
        now = time.monotonic()
        num_samples = out.num_samples
        sampling = np.flatnonzero(num_samples)
        seq_ids, req_ids = out.seq_ids, out.request_ids
        # Row r of the logits belongs to sampling[r]; sampled rows repeat it num_samples times.
        slots, slot_rows, beam_rows = [], [], defaultdict(dict)
        for row, i in enumerate(sampling):
            state = self.requests[int(req_ids[i])]
            if state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = now
            if state.beam is not None:
                beam_rows[state.internal_id][int(seq_ids[i])] = row
                continue
            seq = state.seq_by_id(int(seq_ids[i]))
            for _ in range(int(num_samples[i])):
                slots.append(
                    SampleSlot(
                        state.params,
                        seq.output_ids,
                        state.prompt_ids,
                        state.generator,
                        self.eos_token_id,
                    )
                )
                slot_rows.append(row)
        prompt_rows = self._prompt_logprob_rows(out)
        rows = out.sample_rows
        if prompt_rows:
            rows = np.concatenate([rows, np.concatenate([r for _, r, _ in prompt_rows])])
        argmax_only = (
            not prompt_rows
            and not beam_rows
            and len(slots) == len(rows)
            and all(picks_argmax(s) for s in slots)
        )
        logits, greedy_tokens = self.runner.execute(out, rows, greedy=argmax_only)
        if prompt_rows:
            self._record_prompt_logprobs(logits[len(out.sample_rows) :], prompt_rows)
            logits = logits[: len(out.sample_rows)]
        sampled = None
        if greedy_tokens is not None:
            sampled = SamplerOutput(torch.from_numpy(greedy_tokens), None, None)
        elif slots:
            rows = slot_rows if len(slot_rows) != len(logits) else None
            picked = logits if rows is None else logits[torch.tensor(rows, device=logits.device)]
            sampled = self.sampler(picked, slots)
        beam_tokens = self._beam_steps(logits, beam_rows)
        tokens = np.zeros(int(num_samples.sum()), np.int32)
        normal = sampled.token_ids.cpu().numpy() if sampled else None
        k_slot = k_normal = 0
        for i in sampling:
            k = int(num_samples[i])
            sid = int(seq_ids[i])
            if sid in beam_tokens:
                tokens[k_slot : k_slot + k] = beam_tokens[sid][:k]
            else:
                tokens[k_slot : k_slot + k] = normal[k_normal : k_normal + k]
                k_normal += k
            k_slot += k
        result = self.scheduler.update(out, tokens)
        self._apply(out, sampling, tokens, sampled, result, touched)
        self._commit_beams(beam_rows, result, touched)
        return self._finish_step(touched)

    # -------------------------------------------------------- prompt logprobs
    def _prompt_logprob_rows(self, out) -> list:
        """(state, token rows, positions) of the prompt tokens this step computes
        for requests that asked for prompt_logprobs, in positions not yet recorded."""
        found = []
        qsl, positions = out.query_start_loc, out.positions
        for i in range(out.num_seqs):
            state = self.requests.get(int(out.request_ids[i]))
            if state is None or state.beam is not None or state.params.prompt_logprobs is None:
                continue
            if int(out.seq_ids[i]) != state.seqs[0].seq_id:
                continue  # parallel samples share the prompt
            start, end = int(qsl[i]), int(qsl[i + 1])
            pos = positions[start:end]
            recorded = len(state.prompt_logprobs or [None]) - 1
            keep = (pos < len(state.prompt_ids) - 1) & (pos >= recorded)
            if keep.any():
                found.append((state, np.arange(start, end, dtype=np.int32)[keep], pos[keep]))
        return found

    def _record_prompt_logprobs(self, logits: torch.Tensor, found: list) -> None:
        """Appends, per prompt position, the logprob of the next prompt token and the top-k."""
        logprobs = logits.float().log_softmax(-1)
        row = 0
        for state, rows, pos in found:
            lp = logprobs[row : row + len(rows)]
            row += len(rows)
            targets = torch.tensor(
                [state.prompt_ids[p + 1] for p in pos.tolist()], device=lp.device
            )
            chosen = lp.gather(1, targets[:, None]).squeeze(1)
            ranks = (lp > chosen[:, None]).sum(-1) + 1
            k = state.params.prompt_logprobs
            top_vals, top_ids = lp.topk(k, dim=-1) if k else (None, None)
            if state.prompt_logprobs is None:
                state.prompt_logprobs = [None]  # the first token has no context
            for j, (t, c, r) in enumerate(
                zip(targets.tolist(), chosen.tolist(), ranks.tolist(), strict=True)
            ):
                entry = {t: Logprob(c, r)}
                for n in range(k):
                    tid = int(top_ids[j, n])
                    entry.setdefault(tid, Logprob(float(top_vals[j, n]), n + 1))
                state.prompt_logprobs.append(entry)

    # ------------------------------------------------------------ beam search
    def _beam_steps(self, logits: torch.Tensor, beam_rows: dict) -> dict[int, list[int]]:
        """Selects each beam request's continuations; forks and drops beams in the core.

        Returns, per scheduled beam sequence, the tokens the core appends to it
        in update() (several at the first step, when the core forks the prompt)."""
        tokens: dict[int, list[int]] = {}
        for internal, rows_by_seq in beam_rows.items():
            state = self.requests[internal]
            beam = state.beam
            order = [rows_by_seq[b.seq_id] for b in beam.beams]
            logprobs = logits[torch.tensor(order, device=logits.device)].float().log_softmax(-1)
            selection = beam.step(logprobs.cpu())
            beam.forks = {}
            first_step = len(beam.beams) == 1 and not beam.beams[0].tokens
            for b in beam.beams:
                conts = selection.continuations.get(b.seq_id, [])
                if first_step:
                    width = beam.params.beam_width  # the core forks the prompt into this many
                    tokens[b.seq_id] = (conts + [conts[0] if conts else 0] * width)[:width]
                    beam.unused = width - len(conts)
                    continue
                if not conts:
                    self.scheduler.finish_sequence(b.seq_id, "abort")
                    tokens[b.seq_id] = [0]
                    continue
                tokens[b.seq_id] = conts[:1]
                for n, tok in enumerate(conts[1:], start=1):
                    beam.forks[(b.seq_id, n)] = self.scheduler.fork_sequence(b.seq_id, tok)
        return tokens

    def _commit_beams(self, beam_rows: dict, result, touched) -> None:
        forks = defaultdict(list)
        for parent, child in result.forks:
            forks[parent].append(child)
        for internal in beam_rows:
            state = self.requests[internal]
            beam = state.beam
            ids = dict(beam.forks)
            for b in beam.beams:
                ids[(b.seq_id, 0)] = b.seq_id
                for n, child in enumerate(forks.get(b.seq_id, []), start=1):
                    ids[(b.seq_id, n)] = child
            unused = beam.unused
            if unused:  # the core forked more sequences than there were continuations
                for b in beam.beams:
                    for child in forks.get(b.seq_id, [])[-unused:]:
                        self.scheduler.finish_sequence(child, "abort")
                beam.unused = 0
            if beam.done:
                self._finish_beam_request(state)
            else:
                beam.commit(ids)
            touched[internal] = state

    def _finish_beam_request(self, state: RequestState) -> None:
        self.scheduler.abort_request(state.internal_id)
        outputs = []
        for i, h in enumerate(state.beam.results()):
            ends_with_eos = bool(h.tokens) and h.tokens[-1] in state.beam.eos
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=self.tokenizer.decode(h.tokens, skip_special_tokens=True),
                    token_ids=h.tokens,
                    cumulative_logprob=h.logprob,
                    logprobs=None,
                    finish_reason="stop" if ends_with_eos else "length",
                    score=h.score,
                )
            )
        state.beam_outputs = outputs
        for s in state.seqs:
            s.finish_reason = s.finish_reason or "stop"
        self.counters["generation_tokens"] += sum(len(o.token_ids) for o in outputs)

    def add_beam_request(
        self, request_id: str, prompt: PromptType, params: BeamSearchParams
    ) -> None:
        """Queues a beam search; its single output lists the hypotheses, best first."""
        if request_id in self.internal_ids:
            raise InvalidParameterError("request_id", f"duplicate request id {request_id!r}")
        text, ids = self.tokenize(prompt)
        self._validate(ids, SamplingParams(n=params.beam_width, max_tokens=params.max_tokens))
        internal = next(self._next_id)
        core = _core.RequestParams()
        core.max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        core.n = params.beam_width
        core.ignore_eos = True  # EOS ends hypotheses here, not sequences in the core
        core.restart_on_preempt = True
        try:
            seq_id = self.scheduler.add_request(internal, ids, core)
        except ValueError as e:
            raise InvalidParameterError("prompt", str(e)) from e
        eos = {t for t in [self.eos_token_id, *self.extra_stop_ids] if t is not None}
        sp = SamplingParams(n=1, max_tokens=params.max_tokens, temperature=0)
        state = RequestState(request_id, internal, text, ids, sp, StopChecker([], False), None)
        state.seqs.append(SequenceState(seq_id, 0, None))
        effective = BeamSearchParams(**{**params.__dict__, "max_tokens": core.max_tokens})
        state.beam = BeamSearchState(effective, eos, seq_id)
        self.requests[internal] = state
        self.internal_ids[request_id] = internal
        self.counters["prompt_tokens"] += len(ids)

    def _apply(self, out, sampling, tokens, sampled, result, touched) -> None:
        finished = {f.seq_id: f for f in result.finished}
        children = defaultdict(list)
        for parent, child in result.forks:
            children[parent].append(child)
        now = time.monotonic()
        slot = k_normal = 0
        for i in sampling:
            state = self.requests.get(int(out.request_ids[i]))
            k = int(out.num_samples[i])
            if state is None or state.beam is not None:  # aborted meanwhile, or beam search
                slot += k
                continue
            seq = state.seq_by_id(int(out.seq_ids[i]))
            targets = [seq]
            for j, child in enumerate(children.get(seq.seq_id, []), start=1):
                forked = seq.fork(child, seq.index + j)
                state.seqs.append(forked)
                targets.append(forked)
            for target in targets:
                self._append_token(
                    state, target, int(tokens[slot]), sampled, k_normal, finished.get(target.seq_id)
                )
                slot += 1
                k_normal += 1
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            state.metrics.last_token_time = now
            touched[state.internal_id] = state

    def _append_token(
        self, state: RequestState, seq: SequenceState, token: int, sampled, slot: int, done
    ) -> None:
        seq.output_ids.append(token)
        self.counters["generation_tokens"] += 1
        if seq.logprobs is not None:
            seq.cumulative_logprob += sampled.sampled_logprobs[slot]
            if state.params.logprobs is not None:
                seq.logprobs.append(sampled.top_logprobs[slot])
        stopped_by_token = done is not None and done.reason == "stop" and done.stop_token >= 0
        if stopped_by_token and not state.params.include_stop_str_in_output:
            delta = ""
        else:
            delta = seq.detok.add(token)
        match, emit = state.stop_checker.check(seq.detok.text, len(delta))
        seq.emitted = emit
        if match is not None:
            seq.text_end = emit
            seq.finish_reason, seq.stop_reason = "stop", match
            if done is None:
                self.scheduler.finish_sequence(seq.seq_id, "stop")
            return
        if done is not None:
            seq.finish_reason = done.reason
            # As in the OpenAI API, only a requested stop id is a stop_reason, not EOS.
            user_stop = stopped_by_token and done.stop_token in state.params.stop_token_ids
            seq.stop_reason = done.stop_token if user_stop else None
            seq.text_end = len(seq.detok.text)

    def _finish_step(self, touched: dict[int, RequestState]) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for internal, state in touched.items():
            if all(s.finished for s in state.seqs) and len(state.seqs) >= (
                1 if state.params.num_sequences == 1 else state.params.num_sequences
            ):
                state.finished = True
                state.metrics.finished_time = now
                self.requests.pop(internal, None)
                self.internal_ids.pop(state.request_id, None)
            outputs.append(state.to_output())
        return outputs


def launched_by_torchrun() -> bool:
    """torchrun (or another launcher) started one process per rank and set RANK/WORLD_SIZE."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process died; the engine cannot continue."""


def _stop_workers(workers) -> None:
    import subprocess

    for p in workers:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _read_template(value: str) -> str:
    import os

    if os.path.exists(value):
        with open(value) as f:
            return f.read()
    return value
