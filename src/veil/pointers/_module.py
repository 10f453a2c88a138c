"""Sending models to workers and bringing them home.

``model.send(worker)`` keeps the same ``nn.Module`` object on the caller's side, with every
parameter and buffer replaced by a pointer to its remote value, so that
``torch.optim.SGD(model.parameters(), ...)`` and ``model.parameters()`` work unchanged.

Two ways to run the forward pass:

* a model built only from allow-listed ``torch.nn`` layers (``nn.Sequential`` of ``Linear``,
  ``ReLU``, ``Conv2d``, ...) is rebuilt on the worker, and ``model(x)`` is **one command**;
* any other model (a user's own ``nn.Module`` subclass) runs its forward locally on the
  pointers, each torch call becoming one command. No code travels in either case.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from veil._errors import ProtocolError, WorkerMismatch
from veil.pointers import _meta
from veil.pointers._tensor import (
    _NO_DEPS,
    _SPECS,
    PointerTensor,
    _add_deps,
    _dispatch,
    _to_meta,
    _union_deps,
    _Walk,
    _wire,
)
from veil.serde import Ref
from veil.workers._base import Worker, new_id
from veil.workers._messages import (
    Batch,
    ExecuteCommand,
    FetchObject,
    StoreModule,
    StoreObject,
)
from veil.workers._modules import describe


class RemoteModule:
    """Bookkeeping of a sent module: where it went and, if whole, its remote id.

    ``meta`` is a meta-device copy of the architecture used to infer output shapes, shared
    by every module with the same ``spec_key`` (FedAvg sends the same architecture each round).
    """

    def __init__(self, worker: Worker, module_id: bytes | None, meta: nn.Module | None,
                 spec_key: Any = None):
        self.worker = worker
        self.module_id = module_id
        self.meta = meta
        self.spec_key = spec_key

    def __del__(self) -> None:
        if self.module_id is not None:
            self.worker._collect(self.module_id)


_META_MODULES: dict[Any, nn.Module] = {}


def _freeze(value: Any) -> Any:
    """A hashable form of a module spec."""
    if isinstance(value, dict):
        return tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, str, bool]]:
    """(owner module, attribute name, full name, is_parameter) for every tensor slot."""
    out = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name, p in sub._parameters.items():
            if p is not None:
                out.append((sub, name, f"{prefix}.{name}" if prefix else name, True))
        for name, b in sub._buffers.items():
            if b is not None:
                out.append((sub, name, f"{prefix}.{name}" if prefix else name, False))
    return out


def send_module(module: nn.Module, worker: Worker) -> nn.Module:
    """Send ``module`` to ``worker``; return it, its tensors now pointers (see module doc)."""
    if getattr(module, "_veil_remote", None) is not None:
        raise ProtocolError(
            f"this module is already on {module._veil_remote.worker.name}; .get() it first"
        )
    slots = _slots(module)
    values = [getattr(sub, name) for sub, name, _, _ in slots]
    if any(type(v) is PointerTensor for v in values):
        raise WorkerMismatch("this module already holds remote tensors")
    unique = {id(v) for v in values}
    spec = describe(module) if len(unique) == len(values) else None
    ids = [new_id() for _ in slots]
    if spec is not None:
        module_id = new_id()
        state = {full: v.detach() for (_, _, full, _), v in zip(slots, values)}
        worker._command(StoreModule(module_id, spec, state,
                                   {full: i for (_, _, full, _), i in zip(slots, ids)}))
        spec_key = _freeze(spec)
        meta = _META_MODULES.get(spec_key)
        if meta is None:
            if len(_META_MODULES) > 256:
                _META_MODULES.clear()
            meta = _META_MODULES[spec_key] = copy.deepcopy(module).to("meta")
        remote = RemoteModule(worker, module_id, meta, spec_key)
    else:
        # Tied tensors are sent once and share one pointer.
        seen: dict[int, bytes] = {}
        for k, v in enumerate(values):
            if id(v) in seen:
                ids[k] = seen[id(v)]
                continue
            seen[id(v)] = ids[k]
            worker._command(StoreObject(ids[k], v.detach().requires_grad_(v.requires_grad)))
        remote = RemoteModule(worker, None, None)
    pointers: dict[bytes, PointerTensor] = {}
    for (sub, name, _, is_param), v, oid in zip(slots, values, ids):
        p = pointers.get(oid)
        if p is None:
            p = pointers[oid] = PointerTensor._from_remote(
                worker, oid, v.shape, v.dtype, bool(v.requires_grad), owns=True)
        (sub._parameters if is_param else sub._buffers)[name] = p
    module._veil_remote = remote
    if spec is not None:
        module.forward = _RemoteForward(module)
    return module


class _RemoteForward:
    """The forward pass of a whole remote module: one ``veil.module_call`` command."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *inputs: Any) -> Any:
        module = self.module
        remote = module._veil_remote
        training = module.training
        worker = remote.worker
        grad = torch.is_grad_enabled()
        # Fast path: pointer inputs on the module's worker, a signature seen before (the
        # same cache key as the walk below builds).
        key = ["veil.module_call", grad, remote.spec_key, training]
        wargs = [Ref(remote.module_id), training]
        for x in inputs:
            if type(x) is not PointerTensor or x._moved_to is not None \
                    or x.location is not worker:
                break
            key.append(x._key)
            wargs.append(x._ref)
        else:
            spec = _SPECS.get(tuple(key))
            if spec is not None:
                deps = None
                if worker._predict_grads and grad:
                    deps = _deps_of((*inputs, *module.parameters()))
                return _dispatch(worker, "veil.module_call", tuple(wargs), {}, spec, deps)
        w = _Walk("veil.module_call")
        w.location = remote.worker
        w.key.append(remote.spec_key)
        w.key.append(training)
        wargs = tuple(_wire(x, w) for x in inputs)
        key = tuple(w.key)
        spec = _meta.lookup(key)
        if spec is None:
            remote.meta.train(training)
            spec = _meta.infer(remote.meta, tuple(_to_meta(x) for x in inputs), {})
            if spec == _meta.UNKNOWN:
                # Run the real thing to get the error message the user needs.
                _meta.spec_of(remote.meta(*(_to_meta(x) for x in inputs)))
            _meta.remember(key, spec)
        if remote.worker._predict_grads and w.deps is not None and torch.is_grad_enabled():
            # Every allow-listed layer uses all of its parameters in its forward.
            for p in module.parameters():
                if p.requires_grad:
                    _add_deps(w, p._deps)
        else:
            w.deps = None
        return _dispatch(remote.worker, "veil.module_call",
                         (Ref(remote.module_id), training, *wargs), {}, spec, w.deps)


def _deps_of(tensors: tuple[Any, ...]) -> frozenset[bytes] | None:
    """Union of the leaf dependencies of the pointers among ``tensors`` that require grad."""
    deps: frozenset[bytes] | None = _NO_DEPS
    for t in tensors:
        if type(t) is PointerTensor and t._key[2]:
            deps = _union_deps(deps, t._deps)
    return deps


def get_module(module: nn.Module) -> nn.Module:
    """Bring a sent module home: fetch its tensors, restore plain parameters, return it."""
    remote = getattr(module, "_veil_remote", None)
    if remote is None:
        raise ProtocolError("this module was not sent anywhere; nothing to get")
    slots = _slots(module)
    pointers = [getattr(sub, name) for sub, name, _, _ in slots]
    worker = remote.worker
    values = worker._request(Batch([FetchObject(p.id) for p in pointers]))
    fetched = []
    for p, reply in zip(pointers, values):
        fetched.append(_unwrap(reply, worker, p))
    restored: dict[int, torch.Tensor] = {}
    for (sub, name, _, is_param), p, value in zip(slots, pointers, fetched):
        if id(p) in restored:
            (sub._parameters if is_param else sub._buffers)[name] = restored[id(p)]
            continue
        new = nn.Parameter(value, requires_grad=p.requires_grad) if is_param else value
        restored[id(p)] = new
        (sub._parameters if is_param else sub._buffers)[name] = new
    if "forward" in module.__dict__:
        del module.forward
    module._veil_remote = None
    return module


def _unwrap(reply: Any, worker: Worker, p: PointerTensor) -> torch.Tensor:
    from veil.workers._base import raise_error
    from veil.workers._messages import ErrorReply, Reply

    if type(reply) is ErrorReply:
        raise_error(reply, worker.name)
    if type(reply) is not Reply or not isinstance(reply.value, torch.Tensor):
        raise ProtocolError(f"worker {worker.name} sent no tensor for {p!r}")
    return reply.value


def run_module(module: nn.Module, *inputs: Any) -> Any:
    """Call a sent module (same as ``module(*inputs)``); for symmetry with remote functions."""
    return module(*inputs)


__all__ = ["ExecuteCommand", "get_module", "send_module"]
