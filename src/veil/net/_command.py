"""``veil worker`` and ``veil token``: the command-line side of network workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import torch

from veil.net._auth import TokenBook, new_token, normalize_token
from veil.net._data import load_csv, parse_data_arg
from veil.net._limits import Limits, parse_size
from veil.net._server import WorkerServer
from veil.net._tls import server_context


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def worker_parser() -> argparse.ArgumentParser:
    """The arguments of ``veil worker``."""
    p = argparse.ArgumentParser(
        prog="veil worker",
        description="Serve one worker over WebSockets until SIGINT or SIGTERM.",
    )
    p.add_argument("--name", required=True, help="the worker's name")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1; others need --token-file)",
    )
    p.add_argument("--port", type=int, default=8777, help="TCP port, 0 for any free one")
    p.add_argument("--port-file", help="write the port listened on to this file once ready")
    p.add_argument(
        "--token-file", help="token clients must prove: one line TOKEN, and/or lines NAME TOKEN"
    )
    p.add_argument(
        "--peer-token-file",
        help="token to prove to other workers when moving objects to them "
        "(default: the shared token of --token-file)",
    )
    p.add_argument("--tls-cert", help="PEM certificate chain: serve wss:// (needs --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--peer-ca-file", help="PEM certificates to trust for wss:// peers")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH.csv",
        help="host a numeric CSV file as private data tagged #NAME (repeatable)",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="REQUESTER",
        help="a requester who may take --data home (repeatable)",
    )
    d = Limits()
    p.add_argument(
        "--max-frame",
        type=_size,
        default=d.max_frame,
        help="largest message accepted, e.g. 64M (default %(default)s bytes)",
    )
    p.add_argument(
        "--max-objects",
        type=int,
        default=d.max_objects,
        help="objects one client may hold (default %(default)s)",
    )
    p.add_argument(
        "--max-bytes",
        type=_size,
        default=d.max_bytes,
        help="tensor bytes one client may hold, e.g. 2G (default %(default)s)",
    )
    p.add_argument(
        "--max-clients",
        type=int,
        default=d.max_clients,
        help="connections served at once (default %(default)s)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=d.handshake_timeout,
        help="seconds to open and authenticate a connection (default %(default)s)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="disconnect clients silent for this many seconds (default: never)",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=d.peer_timeout,
        help="seconds to deliver a moved object to another worker (default %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for computing (default: torch's own choice; 1 avoids "
        "oversubscription when other processes share the cores)",
    )
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started this one exits",
    )
    p.add_argument("--quiet", action="store_true", help="log errors only")
    return p


def _import_remote_functions() -> None:
    """Import the packages whose remote functions a worker must know (they register them)."""
    import veil.dp
    import veil.fl
    import veil.mpc  # noqa: F401


def worker_main(argv: list[str]) -> int:
    """Run ``veil worker`` with ``argv``; the exit code."""
    parser = worker_parser()
    args = parser.parse_args(argv)
    _import_remote_functions()
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format=f"%(asctime)s veil worker {args.name}: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("websockets").setLevel(logging.ERROR)
    if args.threads is not None:
        if args.threads < 1:
            print("veil worker: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        server = _build(args)
    except (ValueError, OSError) as exc:
        print(f"veil worker: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(server.run(port_file=args.port_file, exit_with_parent=args.exit_with_parent))
    except OSError as exc:  # e.g. the port is taken
        print(f"veil worker: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _build(args: argparse.Namespace) -> WorkerServer:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    tokens = TokenBook.read(args.token_file) if args.token_file else None
    peer_token = None
    if args.peer_token_file:
        peer_token = normalize_token(Path(args.peer_token_file).read_text())
    tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    limits = Limits(
        max_frame=args.max_frame,
        max_objects=args.max_objects,
        max_bytes=args.max_bytes,
        max_clients=args.max_clients,
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        peer_timeout=args.peer_timeout,
    )
    server = WorkerServer(
        args.name,
        host=args.host,
        port=args.port,
        tokens=tokens,
        peer_token=peer_token,
        tls=tls,
        peer_ca_file=args.peer_ca_file,
        limits=limits,
    )
    names = set()
    for spec in args.data:
        name, path = parse_data_arg(spec)
        if name in names:
            raise ValueError(f"--data {name} is given twice")
        names.add(name)
        data = load_csv(name, path)
        server.host_tensor(
            data.tensor,
            tags=data.tags,
            description=data.description,
            private=True,
            allowed=tuple(args.allow),
        )
        logging.getLogger("veil.worker").info(
            "hosting %s as %s (private%s)",
            data.description,
            data.tags[0],
            f", allowed: {', '.join(args.allow)}" if args.allow else "",
        )
    return server


def token_main(argv: list[str]) -> int:
    """``veil token [FILE]``: print a fresh token, or write it to FILE (mode 0600)."""
    parser = argparse.ArgumentParser(
        prog="veil token", description="Make a fresh random token for a worker."
    )
    parser.add_argument("file", nargs="?", help="write it here (must not exist yet)")
    args = parser.parse_args(argv)
    token = new_token()
    if args.file is None:
        print(token)
        return 0
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"veil token: {args.file} exists; not overwriting it", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return 0
