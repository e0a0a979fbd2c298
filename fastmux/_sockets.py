"""Sockets, made once for the loop and the worker pool.

Python owns everything that is not per-byte: addresses are resolved, and
sockets created, bound and connected here with the stdlib ``socket`` module;
the backend takes the fd from then on.

Addresses: ``(host, port)`` for TCP (IPv4 or IPv6, whatever ``getaddrinfo``
gives first), or a Unix socket path -- ``bytes``, an ``os.PathLike``, or a
``str`` that contains a ``/`` (``"./name"``) or starts with NUL (Linux's
abstract namespace).  A bare ``"host:port"``-looking string is neither, and
the argument checks (``_checks.check_address``) refuse it.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any, Optional, Tuple, Union

Address = Union[Tuple[Any, ...], str]


def is_unix_path(address: Any) -> bool:
    """True if `address` names a Unix socket (see the module docstring)."""
    if isinstance(address, (bytes, os.PathLike)):
        return True
    return isinstance(address, str) and ("/" in address or address.startswith("\0"))


def resolve(address: Address, passive: bool) -> Tuple[int, Any]:
    """(family, sockaddr) for `address`; `passive` for binding."""
    if is_unix_path(address):
        return socket.AF_UNIX, os.fsdecode(address)  # type: ignore[arg-type]
    if not isinstance(address, tuple) or len(address) < 2:
        raise ValueError(f"address must be (host, port) or a Unix socket path, got {address!r}")
    host, port = address[0], address[1]
    flags = socket.AI_PASSIVE if passive else 0
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=flags)
    if not infos:
        raise OSError(f"getaddrinfo returned nothing for {address!r}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def bound_socket(address: Address, reuse_port: bool) -> Tuple[socket.socket, Optional[str]]:
    """A stream socket bound to `address` (not yet listening), and the Unix
    path it bound (None for TCP).  A stale Unix socket file at the path is
    replaced; SO_REUSEADDR always, SO_REUSEPORT if asked, IPv6 only for ::."""
    family, addr = resolve(address, passive=True)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        unix_path = None
        if family == socket.AF_UNIX:
            unix_path = addr
            try:
                if stat.S_ISSOCK(os.stat(addr).st_mode):
                    os.unlink(addr)  # a stale socket from an earlier run
            except FileNotFoundError:
                pass
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise ValueError("reuse_port is not supported on this platform")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock, unix_path


def connecting_socket(address: Address) -> Tuple[socket.socket, int]:
    """A non-blocking stream socket with a connect to `address` started, and
    connect_ex's errno (0 or EINPROGRESS when all is well)."""
    family, addr = resolve(address, passive=False)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        return sock, sock.connect_ex(addr)
    except BaseException:
        sock.close()
        raise


def unix_inode(path: Optional[str]) -> Optional[int]:
    """The inode of the socket file we just bound, to recognise it later."""
    return os.stat(path).st_ino if path else None


def unlink_socket_path(path: str, ino: Optional[int]) -> None:
    """Remove the Unix socket file at `path` if it is still the one we bound
    (same inode): another process may have bound the path since."""
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass
