"""Forwards recorded as operator calls and replayed: the CPU's CUDA graphs.

A decode step of a small batch spends much of its time in Python around a
few hundred small kernels: module calls, argument handling, allocations. A
capture runs the forward once and records every operator call with its
arguments; a replay calls the same operators on the same buffers and skips
the rest. Buffers allocated during the capture are kept and reused, and
views of fixed buffers are taken once, so a replay allocates only what the
functional operators return. Runs of consecutive tokenmill CPU ops become one
program, loaded once into native code and run by one `run_loaded_program`
call per replay, which loops over them in C++.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tokenmill.ops import OP_NAMES  # a program's numbering of the ops

aten = torch.ops.aten
_ALLOCATORS = {
    aten.empty.memory_format,
    aten.empty_like.default,
    aten.empty_strided.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
}


class GraphCaptureError(RuntimeError):
    """The forward does something that a replay could not repeat."""


class _Recorder(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing here runs under torch.compile; torch's wrapper that would
        # keep dynamo out of __torch_dispatch__ imports torch._dynamo on the
        # first capture, a second of start-up.
        return False

    def __init__(self):
        super().__init__()
        # (op, args, kwargs, [(where in args or kwargs, slot)], [(output index, slot)])
        self.calls = []
        self.values: list[torch.Tensor] = []  # by slot, kept alive so that ids stay unique
        self.fixed: list[bool] = []  # by slot: the same tensor on every replay
        self.slot_of: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})  # a replay rebinds its values
        if func is aten._local_scalar_dense.default:
            raise GraphCaptureError("the forward reads a tensor's value in Python")
        out = func(*args, **kwargs)
        args = [list(a) if isinstance(a, (list, tuple)) else a for a in args]
        refs = [(i, self.slot_of[id(a)]) for i, a in enumerate(args) if self._recorded(a)]
        refs += [(k, self.slot_of[id(v)]) for k, v in kwargs.items() if self._recorded(v)]
        refs += [
            ((i, j), self.slot_of[id(x)])
            for i, a in enumerate(args)
            if isinstance(a, list)
            for j, x in enumerate(a)
            if self._recorded(x)
        ]
        single = not isinstance(out, (list, tuple))
        fixed = func in _ALLOCATORS or (
            all(self.fixed[s] for _, s in refs) and _is_view_of(func, args, out, single)
        )
        outs = [
            (None if single else i, self._add(t, fixed))
            for i, t in enumerate([out] if single else out)
            if isinstance(t, torch.Tensor)
        ]
        if not fixed:  # arguments that are fixed buffers stay in args as they are
            refs = [(where, s) for where, s in refs if not self.fixed[s]]
            self.calls.append((func, args, kwargs, refs, outs))
        return out

    def _recorded(self, x) -> bool:
        return isinstance(x, torch.Tensor) and id(x) in self.slot_of

    def _add(self, t: torch.Tensor, fixed: bool) -> int:
        self.slot_of[id(t)] = len(self.values)
        self.values.append(t)
        self.fixed.append(fixed)
        return len(self.values) - 1


def _is_view_of(func, args, out, single: bool) -> bool:
    """Whether the call returned views of its first argument. Some operators
    that may alias (reshape) copy when they cannot."""
    if not func.is_view or not args or not isinstance(args[0], torch.Tensor):
        return False
    base = args[0].untyped_storage().data_ptr()
    outs = [out] if single else out
    return all(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == base for t in outs)


class OpGraph:
    """One forward, captured by `capture(fn)` and repeated by `replay()`.

    Inputs are whatever tensors fn reads from outside (static buffers the
    caller refills in place, weights, the KV cache); the output is fn's
    return value, which a replay overwrites or returns anew.
    """

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        recorder = _Recorder()
        # Under inference mode some reads of a value (.item()) bypass the
        # dispatcher, and the recorder could not see them.
        with torch.inference_mode(False), torch.no_grad(), recorder:
            out = fn()
        if not recorder._recorded(out):
            raise GraphCaptureError("the forward's output is not made by a recorded operator")
        self.calls = _programs(recorder.calls)
        loaded = [args[0] for func, args, *_ in self.calls if func is _RUN_LOADED]
        # At exit the process frees them anyway, perhaps after the library.
        weakref.finalize(self, _unload, loaded).atexit = False
        self.out_slot = recorder.slot_of[id(out)]
        # Results of recorded calls are made afresh by each replay; only the
        # fixed buffers and views stay.
        self.values = [
            v if f else None for v, f in zip(recorder.values, recorder.fixed, strict=True)
        ]
        return out

    def replay(self) -> torch.Tensor:
        values = self.values
        for func, args, kwargs, refs, outs in self.calls:
            for where, slot in refs:
                if type(where) is int:
                    args[where] = values[slot]
                elif type(where) is str:
                    kwargs[where] = values[slot]
                else:  # (argument, element) of a list argument
                    args[where[0]][where[1]] = values[slot]
            result = func(*args, **kwargs)
            for i, slot in outs:
                values[slot] = result if i is None else result[i]
        return values[self.out_slot]


_RUN_LOADED = torch.ops.tokenmill.run_loaded_program.default


def _unload(programs: list[int]) -> None:
    for program in programs:
        torch.ops.tokenmill.unload_program(program)


def _program_op(func) -> int | None:
    """A program's number for a tokenmill CPU op, else None."""
    name = func.name()
    if not name.startswith("tokenmill::") or func._overloadname != "default":
        return None
    name = name.split("::", 1)[1]
    return OP_NAMES.index(name) if name in OP_NAMES else None


def _on_cpu(args) -> bool:
    return all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor))


def _programs(calls: list) -> list:
    """The calls with each run of two or more consecutive tokenmill CPU ops
    merged into one loaded program."""
    merged, run = [], []
    for call in calls:
        func, args = call[0], call[1]
        if _program_op(func) is not None and not call[4] and _on_cpu(args):
            run.append(call)
            continue
        merged += _program(run) if len(run) > 1 else run
        merged.append(call)
        run = []
    return merged + (_program(run) if len(run) > 1 else run)


def _program(run: list) -> list:
    tensors, index, code, floats, refs = [], {}, [], [], []

    def tensor(t, slot) -> int:
        if id(t) not in index:
            index[id(t)] = len(tensors)
            tensors.append(t)
            if slot is not None:  # made by each replay: bound then
                refs.append(((0, index[id(t)]), slot))
        return index[id(t)]

    for func, args, kwargs, call_refs, _ in run:
        slot_at = dict(call_refs)
        code.append(_program_op(func))
        for i, arg in enumerate(func._schema.arguments):
            if i < len(args):
                value, slot = args[i], slot_at.get(i)
            else:
                value = kwargs.get(arg.name, arg.default_value)
                slot = slot_at.get(arg.name)
            kind = str(arg.type)
            if value is None:
                code.append(-1)
            elif isinstance(value, torch.Tensor):
                code.append(tensor(value, slot))
            elif kind == "float":
                floats.append(float(value))
            elif kind in ("int", "bool"):
                code.append(int(value))
            else:
                raise GraphCaptureError(f"{func}: argument {arg.name} of type {kind}")
    # The program stays loaded natively; a replay binds only the tensors
    # that each replay makes anew, in their slots.
    program = torch.ops.tokenmill.load_program(tensors, code, floats)
    slots = [index for (_, index), _ in refs]
    bound = [tensors[i] for i in slots]
    refs = [((1, j), slot) for j, (_, slot) in enumerate(refs)]
    return [(_RUN_LOADED, [program, bound, slots], {}, refs, [])]
