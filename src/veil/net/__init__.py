"""Network workers: ``veil worker`` serves a worker over WebSockets; :func:`connect` uses one.

A network worker understands the same messages, in the same wire format, as a
:class:`~veil.VirtualWorker`, so the pointer API is the same::

    $ veil worker --name alice --port 8777 --token-file alice.token
    >>> alice = veil.net.connect("ws://127.0.0.1:8777", token=open("alice.token").read())
    >>> (torch.ones(3).send(alice) * 2).get()
"""

from veil.net._auth import TokenBook, new_token, read_token
from veil.net._client import WebSocketWorker, connect
from veil.net._limits import Limits, parse_size
from veil.net._process import WorkerProcess, local_workers, spawn_worker
from veil.net._server import WorkerServer

__all__ = [
    "Limits",
    "TokenBook",
    "WebSocketWorker",
    "WorkerProcess",
    "WorkerServer",
    "connect",
    "local_workers",
    "new_token",
    "parse_size",
    "read_token",
    "spawn_worker",
]
