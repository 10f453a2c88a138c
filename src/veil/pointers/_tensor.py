"""PointerTensor: a local stand-in for a tensor that lives on a worker.

A pointer is a ``torch.Tensor`` wrapper subclass on the meta device: it reports the remote
tensor's shape, dtype and ``requires_grad``, so torch code (``nn.Module``, optimizers)
accepts it, but it holds no data. Its ``__torch_function__`` turns every torch call into one
command for the worker that holds the arguments; the call runs there for real, autograd
included, and returns pointers to its results.

Commands are pipelined: their results are named by the caller (fresh 128-bit ids), so nothing
waits for the worker until a value is needed (``.get()``, a Python scalar, a search). The
first error of a pipelined command surfaces then, naming the failing operation.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from veil._errors import CommandNotAllowed, ProtocolError, SerializationError, WorkerMismatch
from veil.pointers import _meta
from veil.serde import GradRef, Ref
from veil.workers._allowlist import describe, register_function, wire_name
from veil.workers._base import Worker, new_id
from veil.workers._messages import DeleteObjects, FetchObject, Query

_DISABLE = torch._C.DisableTorchFunctionSubclass
_make_wrapper = torch.Tensor._make_wrapper_subclass
_META = torch.device("meta")


def _clear_grads(tensors: tuple[Any, ...]) -> None:
    """Set ``.grad`` to None on each tensor (the remote side of a coalesced ``zero_grad``)."""
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError("veil.clear_grads needs tensors")
        t.grad = None


register_function("veil.clear_grads", _clear_grads)


def _seq_item(seq: Any, index: int) -> Any:
    """The ``index``-th result of a command whose result was a sequence (on the worker)."""
    if not isinstance(seq, (tuple, list)) or type(index) is not int:
        raise TypeError("veil.seq_item needs a tuple or list and an int")
    return seq[index]


register_function("veil.seq_item", _seq_item)


class PointerTensor(torch.Tensor):
    """A tensor that lives on ``location`` under ``id``; torch calls on it run there.

    Create one with ``tensor.send(worker)``; use ``.get()`` to bring the value home (if the
    worker's owner allows it), ``.move(other)`` to send it worker to worker and ``.copy()``
    for a second remote copy. A pointer that is garbage collected deletes its remote object.
    """

    location: Worker
    id: bytes
    # Defaults read from the class until an instance sets its own (a pointer is created per
    # command result, and each attribute set on a tensor costs).
    _has_grad: bool = False
    _grad_ptr: PointerTensor | None = None
    _moved_to: Worker | None = None

    @staticmethod
    def __new__(cls, *args: Any, **kwargs: Any) -> PointerTensor:
        raise TypeError("create pointers with tensor.send(worker), not PointerTensor(...)")

    @classmethod
    def _from_remote(cls, location: Worker, oid: bytes, shape: torch.Size, dtype: torch.dtype,
                     requires_grad: bool, *, owns: bool, is_leaf: bool = True,
                     ref: Ref | GradRef | None = None) -> PointerTensor:
        p = _make_wrapper(cls, shape, dtype=dtype, device=_META, requires_grad=requires_grad)
        p.location = location
        p.id = oid
        p._ref = ref if ref is not None else Ref(oid)
        p._owns = owns
        p._is_leaf = is_leaf
        p._key = (shape, dtype, requires_grad)  # read without going through torch
        if requires_grad and is_leaf and type(p._ref) is Ref:
            location._leaves.add(oid, p)
            p._deps = frozenset((oid,))
        else:
            # The leaves whose .grad a backward from here reaches (None: not known).
            p._deps = None if requires_grad else _NO_DEPS
        return p

    # ------------------------------------------------------------------ Python protocol

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        where = self._moved_to.name + " (moved)" if self._moved_to else self.location.name
        grad = ", grad of" if type(self._ref) is GradRef else ""
        return (f"PointerTensor(location={where}{grad}, id={self.id.hex()[:12]}, "
                f"shape={tuple(self.shape)}, dtype={self.dtype}"
                + (", requires_grad=True" if self.requires_grad else "") + ")")

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    def __del__(self) -> None:
        if getattr(self, "_owns", False):
            self._owns = False
            self.location._collect(self.id)

    def __deepcopy__(self, memo: dict[int, Any]) -> PointerTensor:
        return self.copy()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("pointers cannot be pickled; veil never uses pickle")

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise CommandNotAllowed(
            f"{func} reached a PointerTensor below torch-function level; "
            "this operation cannot run on a remote tensor"
        )

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        try:
            route = _ROUTES.get(func)
        except TypeError:  # an unhashable callable
            route = None
        if route is None:
            route = _route(func)
        kind, target = route
        if kind is _HANDLER:
            return target(func, args, kwargs or {})
        if kind is _INPLACE_OP:
            return _call_inplace(target, args, kwargs or {})
        return run_remote(target, func, args, kwargs or {}, tracked=True)

    # Metadata is answered from Python attributes: these are read dozens of times per
    # optimizer step, and a property costs a fraction of a torch-function round trip.

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return self._key[0]

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self._key[1]

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        return self._key[2]

    @requires_grad.setter
    def requires_grad(self, flag: bool) -> None:
        _requires_grad_(None, (self, flag), {})

    @property
    def is_leaf(self) -> bool:  # type: ignore[override]
        return self._is_leaf

    @property
    def is_sparse(self) -> bool:  # type: ignore[override]
        return False

    @property
    def grad(self) -> PointerTensor | None:  # type: ignore[override]
        """A pointer to the remote ``.grad``, or None if the worker has none."""
        # Read four times per parameter per optimizer step: the cached pointer inline.
        if not self._has_grad:
            return None
        g = self._grad_ptr
        return g if g is not None else _get_grad(None, (self,), {})

    @grad.setter
    def grad(self, value: Any) -> None:
        if value is None:  # zero_grad's set_to_none, inline
            if self._has_grad:
                self.location._grad_clears.append(self._ref)  # coalesced into one command
                self._has_grad = False
            return
        _set_grad(None, (self, value), {})

    # ------------------------------------------------------------------ veil API

    def _check_usable(self) -> None:
        if self._moved_to is not None:
            raise ProtocolError(
                f"this pointer's value was moved to {self._moved_to.name}; use the pointer "
                "that .move() returned"
            )

    def get(self) -> torch.Tensor:
        """Bring the value home.

        Raises:
            veil.PermissionDenied: the value is (or was computed from) private data whose owner
                did not allow this requester.
        """
        self._check_usable()
        value = self.location._request(FetchObject(self.id, type(self._ref) is GradRef))
        if value is None:
            raise ProtocolError("the remote value is None (a .grad that was never computed?)")
        return value

    def move(self, worker: Worker) -> PointerTensor:
        """Send the value from its worker straight to ``worker``; return the new pointer.

        The value does not pass through the caller. Permissions travel with it. This pointer
        is unusable afterwards (unless the value is data its worker hosts, which stays).
        """
        self._check_usable()
        if not isinstance(worker, Worker):
            raise TypeError(f"move() needs a worker, got {type(worker).__name__}")
        if worker is self.location:
            return self
        if type(self._ref) is GradRef:
            raise ProtocolError("a .grad cannot be moved; .copy() it first")
        nid = new_id()
        self.location._move_object(self.id, worker, nid)
        moved = PointerTensor._from_remote(worker, nid, *self._key, owns=True)
        if self._owns:
            self._owns = False
            self._moved_to = worker
        return moved

    def copy(self) -> PointerTensor:
        """A second remote copy of the value, on the same worker."""
        self._check_usable()
        with torch.no_grad():
            out = call("Tensor.clone", torch.Tensor.clone, (self,), {})
        if self.requires_grad:
            out.requires_grad_(True)
        return out

    def send(self, worker: Worker) -> PointerTensor:
        """Pointers are already remote: use :meth:`move` (or ``.copy().move()``)."""
        raise TypeError(
            f"this tensor is already on {self.location.name}; use .move({worker!r}) to send it "
            "worker to worker, or .copy().move(...) to keep it here too"
        )


# ---------------------------------------------------------------------- commands


_NO_DEPS: frozenset[bytes] = frozenset()
_SIMPLE = frozenset({int, float, bool, type(None), str})
_SPECS = _meta._CACHE


class _Walk:
    __slots__ = ("deps", "key", "location", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.location: Worker | None = None
        self.key: list[Any] = [name, torch.is_grad_enabled()]
        #: Union of the arguments' leaf dependencies (None once one is unknown).
        self.deps: frozenset[bytes] | None = _NO_DEPS


def _union_deps(acc: frozenset[bytes] | None, deps: frozenset[bytes] | None
                ) -> frozenset[bytes] | None:
    """Leaf dependencies ``acc`` joined with ``deps`` (None, "not known", absorbs)."""
    if acc is None or deps is None:
        return None
    return acc | deps if acc and deps else acc or deps


def _add_deps(w: _Walk, deps: frozenset[bytes] | None) -> None:
    w.deps = _union_deps(w.deps, deps)


def _wire(a: Any, w: _Walk) -> Any:
    t = type(a)
    if t is PointerTensor:
        if a._moved_to is not None:
            a._check_usable()
        loc = a.location
        if w.location is None:
            w.location = loc
        elif loc is not w.location:
            raise WorkerMismatch(
                f"{w.name}: arguments live on different workers ({w.location.name} and "
                f"{loc.name}); bring them together with .move() first"
            )
        w.key.append(a._key)
        if a._key[2]:
            _add_deps(w, a._deps)
        return a._ref
    if t is tuple or t is list:
        w.key.append(t)
        out = t(_wire(x, w) for x in a)
        w.key.append(len(a))
        return out
    if isinstance(a, torch.Tensor):
        if t is not torch.Tensor and t is not torch.nn.Parameter:
            raise WorkerMismatch(
                f"{w.name}: cannot combine a remote tensor with a local {t.__name__}"
            )
        # A local tensor travels inside the command as a value (the caller's own data).
        w.key.append(("local", a.shape, a.dtype))
        return a.detach().clone()
    if t is slice:
        w.key.append((slice, a.start, a.stop, a.step))
        return a
    if t is dict:
        raise SerializationError(f"{w.name}: dict arguments are not supported")
    w.key.append((t, a))
    return a


def _to_meta(a: Any) -> Any:
    if type(a) is PointerTensor:
        return _meta.meta_tensor(*a._key)
    if type(a) is tuple or type(a) is list:
        return type(a)(_to_meta(x) for x in a)
    if isinstance(a, torch.Tensor):
        return torch.empty(a.shape, dtype=a.dtype, device="meta")
    return a


def _inplace(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("Tensor.__i") \
        or name == "Tensor.__setitem__"


_HANDLER, _INPLACE_OP, _REMOTE = "handler", "inplace", "remote"
#: torch callable -> (kind, handler or wire name): what ``__torch_function__`` does with it,
#: decided once per callable.
_ROUTES: dict[Any, tuple[str, Any]] = {}


def _route(func: Any) -> tuple[str, Any]:
    handler = _HANDLERS.get(func)
    if handler is not None:
        route: tuple[str, Any] = (_HANDLER, handler)
    else:
        name = wire_name(func)
        if name is None:
            raise CommandNotAllowed(
                f"{describe(func)} is not on the allow-list of operations that can run on a "
                "worker"
            )
        route = (_INPLACE_OP if _inplace(name) else _REMOTE, name)
    with contextlib.suppress(TypeError):  # an unhashable callable is routed every time
        _ROUTES[func] = route
    return route


def call(name: str, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """Run the allow-listed ``func`` (wire name ``name``) where its pointer arguments live."""
    if _inplace(name):
        return _call_inplace(name, args, kwargs)
    return run_remote(name, func, args, kwargs, tracked=True)


def run_remote(name: str, shape_fn: Any, args: Any, kwargs: dict[str, Any],
               location: Worker | None = None, *, tracked: bool = False) -> Any:
    """Send command ``name`` to where its pointer arguments live (or to ``location``).

    ``shape_fn`` run on meta tensors gives the results' shapes, cached per signature.
    ``tracked``: ``name`` is a torch operation whose differentiable results depend, through
    autograd, on exactly its arguments (not so for a user's remote function, which may reach
    other objects): the results then know which leaves a backward from them reaches.
    """
    # Fast path, the usual torch call: top-level pointers and Python scalars, a signature
    # seen before. It builds the same cache key as the general walk below, without the walk.
    loc = location
    key = [name, torch.is_grad_enabled()]
    wargs = []
    deps: frozenset[bytes] | None = _NO_DEPS
    for a in args:
        t = type(a)
        if t is PointerTensor and a._moved_to is None:
            where = a.location
            if loc is None:
                loc = where
            elif where is not loc:
                break
            k = a._key
            key.append(k)
            if k[2]:
                deps = _union_deps(deps, a._deps)
            wargs.append(a._ref)
        elif t in _SIMPLE:
            key.append((t, a))
            wargs.append(a)
        elif (t is list or t is tuple) and _SIMPLE.issuperset(map(type, a)):
            # A flat list of Python scalars (dims, a shape): the key entries the walk makes.
            key.append(t)
            key.extend([(type(x), x) for x in a])
            key.append(len(a))
            wargs.append(t(a))
        else:
            break
    else:
        for k, v in kwargs.items():
            t = type(v)
            if t not in _SIMPLE:
                break
            key.append(k)
            key.append((t, v))
        else:
            if loc is not None:
                spec = _SPECS.get(tuple(key))
                if spec is not None:
                    return _dispatch(loc, name, tuple(wargs), kwargs, spec,
                                     deps if tracked else None)
    w = _Walk(name)
    w.location = location
    wargs = tuple([_wire(a, w) for a in args])
    wkwargs = {}
    for k, v in kwargs.items():
        w.key.append(k)
        wkwargs[k] = _wire(v, w)
    loc = w.location
    if loc is None:
        raise WorkerMismatch(f"{name}: no argument is a pointer at the top level")
    key = tuple(w.key)
    try:
        spec = _meta.lookup(key)
    except TypeError:  # an unhashable argument: no caching for this call
        key, spec = None, None
    if spec is None:
        spec = _meta.infer(shape_fn, tuple(_to_meta(a) for a in args),
                           {k: _to_meta(v) for k, v in kwargs.items()})
        if key is not None and spec is not None:
            _meta.remember(key, spec)
    return _dispatch(loc, name, wargs, wkwargs, spec, w.deps if tracked else None)


def _call_inplace(name: str, args: Any, kwargs: dict[str, Any]) -> Any:
    """In-place operations keep their first argument's shape: no meta inference needed.

    This is the optimizer's hot path (``param.add_(grad, alpha=-lr)``), so the common case of
    pointers and Python scalars is handled inline and anything else by the general walk.
    """
    loc = args[0].location if type(args[0]) is PointerTensor else None
    if loc is not None and loc._inplace_here(name, args, kwargs):
        if torch.is_grad_enabled():
            _inplace_deps(args, kwargs)
        return None if name == "Tensor.__setitem__" else args[0]
    loc = None
    wargs = []
    for a in args:
        t = type(a)
        if t is PointerTensor and a._moved_to is None:
            if loc is None:
                loc = a.location
            elif a.location is not loc:
                break
            wargs.append(a._ref)
        elif t in _SIMPLE:
            wargs.append(a)
        else:
            break
    else:
        simple = True
        for v in kwargs.values():
            if type(v) not in _SIMPLE:
                simple = False
                break
        if loc is not None and simple:
            loc._run(name, tuple(wargs), kwargs, None)
            if torch.is_grad_enabled():
                _inplace_deps(args, kwargs)
            return None if name == "Tensor.__setitem__" else args[0]
    w = _Walk(name)
    wargs = [_wire(a, w) for a in args]
    wkwargs = {k: _wire(v, w) for k, v in kwargs.items()} if kwargs else {}
    loc = w.location
    if loc is None:
        raise WorkerMismatch(f"{name}: no argument is a pointer at the top level")
    loc._run(name, tuple(wargs), wkwargs, None)
    if torch.is_grad_enabled():
        _inplace_deps(args, kwargs)
    return None if name == "Tensor.__setitem__" else args[0]


def _inplace_deps(args: Any, kwargs: dict[str, Any]) -> None:
    """An in-place op under autograd: its target now also depends on the other arguments."""
    target = args[0]
    if type(target) is not PointerTensor:
        return
    deps: frozenset[bytes] | None = _NO_DEPS
    for a in (*args, *kwargs.values()):
        if type(a) is PointerTensor and a._key[2]:
            deps = _union_deps(deps, a._deps)
        elif isinstance(a, (tuple, list)):
            deps = None  # nested pointers: not followed
    target._deps = _union_deps(target._deps, deps)


_TensorSpec = _meta.TensorSpec
_SeqSpec = _meta.SeqSpec


def _result_pointer(loc: Worker, rid: bytes, spec: Any, deps: frozenset[bytes] | None
                    ) -> PointerTensor:
    """The pointer to a command's result ``rid`` of TensorSpec ``spec``: what
    ``PointerTensor._from_remote`` makes for a computed (non-leaf) result, with fewer steps
    (one or more per command)."""
    rg = spec[2]
    p = _make_wrapper(PointerTensor, spec[0], dtype=spec[1], device=_META, requires_grad=rg)
    p.location = loc
    p.id = rid
    p._ref = Ref(rid)
    p._owns = True
    p._is_leaf = not rg
    p._key = spec  # a TensorSpec is the (shape, dtype, requires_grad) tuple
    p._deps = deps if rg else _NO_DEPS
    return p


def _dispatch(loc: Worker, name: str, wargs: tuple[Any, ...], wkwargs: dict[str, Any],
              spec: Any, deps: frozenset[bytes] | None = None) -> Any:
    if spec is None:
        loc._run(name, wargs, wkwargs, None)
        return None
    if type(spec) is _TensorSpec:
        rid = new_id()
        loc._run(name, wargs, wkwargs, rid)
        return _result_pointer(loc, rid, spec, deps)
    if type(spec) is _SeqSpec:
        items = spec.items
        rids = tuple([new_id() for _ in items])
        loc._run(name, wargs, wkwargs, rids)
        ptrs = [_result_pointer(loc, rid, s, deps) for rid, s in zip(rids, items)]
        kind = spec.kind
        return ptrs if kind is list else tuple(ptrs) if kind is tuple else kind(ptrs)
    rid = new_id()
    loc._run(name, wargs, wkwargs, rid)
    if spec == _meta.VALUE:
        return _fetch_value(loc, rid)
    return _resolve_unknown(loc, rid)


def _fetch_value(loc: Worker, rid: bytes) -> Any:
    try:
        return loc._request(FetchObject(rid))
    finally:
        loc._command(DeleteObjects((rid,)))


def _resolve_unknown(loc: Worker, rid: bytes) -> Any:
    """Ask the worker what a command produced (ops whose result shape depends on data)."""
    (meta,) = loc._request(Query("meta", (rid,)))
    if meta is None:
        return _fetch_value(loc, rid)
    if meta[0] == "seq":
        out = []
        for i, item in enumerate(meta[1]):
            iid = new_id()
            loc._run("veil.seq_item", (Ref(rid), i), {}, iid)
            if item is None:
                out.append(_fetch_value(loc, iid))
            else:
                shape, dtype, rg, leaf = item
                out.append(PointerTensor._from_remote(loc, iid, torch.Size(shape), dtype, rg,
                                                      owns=True, is_leaf=leaf))
        loc._command(DeleteObjects((rid,)))
        return tuple(out)
    shape, dtype, rg, leaf = meta
    return PointerTensor._from_remote(loc, rid, torch.Size(shape), dtype, rg, owns=True,
                                      is_leaf=leaf)


# ---------------------------------------------------------------------- special handlers


def _local(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    with _DISABLE():
        return func(*args, **kwargs)


def _is_leaf(func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    return args[0]._is_leaf


def _shape(func: Any, args: Any, kwargs: dict[str, Any]) -> torch.Size:
    return args[0]._key[0]


def _dtype(func: Any, args: Any, kwargs: dict[str, Any]) -> torch.dtype:
    return args[0]._key[1]


def _requires_grad(func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    return args[0]._key[2]


def _get_grad(func: Any, args: Any, kwargs: dict[str, Any]) -> PointerTensor | None:
    p = args[0]
    if not p._has_grad:
        return None
    g = p._grad_ptr
    if g is None:
        g = PointerTensor._from_remote(p.location, p.id, p._key[0], p._key[1], False,
                                       owns=False, ref=GradRef(p.id))
        g._base_ptr = p
        p._grad_ptr = g
    return g


def _set_grad(func: Any, args: Any, kwargs: dict[str, Any]) -> None:
    p, value = args
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(f"grad must be a tensor or None, got {type(value).__name__}")
    if value is None:
        if p._has_grad:
            p.location._defer_grad_clear(p._ref)  # zero_grad: coalesced into one command
        p._has_grad = False
        return
    if value is p._grad_ptr:
        return
    call("set.grad", torch.Tensor.grad.__set__, (p, value), {})
    p._has_grad = True


def _set_requires_grad(p: PointerTensor, flag: bool) -> None:
    with _DISABLE():
        torch.Tensor.requires_grad_(p, flag)
    p._key = (p._key[0], p._key[1], flag)
    if flag and p._is_leaf and type(p._ref) is Ref:
        p.location._leaves.add(p.id, p)
        p._deps = frozenset((p.id,))
    elif not flag:
        p._deps = _NO_DEPS


def _requires_grad_(func: Any, args: Any, kwargs: dict[str, Any]) -> PointerTensor:
    p = args[0]
    flag = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
    p.location._run("Tensor.requires_grad_", (p._ref, bool(flag)), {}, None)
    _set_requires_grad(p, bool(flag))
    return p


def _set_requires_grad_attr(func: Any, args: Any, kwargs: dict[str, Any]) -> None:
    _requires_grad_(func, args, kwargs)


def _backward(func: Any, args: Any, kwargs: dict[str, Any]) -> None:
    p = args[0]
    loc = p.location
    simple = len(args) == 1 and p._moved_to is None
    if simple:
        for v in kwargs.values():
            if type(v) not in _SIMPLE:
                simple = False
                break
    if simple:  # ``loss.backward()``: torch passes its defaults as keywords
        loc._run("Tensor.backward", (p._ref,), kwargs, None)
    else:
        w = _Walk("Tensor.backward")
        wargs = tuple(_wire(a, w) for a in args)
        wkwargs = {k: _wire(v, w) for k, v in kwargs.items()}
        loc._run("Tensor.backward", wargs, wkwargs, None)
    # backward(gradient, retain_graph, create_graph, inputs): with ``inputs`` only some
    # leaves receive a gradient, so the worker is asked.
    if loc._predict_grads and p._deps is not None and len(args) < 5 \
            and kwargs.get("inputs") is None:
        _predict_grads(loc, p._deps)
        loc._push()
    else:
        refresh_grads(loc)


def refresh_grads(loc: Worker) -> None:
    """Learn which leaf pointers on ``loc`` now have a ``.grad`` (one round trip)."""
    loc._refresh_grads()


def _predict_grads(loc: Worker, deps: frozenset[bytes]) -> None:
    """Mark which leaves on ``loc`` have a ``.grad`` after a backward that reaches ``deps``.

    No round trip: autograd gives a gradient to every leaf the graph reaches and leaves the
    others' as they were, and each pointer knows the leaves its value was computed from. A
    pipelined ``veil.expect_grads`` makes the worker check the prediction, so a wrong one
    (a bug) fails loudly at the next flush instead of skipping a parameter's update.
    """
    with_grad, without = [], []
    for oid, leaf in loc._leaves.items():
        if leaf._moved_to is not None:
            continue
        flag = leaf._has_grad or oid in deps
        leaf._has_grad = flag
        (with_grad if flag else without).append(leaf._ref)
    loc._run("veil.expect_grads", (tuple(with_grad), tuple(without)), {}, None)


def _expect_grads(with_grad: Any, without: Any) -> None:
    """Check (on the worker) that exactly the predicted tensors have a ``.grad``."""
    for tensors, expected in ((with_grad, True), (without, False)):
        if not isinstance(tensors, tuple) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("veil.expect_grads needs two tuples of tensors")
        wrong = sum((t.grad is not None) != expected for t in tensors)
        if wrong:
            raise ProtocolError(
                f"after backward, {wrong} tensor(s) {'lack' if expected else 'have'} a .grad "
                "that the caller's prediction says they should "
                f"{'have' if expected else 'not have'}; this is a bug in veil, please report it"
            )


register_function("veil.expect_grads", _expect_grads)


def _iter(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    p = args[0]
    if p.dim() == 0:
        raise TypeError("iteration over a 0-d tensor")
    return iter(p.unbind(0))


def _build_handlers() -> dict[Any, Any]:
    T = torch.Tensor
    handlers: dict[Any, Any] = {}
    for name in ("size", "dim", "numel", "nelement", "element_size", "__len__", "__hash__",
                 "is_floating_point", "is_complex", "stride", "get_device", "is_contiguous",
                 "ndimension", "type"):
        handlers[getattr(T, name)] = _local
    for fn in (torch.is_complex, torch.is_floating_point, torch.numel, torch.is_conj,
               torch.is_neg, torch.is_inference):
        handlers[fn] = _local
    for name in ("shape", "dtype", "device", "ndim", "layout", "is_sparse", "is_cuda",
                 "is_meta", "is_quantized", "is_mkldnn", "is_nested", "names", "requires_grad",
                 "is_cpu", "itemsize", "nbytes", "output_nr", "_version", "is_sparse_csr",
                 "is_xpu", "is_mps", "is_mtia"):
        attr = getattr(T, name, None)
        if attr is not None and hasattr(attr, "__get__"):
            handlers[attr.__get__] = _local
    handlers[T.is_leaf.__get__] = _is_leaf
    handlers[T.shape.__get__] = _shape
    handlers[T.dtype.__get__] = _dtype
    handlers[T.requires_grad.__get__] = _requires_grad
    handlers[T.grad.__get__] = _get_grad
    handlers[T.grad.__set__] = _set_grad
    handlers[T.requires_grad.__set__] = _set_requires_grad_attr
    handlers[T.requires_grad_] = _requires_grad_
    handlers[T.backward] = _backward
    handlers[T.__iter__] = _iter
    return handlers


_HANDLERS = _build_handlers()
