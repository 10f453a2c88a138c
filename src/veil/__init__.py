"""veil: privacy-preserving deep learning on PyTorch."""

from veil import datasets, dp, fl, mpc, net
from veil._errors import (
    AuthenticationError,
    CommandNotAllowed,
    DatasetUnavailable,
    LimitExceeded,
    ObjectNotFound,
    PermissionDenied,
    PrecisionOverflow,
    PrivacyBudgetExceeded,
    ProtocolError,
    RemoteError,
    SerializationError,
    VeilError,
    WorkerMismatch,
    WorkerUnavailable,
)
from veil.net import connect
from veil.pointers import PointerTensor, call, get, move, remote_function, send
from veil.pointers._methods import install as _install_methods
from veil.workers import VirtualWorker, Worker

__version__ = "0.1.0"

_install_methods()

__all__ = [
    "AuthenticationError",
    "CommandNotAllowed",
    "DatasetUnavailable",
    "LimitExceeded",
    "ObjectNotFound",
    "PermissionDenied",
    "PointerTensor",
    "PrecisionOverflow",
    "PrivacyBudgetExceeded",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "VeilError",
    "VirtualWorker",
    "Worker",
    "WorkerMismatch",
    "WorkerUnavailable",
    "__version__",
    "call",
    "connect",
    "datasets",
    "dp",
    "fl",
    "get",
    "move",
    "mpc",
    "net",
    "remote_function",
    "send",
]
