"""Modules that can travel whole: an allow-list of ``torch.nn`` layers, described as data.

A module tree made only of these exact classes is sent as a spec (class name, constructor
arguments, children) plus its state, rebuilt on the worker, and its forward pass runs there as
one command. Any other module (a user's own ``nn.Module`` subclass) is sent parameter by
parameter and its forward runs locally on pointers, one command per torch call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from veil._errors import SerializationError


def _conv(m: Any) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels,
        "kernel_size": tuple(m.kernel_size), "stride": tuple(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
        "dilation": tuple(m.dilation), "groups": m.groups, "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _pool(m: Any) -> dict[str, Any]:
    out = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
           "ceil_mode": m.ceil_mode}
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
        out["dilation"] = m.dilation
    else:
        out["count_include_pad"] = m.count_include_pad
    return out


def _norm(m: Any) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
            "affine": m.affine, "track_running_stats": m.track_running_stats}


#: class -> function returning its constructor keyword arguments.
_SPECS: dict[type[nn.Module], Callable[[Any], dict[str, Any]]] = {
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                          "bias": m.bias is not None},
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.ReLU: lambda m: {},
    nn.ReLU6: lambda m: {},
    nn.LeakyReLU: lambda m: {"negative_slope": m.negative_slope},
    nn.ELU: lambda m: {"alpha": m.alpha},
    nn.GELU: lambda m: {"approximate": m.approximate},
    nn.SiLU: lambda m: {},
    nn.Sigmoid: lambda m: {},
    nn.Tanh: lambda m: {},
    nn.Softplus: lambda m: {"beta": m.beta, "threshold": m.threshold},
    nn.Softmax: lambda m: {"dim": m.dim},
    nn.LogSoftmax: lambda m: {"dim": m.dim},
    nn.Identity: lambda m: {},
    nn.Flatten: lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim},
    nn.Dropout: lambda m: {"p": m.p},
    nn.MaxPool1d: _pool,
    nn.MaxPool2d: _pool,
    nn.AvgPool1d: _pool,
    nn.AvgPool2d: _pool,
    nn.AdaptiveAvgPool2d: lambda m: {"output_size": m.output_size},
    nn.BatchNorm1d: _norm,
    nn.BatchNorm2d: _norm,
    nn.LayerNorm: lambda m: {"normalized_shape": tuple(m.normalized_shape), "eps": m.eps,
                             "elementwise_affine": m.elementwise_affine,
                             "bias": getattr(m, "bias", None) is not None},
    nn.Embedding: lambda m: {"num_embeddings": m.num_embeddings,
                             "embedding_dim": m.embedding_dim, "padding_idx": m.padding_idx},
    nn.Sequential: lambda m: {},
}
_BY_NAME = {cls.__name__: cls for cls in _SPECS}


def describe(module: nn.Module) -> dict[str, Any] | None:
    """The spec of ``module``, or None when any module in its tree is not allow-listed.

    Exact classes only: a subclass could override ``forward`` with code the worker must not run.
    Modules with hooks are not described either, since hooks are local code.
    """
    cls = type(module)
    if cls not in _SPECS:
        return None
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return None
    children = {}
    for name, child in module.named_children():
        spec = describe(child)
        if spec is None:
            return None
        children[name] = spec
    return {"type": cls.__name__, "args": _SPECS[cls](module), "children": children,
            "training": module.training}


def _kwargs(value: Any) -> Any:
    # tuples arrive as tuples from the wire format; lists become tuples for torch's arguments
    if isinstance(value, list):
        return tuple(value)
    return value


def build(spec: Any, depth: int = 0) -> nn.Module:
    """Rebuild a module from :func:`describe`'s spec (on the worker).

    Raises:
        SerializationError: the spec is malformed or names a class not on the allow-list.
    """
    if depth > 64:
        raise SerializationError("module spec is nested too deeply")
    if not (isinstance(spec, dict) and set(spec) == {"type", "args", "children", "training"}):
        raise SerializationError("malformed module spec")
    cls = _BY_NAME.get(spec["type"]) if isinstance(spec["type"], str) else None
    if cls is None:
        raise SerializationError(f"module type {spec['type']!r} is not on the allow-list")
    args, children = spec["args"], spec["children"]
    if not isinstance(args, dict) or not isinstance(children, dict):
        raise SerializationError("malformed module spec")
    try:
        with torch.device("meta"):
            module = cls(**{k: _kwargs(v) for k, v in args.items()})
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SerializationError(f"cannot build {cls.__name__}: {exc}") from exc
    module = module.to_empty(device="cpu")
    for name, child in children.items():
        if not isinstance(name, str) or (not name.isidentifier() and not name.isdigit()):
            raise SerializationError(f"invalid child module name {name!r}")
        module.add_module(name, build(child, depth + 1))
    module.train(bool(spec["training"]))
    return module


def is_allow_listed(module: Any) -> bool:
    """Whether ``module`` and everything in it are of allow-listed layer classes."""
    return isinstance(module, nn.Module) and all(type(m) in _SPECS for m in module.modules())


def module_call(module: Any, training: bool, *inputs: Any) -> Any:
    """Run a stored module's forward pass (the remote side of a whole-module call)."""
    if not isinstance(module, nn.Module) or type(module) not in _SPECS:
        raise TypeError("veil.module_call needs a module built from an allow-listed spec")
    if module.training != training:
        module.train(training)
    return module(*inputs)
