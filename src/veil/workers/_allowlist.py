"""The allow-list: the only operations a worker will run, by wire name.

A command names its operation by a string such as ``"torch.add"``, ``"Tensor.add_"``,
``"F.linear"``, ``"get.grad"`` or a veil function registered with
:func:`register_function` (``"veil.module_call"``). The worker looks the name up in
:data:`OPS`; anything else raises :class:`veil.CommandNotAllowed`. There is no attribute
access by arbitrary name and no code shipped as text.

The lists below are curated: arithmetic, reductions, shape and indexing operations, linear
algebra, neural-network functions and autograd. They leave out everything that reaches outside
the tensor world (files, storage pointers, hooks, serialization, ``set_``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from veil._errors import CommandNotAllowed

# Names that exist both as ``torch.<name>`` and as ``Tensor.<name>``.
_SHARED = """
abs absolute acos acosh add addbmm addcdiv addcmul addmm addmv addr all allclose amax amin
aminmax any argmax argmin argsort asin asinh atan atan2 atanh baddbmm bitwise_and bitwise_not
bitwise_or bitwise_xor bitwise_left_shift bitwise_right_shift bmm broadcast_to ceil chunk clamp
clip clone conj cos cosh count_nonzero cross cummax cummin cumprod cumsum deg2rad det diag
diag_embed diagonal diff digamma dist div divide dot eq equal erf erfc erfinv exp exp2 expm1
fix flatten flip fliplr flipud float_power floor floor_divide fmax fmin fmod frac gather gcd ge
greater greater_equal gt heaviside histc hypot i0 index_add index_copy index_fill index_put
index_select inner inverse isclose isfinite isinf isnan isneginf isposinf isreal kron kthvalue
lcm ldexp le lerp less less_equal lgamma log log10 log1p log2 logaddexp logaddexp2 logcumsumexp
logdet logical_and logical_not logical_or logical_xor logit logsumexp lt masked_fill
masked_scatter masked_select matmul matrix_power max maximum mean median min minimum mm mode
moveaxis movedim msort mul multiply mv mvlgamma nan_to_num nanmean nanmedian nanquantile
nansum narrow narrow_copy ne neg negative nextafter nonzero norm not_equal numel outer permute
pinverse polygamma positive pow prod quantile rad2deg ravel reciprocal relu remainder
renorm repeat_interleave reshape resolve_conj resolve_neg roll rot90 round rsqrt scatter
scatter_add scatter_reduce select select_scatter sgn sigmoid sign signbit sin sinc sinh
slice_scatter
slogdet softmax log_softmax sort split sqrt square squeeze std sub subtract sum swapaxes swapdims t
take take_along_dim tan tanh tensor_split tile topk trace transpose trapezoid tril triu
true_divide trunc unbind unflatten unique unique_consecutive unsqueeze var vdot vsplit hsplit
dsplit where xlogy
"""

# ``torch.<name>`` only.
_TORCH_ONLY = """
cat concat concatenate stack hstack vstack dstack column_stack row_stack einsum cdist
zeros_like ones_like full_like empty_like rand_like randn_like randint_like
conv1d conv2d conv3d conv_transpose1d conv_transpose2d max_pool1d max_pool2d avg_pool1d
dropout layer_norm batch_norm group_norm embedding cartesian_prod meshgrid broadcast_tensors
block_diag tensordot cosine_similarity pairwise_distance clamp_min clamp_max
"""

# ``Tensor.<name>`` only (methods, in-place variants and dunder operators).
_TENSOR_ONLY = """
view view_as expand expand_as contiguous float double half bfloat16 long int short bool byte char
to type_as detach detach_ requires_grad_ backward retain_grad zero_ fill_ copy_ item tolist
repeat unfold new_zeros new_ones new_full new_empty new_tensor normal_ uniform_ bernoulli_
random_ exponential_ masked_fill_ index_fill_ index_add_ index_copy_ scatter_ scatter_add_
clamp_ clamp_min clamp_max clamp_min_ clamp_max_ clip_ abs_ neg_ exp_ log_ sqrt_ sigmoid_
tanh_ relu_ add_ sub_ mul_ div_ pow_ addcmul_ addcdiv_ lerp_ fmod_ remainder_ floor_ ceil_
round_ trunc_ sign_ reciprocal_ square_ fill_diagonal_
masked_scatter_ put_ copysign sum_to_size element_size nelement dim size stride
__getitem__ __setitem__ __len__ __bool__ __float__ __int__ __index__ __neg__ __abs__
__invert__ __and__ __or__ __xor__ __lshift__ __rshift__ __rand__ __ror__ __rxor__
__iand__ __ior__ __ixor__ __ilshift__ __irshift__ __rlshift__ __rrshift__
__radd__ __rsub__ __rmul__ __rdiv__ __rtruediv__ __rfloordiv__ __rpow__ __rmatmul__
__matmul__ __mod__ __rmod__ __iadd__ __isub__ __imul__ __itruediv__ __ifloordiv__ __imod__
__ipow__ __pow__ __floordiv__ __truediv__ __div__ __add__ __sub__ __mul__ __eq__ __ne__
__lt__ __le__ __gt__ __ge__ __contains__
"""

# ``torch.nn.functional.<name>``.
_FUNCTIONAL = """
linear bilinear relu relu_ relu6 leaky_relu leaky_relu_ elu elu_ selu celu gelu silu mish
softplus softsign softshrink hardshrink tanhshrink hardtanh hardtanh_ hardswish hardsigmoid
sigmoid tanh logsigmoid softmax softmin log_softmax gumbel_softmax glu threshold threshold_
normalize pad one_hot dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d unfold fold
max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_max_pool1d
adaptive_max_pool2d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d lp_pool1d
lp_pool2d embedding embedding_bag layer_norm group_norm instance_norm batch_norm
local_response_norm rms_norm mse_loss l1_loss smooth_l1_loss huber_loss cross_entropy nll_loss
binary_cross_entropy binary_cross_entropy_with_logits kl_div poisson_nll_loss gaussian_nll_loss
hinge_embedding_loss margin_ranking_loss soft_margin_loss multilabel_soft_margin_loss
cosine_embedding_loss triplet_margin_loss multi_margin_loss cosine_similarity
pairwise_distance pixel_shuffle pixel_unshuffle interpolate upsample grid_sample affine_grid
"""

# In-place operations that change a tensor's shape would leave pointers with a stale shape.
_RESHAPING_INPLACE = frozenset({"t_", "transpose_", "squeeze_", "unsqueeze_", "swapaxes_",
                                "swapdims_", "resize_", "as_strided_", "set_"})

#: Attributes a command may read (``get.<name>``) or write (``set.<name>``).
GETTABLE = ("grad", "data", "T", "mT", "H", "mH", "real", "imag", "requires_grad", "is_leaf",
            "shape", "dtype", "ndim", "grad_fn")
SETTABLE = ("grad", "requires_grad", "data")


def _getter(name: str) -> Callable[[Any], Any]:
    def get(obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"get.{name} needs a tensor, got {type(obj).__name__}")
        value = getattr(obj, name)
        if name == "grad_fn":  # never hand out autograd internals, only whether there is one
            return value is not None
        return value

    get.__name__ = f"get_{name}"
    return get


def _setter(name: str) -> Callable[[Any, Any], None]:
    def set_(obj: Any, value: Any) -> None:
        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"set.{name} needs a tensor, got {type(obj).__name__}")
        setattr(obj, name, value)

    set_.__name__ = f"set_{name}"
    return set_


def _build() -> tuple[dict[str, Callable[..., Any]], dict[Any, str]]:
    ops: dict[str, Callable[..., Any]] = {}
    names: dict[Any, str] = {}

    def add(wire: str, fn: Any) -> None:
        ops[wire] = fn
        with contextlib.suppress(TypeError):  # unhashable callables: no reverse lookup
            names.setdefault(fn, wire)

    for name in _SHARED.split():
        for prefix, owner in (("torch.", torch), ("Tensor.", torch.Tensor)):
            fn = getattr(owner, name, None)
            if fn is not None:
                add(prefix + name, fn)
            if (prefix == "Tensor." and hasattr(torch.Tensor, name + "_")
                    and name + "_" not in _RESHAPING_INPLACE):
                add(f"Tensor.{name}_", getattr(torch.Tensor, name + "_"))
    for name in _TORCH_ONLY.split():
        fn = getattr(torch, name, None)
        if fn is not None:
            add("torch." + name, fn)
    for name in _TENSOR_ONLY.split():
        fn = getattr(torch.Tensor, name, None)
        if fn is not None:
            add("Tensor." + name, fn)
    for name in _FUNCTIONAL.split():
        fn = getattr(F, name, None)
        if fn is not None:
            add("F." + name, fn)
    for name in GETTABLE:
        ops["get." + name] = _getter(name)
        names[getattr(torch.Tensor, name).__get__] = "get." + name
    for name in SETTABLE:
        ops["set." + name] = _setter(name)
        names[getattr(torch.Tensor, name).__set__] = "set." + name
    return ops, names


#: wire name -> callable, on the worker.
OPS, _NAMES = _build()


#: Wire name -> positions of arguments whose permissions the result does not inherit.
TRAINING_DATA: dict[str, frozenset[int]] = {}


def register_function(name: str, fn: Callable[..., Any], *,
                      training_data: tuple[int, ...] = ()) -> None:
    """Put veil's own function ``fn`` on the allow-list under the wire name ``name``.

    ``training_data``: positions of arguments that ``fn`` only trains a model on, through
    autograd. Like autograd's writes to ``.grad`` everywhere in veil, what the model learns
    from them does not carry their owner's restriction (so a model trained where private
    data lives can come home; differential privacy bounds what it reveals). Every other
    argument's restriction passes to the result as usual.

    Raises:
        ValueError: ``name`` is already taken by a different function.
    """
    current = OPS.get(name)
    if current is not None and current is not fn:
        raise ValueError(f"operation name {name!r} is already registered")
    OPS[name] = fn
    _NAMES[fn] = name
    if training_data:
        TRAINING_DATA[name] = frozenset(training_data)


def wire_name(func: Any) -> str | None:
    """The wire name of a torch callable as ``__torch_function__`` receives it, or None."""
    try:
        return _NAMES.get(func)
    except TypeError:
        return None


def lookup(op: str) -> Callable[..., Any]:
    """The callable a worker runs for wire name ``op``.

    Raises:
        CommandNotAllowed: ``op`` is not on the allow-list.
    """
    fn = OPS.get(op)
    if fn is None:
        raise CommandNotAllowed(f"operation {op!r} is not on the worker's allow-list")
    return fn


def describe(func: Any) -> str:
    """A readable name for a callable, for error messages."""
    name = wire_name(func)
    if name is not None:
        return name
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    owner = getattr(func, "__self__", None)
    if owner is not None and getattr(owner, "__name__", None):
        return f"{getattr(owner, '__objclass__', type(owner)).__name__}.{owner.__name__}"
    return str(qual or func)
