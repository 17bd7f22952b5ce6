"""``sam3d serve``: load a model, pick the images (or the demo's), run uvicorn."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sam3d.errors import Sam3DError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEMO_DIR = Path("demo_out")


def http_protocol() -> type:
    """uvicorn's h11 protocol, plus a deadline for the first request on a connection.

    uvicorn closes an idle *kept-alive* connection after ``timeout_keep_alive`` but waits
    forever for the first request's headers; this closes a connection that has not
    started a request within the same time (a client that connects and stays silent, or
    sends its headers a byte at a time). Slow bodies are cut by the app (408).
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.loop.call_later(self.timeout_keep_alive, self._no_request_yet)

        def _no_request_yet(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def demo_inputs(demo_dir: Path = DEMO_DIR) -> tuple[Path, list[Path]]:
    """The checkpoint and held-out phantoms that ``sam3d demo`` wrote into ``demo_dir``."""
    checkpoint = demo_dir / "kits_bundle_run" / "models" / "model.pt"
    listing = demo_dir / "phantoms_ct" / "dataset.json"
    if not checkpoint.is_file() or not listing.is_file():
        raise Sam3DError(
            f"no --checkpoint given and no demo model in {demo_dir}/: run `sam3d demo` first "
            "(it trains a tiny model on phantoms in a few minutes), or pass "
            "IMAGE ... --checkpoint model.pt"
        )
    meta = json.loads(listing.read_text())
    entries = meta.get("test", []) + meta.get("validation", [])
    images = [(listing.parent / e["image"]).resolve() for e in entries if "image" in e]
    return checkpoint, [p for p in images if p.is_file()]


def has_demo_inputs(demo_dir: Path = DEMO_DIR) -> bool:
    """Whether ``sam3d demo`` left its model and phantoms in ``demo_dir``."""
    return (demo_dir / "kits_bundle_run" / "models" / "model.pt").is_file() and (
        demo_dir / "phantoms_ct" / "dataset.json"
    ).is_file()


def run_server(
    images: Sequence[Path],
    checkpoint: Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | None = None,
    growth: Any = None,
    max_upload_mb: float = 512.0,
    max_sessions: int = 8,
    max_memory_gb: float = 8.0,
    session_ttl_min: float = 60.0,
    allow_hosts: Sequence[str] = (),
    idle_timeout_s: float = 5.0,
    max_image_mb: float = 1024.0,
) -> None:
    """Serve the viewer until interrupted (prints the address first).

    The page answers only to the listening address, the loopback names and
    ``allow_hosts`` (the ``Host`` header; see :mod:`sam3d.serve.guard`); an idle
    keep-alive connection is closed after ``idle_timeout_s``.
    """
    import uvicorn

    from sam3d.inference import load_model_for_inference
    from sam3d.serve.app import create_app
    from sam3d.serve.guard import default_allowed_hosts
    from sam3d.serve.sessions import SessionStore

    if checkpoint is None:
        if not images and has_demo_inputs():
            checkpoint, images = demo_inputs()
        else:
            from sam3d.models.checkpoint import read_trained
            from sam3d.weights import shipped_checkpoint, shipped_model_note

            checkpoint = shipped_checkpoint()
            print(f"sam3d serve: {shipped_model_note(read_trained(checkpoint).get('meta'))}")
    model, meta = load_model_for_inference(checkpoint, device)
    store = SessionStore(
        ttl_s=session_ttl_min * 60.0,
        max_sessions=max_sessions,
        max_bytes=int(max_memory_gb * (1 << 30)),
    )
    app = create_app(
        model,
        meta,
        images,
        device=device,
        growth=growth,
        max_upload_mb=max_upload_mb,
        store=store,
        allowed_hosts=sorted(default_allowed_hosts(host, allow_hosts)),
        max_image_mb=max_image_mb,
    )
    if host not in LOOPBACK:
        print(
            f"sam3d serve: warning: listening on {host}: anyone who can reach this machine "
            "can open the served images and upload files; the server has no login",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    print(f"sam3d serve: {len(images)} image(s), model {checkpoint}")
    print(f"sam3d serve: open http://{shown}:{port}/ in a browser (Ctrl+C stops)", flush=True)
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_keep_alive=idle_timeout_s,
            http=http_protocol(),
        )
    except OSError as e:  # port in use, permission denied
        raise Sam3DError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


class BackgroundServer:
    """Run an app with uvicorn in a thread on 127.0.0.1 (tests and benchmarks).

    >>> with BackgroundServer(app) as url:   # url such as "http://127.0.0.1:40123"
    ...     ...
    """

    def __init__(
        self,
        app: Any,
        port: int = 0,
        start_timeout_s: float = 30.0,
        idle_timeout_s: float = 5.0,
    ) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            timeout_keep_alive=idle_timeout_s,
            http=http_protocol(),
        )
        self.server = uvicorn.Server(config)
        self.start_timeout_s = start_timeout_s
        self.thread: Any = None
        self.url = ""

    def __enter__(self) -> str:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the viewer server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10.0)
