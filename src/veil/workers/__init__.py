"""Workers: where data lives and torch calls run."""

from veil.workers._allowlist import register_function
from veil.workers._base import Worker, new_id
from veil.workers._messages import (
    Batch,
    DeleteObjects,
    ErrorReply,
    ExecuteCommand,
    FetchObject,
    MoveObject,
    Query,
    Reply,
    SearchObjects,
    StoreModule,
    StoreObject,
)
from veil.workers._node import Session, WorkerNode
from veil.workers._store import Permission
from veil.workers._virtual import VirtualWorker

__all__ = [
    "Batch",
    "DeleteObjects",
    "ErrorReply",
    "ExecuteCommand",
    "FetchObject",
    "MoveObject",
    "Permission",
    "Query",
    "Reply",
    "SearchObjects",
    "Session",
    "StoreModule",
    "StoreObject",
    "VirtualWorker",
    "Worker",
    "WorkerNode",
    "new_id",
    "register_function",
]
