"""What stands between the network and the viewer: hosts, origins, bodies, sizes, memory.

- :class:`Guard` (ASGI middleware): a ``Host`` header must name one of the allowed hosts
  (against DNS rebinding: a page on ``evil.example`` that resolves to 127.0.0.1 still
  sends ``Host: evil.example``); a request that changes state (any method but GET/HEAD)
  must come from the page itself: no foreign ``Origin`` / ``Sec-Fetch-Site``, and the
  page's token in ``X-Sam3d-Token`` (a cross-site form or ``text/plain`` POST cannot set
  a header without a CORS preflight, which this server never grants).
- :func:`read_body` / :func:`stream_to_file`: a request body has a size limit and a time
  limit (a slow sender gets 408 and loses its connection).
- :func:`inspect_nifti`: an upload's header is read before its voxels: the declared shape
  and data type give the decompressed size, checked against the limit; a gzip stream is
  then decompressed in bounded chunks, never further than the header promised (a gzip
  bomb stops after that many bytes, with nothing allocated but one chunk).
- :class:`Admission`: the estimated memory of the opens in flight stays under one budget,
  and at most ``max_opens`` run at once; an open that would exceed either is refused
  (429; 413 when the image alone needs more than the budget). Open sessions are bounded
  by the session store (LRU eviction), whose budget this is.

Every refusal is a :class:`Refusal`: an HTTP status (4xx) and a one-line message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
TOKEN_HEADER = "x-sam3d-token"
CHUNK = 1 << 20


class Refusal(Exception):
    """A request the server refuses: ``status`` (4xx) and a message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def host_name(host: str) -> str:
    """The name in a ``Host`` header: ``"[::1]:8000"`` -> ``"::1"``, lower case, no port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def default_allowed_hosts(listen: str, extra: Iterable[str] = ()) -> set[str]:
    """The hosts a server listening on ``listen`` answers to.

    Loopback names always; the listening address itself; for a wildcard address
    (0.0.0.0, ::) the machine's names. ``extra``: more names (``--allow-host``), ``*``: any.
    """
    import socket

    names = {"127.0.0.1", "localhost", "::1", host_name(listen)}
    if listen in ("0.0.0.0", "::", ""):
        names.discard(host_name(listen))
        for n in (socket.gethostname(), socket.getfqdn()):
            if n:
                names.add(n.lower())
    names.update(host_name(h) if h != "*" else "*" for h in extra)
    return names


async def _send_json(send: Callable, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: Host allowlist, and same-origin + page token on state changes.

    Args:
        app: the application to guard.
        allowed_hosts: host names (no port) the server answers to; ``"*"`` allows any.
        token: the page's token (embedded in the page; a POST must echo it).
    """

    def __init__(self, app: Any, allowed_hosts: Iterable[str], token: str) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed_hosts}
        self.token = token
        self.state = getattr(app, "state", None)  # the guarded app's state, for its owner

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if "*" not in self.allowed and host_name(host) not in self.allowed:
            shown = host[:80] or "(none)"
            await _send_json(
                send,
                400,
                f"host {shown!r} is not one this server answers to; "
                "start it with --allow-host NAME to add one",
            )
            return
        if scope["method"] not in SAFE_METHODS:
            problem = self.cross_site(headers, host)
            if problem:
                await _send_json(send, 403, problem)
                return
        await self.app(scope, receive, send)

    def cross_site(self, headers: dict[str, str], host: str) -> str | None:
        origin = headers.get("origin")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            return f"cross-site request from {origin[:80]!r} refused"
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"cross-site request ({site}) refused"
        if not secrets.compare_digest(headers.get(TOKEN_HEADER, ""), self.token):
            return "this request lacks the page's token: reload the page"
        return None


# ---------------------------------------------------------------- bodies


async def _chunks(request: Any, idle_s: float, total_s: float) -> AsyncIterator[bytes]:
    """The body's chunks; 408 when one takes longer than ``idle_s`` or all ``total_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_s
    stream = request.stream().__aiter__()
    while True:
        wait = min(idle_s, deadline - loop.time())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise Refusal(408, "the request body arrived too slowly; try again") from None
        yield chunk


async def read_body(request: Any, limit: int, idle_s: float, total_s: float) -> bytes:
    """The whole (small) body of a request, at most ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refusal(413, f"the request body is larger than {limit} bytes")
    parts, size = [], 0
    async for chunk in _chunks(request, idle_s, total_s):
        size += len(chunk)
        if size > limit:
            raise Refusal(413, f"the request body is larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def stream_to_file(
    request: Any, path: Path, limit: int, idle_s: float, total_s: float, what: str
) -> int:
    """Write the body to ``path`` (deleted on any failure); returns its size."""
    size = 0
    try:
        with open(path, "wb") as f:
            async for chunk in _chunks(request, idle_s, total_s):
                size += len(chunk)
                if size > limit:
                    raise Refusal(413, f"the file is larger than the upload limit of {what}")
                f.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size


# ---------------------------------------------------------------- NIfTI sizes


@dataclass(frozen=True)
class NiftiFacts:
    """What a NIfTI file's header declares."""

    shape: tuple[int, ...]
    dtype: np.dtype
    data_bytes: int  # voxels x item size

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def inspect_nifti(
    path: Path,
    max_bytes: int,
    name: str,
    check_stream: bool = True,
    unpack_to: Path | None = None,
) -> NiftiFacts:
    """Read the header only, check the declared size, then (``check_stream``) bound the
    gzip stream, writing what it holds to ``unpack_to`` when given (an uncompressed
    ``.nii`` that every later reader opens without decompressing again).

    Raises :class:`Refusal` (413 too large, 400 unreadable). No more than one chunk of
    decompressed data is ever held; the stream is read only as far as the header says.
    """
    import nibabel as nib

    limit_text = f"{max_bytes / 2**20:.0f} MiB"
    try:
        img = nib.load(str(path))
        header = img.header
        shape = tuple(int(s) for s in img.shape)
        dtype = np.dtype(header.get_data_dtype())
        offset = int(header.get("vox_offset", 0)) if hasattr(header, "get") else 0
    except Exception as e:  # nibabel raises many kinds for a bad header
        raise Refusal(400, f"cannot read {name}: not a NIfTI image ({type(e).__name__})") from e
    if len(shape) < 3 or any(s <= 0 for s in shape):
        raise Refusal(400, f"cannot read {name}: its header declares shape {shape}")
    data_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data_bytes > max_bytes:
        raise Refusal(
            413,
            f"{name} declares {' x '.join(map(str, shape))} voxels of {dtype.name} "
            f"({data_bytes / 2**20:.0f} MiB), over the image limit of {limit_text}",
        )
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz and check_stream:
        expected = max(offset, 348) + data_bytes
        _bounded_gunzip(path, expected + CHUNK, name, unpack_to)
    return NiftiFacts(shape, dtype, data_bytes)


def _bounded_gunzip(path: Path, limit: int, name: str, out: Path | None = None) -> int:
    """Decompress ``path`` chunk by chunk (into ``out``, if given); refuse (413) past
    ``limit`` bytes, 400 if corrupt. ``out`` is removed on a refusal."""
    try:
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(open(out, "wb")) if out is not None else None
            return _gunzip_chunks(path, limit, name, sink)
    except BaseException:
        if out is not None:
            out.unlink(missing_ok=True)
        raise


def _gunzip_chunks(path: Path, limit: int, name: str, sink: Any) -> int:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(CHUNK)
            if not data:
                break
            while data:
                try:
                    out = d.decompress(data, CHUNK)
                except zlib.error as e:
                    raise Refusal(400, f"cannot read {name}: corrupt gzip data") from e
                total += len(out)
                if total > limit:
                    raise Refusal(
                        413, f"{name} decompresses to more than its header declares; refused"
                    )
                if sink is not None:
                    sink.write(out)
                data = d.unconsumed_tail
                if d.eof:  # a second gzip member would follow in unused_data
                    data = d.unused_data
                    if data:
                        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return total


# ---------------------------------------------------------------- memory


class Admission:
    """One memory budget for the opens in flight.

    Args:
        max_bytes: the budget (the session store's ``max_bytes``).
        max_opens: at most this many opens at once.
        wait_s: how long an open waits for room before it is refused (429).
    """

    def __init__(self, max_bytes: int, max_opens: int = 2, wait_s: float = 30.0) -> None:
        self.max_bytes, self.max_opens, self.wait_s = max_bytes, max_opens, wait_s
        self.in_flight: dict[int, int] = {}
        self._room = threading.Condition()
        self._next = 0

    def _fits(self, need: int) -> bool:
        return (
            len(self.in_flight) < self.max_opens
            and sum(self.in_flight.values()) + need <= self.max_bytes
        )

    def admit(self, need: int, name: str) -> int:
        """Reserve ``need`` bytes for opening ``name`` (waiting up to ``wait_s`` for room);
        returns a ticket for :meth:`release`. Blocks: call it from a worker thread."""
        if need > self.max_bytes:
            raise Refusal(
                413,
                f"{name} needs about {need / 2**30:.2f} GiB to open, more than the server "
                f"allows ({self.max_bytes / 2**30:.2f} GiB; --max-memory-gb)",
            )
        with self._room:
            if not self._room.wait_for(lambda: self._fits(need), timeout=self.wait_s):
                raise Refusal(429, "the server is opening other images; try again shortly")
            self._next += 1
            self.in_flight[self._next] = need
            return self._next

    def release(self, ticket: int) -> None:
        with self._room:
            self.in_flight.pop(ticket, None)
            self._room.notify_all()
