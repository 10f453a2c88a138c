"""veil: privacy-preserving deep learning on PyTorch."""

from veil import datasets
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

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "CommandNotAllowed",
    "DatasetUnavailable",
    "LimitExceeded",
    "ObjectNotFound",
    "PermissionDenied",
    "PrecisionOverflow",
    "PrivacyBudgetExceeded",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "VeilError",
    "WorkerMismatch",
    "WorkerUnavailable",
    "__version__",
    "datasets",
]
