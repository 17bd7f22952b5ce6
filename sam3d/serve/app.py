"""The viewer's web application: a thin HTTP layer over :class:`~sam3d.inference.ClickSession`.

Routes (all answers to errors are ``{"error": message}`` JSON, never a traceback):

- ``GET /``: the page (``static/index.html``); ``GET /static/...``: its script and style.
- ``GET /api/files``: the names of the served images, limits and window presets.
- ``POST /api/open`` ``{"file": name}``: open a served image by its *name* (a path in a
  request is never opened); ``POST /api/upload`` (raw body, ``X-Filename`` header): a
  size-limited upload parsed by the same loader as every other file.
- ``GET /api/sessions/{id}/volume``: the image voxels (message, see :mod:`.masks`).
- ``POST /api/sessions/{id}/click`` ``{"point": [i, j, k], "positive": true}``,
  ``.../undo``, ``.../reset``: the mask as a bounding box of packed bits.
- ``GET /api/sessions/{id}/mask``: the mask as NIfTI with the input's header
  (:func:`sam3d.inference.grid.save_mask`, the writer of ``sam3d segment``).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sam3d.data.geometry import spacing_from_affine
from sam3d.data.io import is_nifti_name, nifti_stem
from sam3d.errors import Sam3DError
from sam3d.serve.masks import encode_mask, pack_message
from sam3d.serve.sessions import Entry, SessionStore, UnknownSession

log = logging.getLogger("sam3d.serve")
STATIC_DIR = Path(__file__).with_name("static")
# Window presets offered besides the dataset's own (HU, CT conventions).
WINDOW_PRESETS_HU = {
    "abdomen": (-160.0, 240.0),
    "soft tissue": (-125.0, 225.0),
    "bone": (-500.0, 1300.0),
    "lung": (-1350.0, 150.0),
}


def nifti_name(name: str) -> str:
    """A safe file name for an upload: its last component, NIfTI suffix required."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(name).replace("\\", "/")).name)
    if not is_nifti_name(base) or not nifti_stem(base):
        raise Sam3DError(f"{name!r} is not a NIfTI file name (.nii or .nii.gz)")
    return base


def display_axes(affine: np.ndarray) -> tuple[list[int], list[int]]:
    """For each voxel axis: the world axis (0 R, 1 A, 2 S) it runs closest to, and its sign."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    world, sign, used = [0, 0, 0], [1, 1, 1], set()
    for v in np.argsort(-np.abs(a).max(axis=0)):  # most clearly aligned axes pick first
        order = [w for w in np.argsort(-np.abs(a[:, v])) if w not in used]
        world[v] = int(order[0])
        sign[v] = 1 if a[world[v], v] >= 0 else -1
        used.add(world[v])
    return world, sign


def volume_message(entry: Entry, dataset: Mapping[str, Any]) -> bytes:
    """The image voxels (int16 when they are whole numbers in range, else float32), C order."""
    s = entry.session
    img = s.original_image[0].detach().cpu().numpy()
    lo, hi = float(img.min()), float(img.max())
    whole = lo >= -32768 and hi <= 32767 and bool(np.all(np.equal(np.mod(img, 1), 0)))
    data = img.astype("<i2" if whole else "<f4")
    affine = s.original_affine
    world, sign = display_axes(affine)
    presets = {f"{dataset.get('name', 'dataset')} (default)": list(dataset["window_hu"])}
    presets.update({k: list(v) for k, v in WINDOW_PRESETS_HU.items()})
    header = {
        "session": entry.id,
        "name": entry.name,
        "shape": list(s.original_shape),
        "dtype": "int16" if whole else "float32",
        "spacing_mm": list(spacing_from_affine(affine)),
        "voxel_ml": float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0,
        "affine": np.asarray(affine).tolist(),
        "axis_world": world,
        "axis_sign": sign,
        "range": [lo, hi],
        "windows": presets,
    }
    return pack_message(header, np.ascontiguousarray(data).tobytes())


def mask_message(entry: Entry, mask: np.ndarray, seconds: float) -> bytes:
    """The current mask as box + packed bits, with its volume and extent for the page."""
    s = entry.session
    box, bits = encode_mask(mask)
    spacing = np.asarray(spacing_from_affine(s.original_affine))
    voxels = int(np.count_nonzero(mask[box[0] : box[3], box[1] : box[4], box[2] : box[5]]))
    header = {
        "box": box,
        "voxels": voxels,
        "volume_ml": voxels * float(abs(np.linalg.det(s.original_affine[:3, :3]))) / 1000.0,
        "extent_mm": [float((box[a + 3] - box[a]) * spacing[a]) for a in range(3)],
        "points": [list(p) for p in s.points_vox],
        "labels": s.point_labels,
        "encode_calls": s.encode_calls,
        "server_ms": round(seconds * 1000.0, 2),
    }
    return pack_message(header, bits)


def _binary(data: bytes, request: Request, compress: bool = True) -> Response:
    """Bytes for the page; gzip (level 1) when it helps. Volumes go raw: on a local
    connection compressing 100 MB costs more than sending it."""
    headers = {"X-Sam3d-Raw-Bytes": str(len(data)), "Cache-Control": "no-store"}
    accepts = "gzip" in request.headers.get("accept-encoding", "")
    if compress and accepts and len(data) > 512:
        packed = gzip.compress(data, compresslevel=1)
        if len(packed) < len(data):
            data = packed
            headers["Content-Encoding"] = "gzip"
    headers["X-Sam3d-Bytes"] = str(len(data))
    return Response(data, media_type="application/octet-stream", headers=headers)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(
    model: Any,
    meta: Mapping[str, Any],
    images: Sequence[str | Path] = (),
    device: str | None = None,
    growth: Any = None,
    max_upload_mb: float = 512.0,
    store: SessionStore | None = None,
    upload_dir: str | Path | None = None,
    session_factory: Callable[..., Any] | None = None,
) -> Starlette:
    """The viewer application for one model.

    Args:
        model: a Sam3D (or any model with ``encode``/``decode``/``crop_size``), in eval mode.
        meta: the checkpoint's metadata; ``meta["dataset"]`` is the dataset preset (a name
            or a dict) whose window and normalisation the model was trained with.
        images: NIfTI files the page may open (by name; nothing else on disk is served).
        device: where sessions run (default: CUDA when available).
        growth: window growth (:class:`~sam3d.inference.WindowGrowth`).
        max_upload_mb: uploads larger than this are refused (HTTP 413).
        store: the session store (default: 8 sessions, 8 GiB, one hour idle).
        upload_dir: where uploads are kept while their session lives (default: a temp dir).
        session_factory: ``(model, path, dataset, device, growth) -> ClickSession``.
    """
    from sam3d.inference import ClickSession
    from sam3d.inference.session import resolve_dataset

    dataset = resolve_dataset(meta["dataset"])
    served: dict[str, Path] = {}
    for p in images:
        p = Path(p)
        if not p.is_file():
            raise Sam3DError(f"{p}: no such file")
        name = nifti_name(p.name)
        if name in served:
            raise Sam3DError(f"two served images are both called {name}")
        served[name] = p.resolve()
    store = store or SessionStore()
    tmp = tempfile.TemporaryDirectory(prefix="sam3d-serve-") if upload_dir is None else None
    uploads = Path(tmp.name if tmp else upload_dir)  # type: ignore[arg-type]
    uploads.mkdir(parents=True, exist_ok=True)
    limit = int(max_upload_mb * 1024 * 1024)
    factory = session_factory or (
        lambda m, path, ds, dev, gr: ClickSession(m, path, ds, device=dev, growth=gr)
    )

    def open_session(path: Path, name: str, upload: bool) -> Entry:
        session = factory(model, path, dataset, device, growth)
        return store.add(name, session, path, upload=upload)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def files(request: Request) -> Response:
        return JSONResponse(
            {
                "files": list(served),
                "max_upload_mb": max_upload_mb,
                "dataset": dataset.get("name"),
                "window_hu": list(dataset["window_hu"]),
            }
        )

    async def open_file(request: Request) -> Response:
        try:
            body = await request.json()
            name = str(body["file"])
        except Exception:
            return _error(400, 'expected JSON {"file": name}')
        if name not in served:  # names only: "../x", "/etc/passwd" are simply not names
            return _error(404, f"{name!r} is not one of the served files")
        entry = await run_in_threadpool(open_session, served[name], name, False)
        return JSONResponse({"session": entry.id, "name": entry.name})

    async def upload(request: Request) -> Response:
        name = nifti_name(request.headers.get("x-filename", ""))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(413, f"the file is larger than the upload limit of {max_upload_mb} MB")
        path = uploads / f"{time.time_ns()}_{name}"
        size = 0
        try:
            with open(path, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise Sam3DError(
                            f"the file is larger than the upload limit of {max_upload_mb} MB"
                        )
                    f.write(chunk)
            if size == 0:
                raise Sam3DError("the uploaded file is empty")
            entry = await run_in_threadpool(open_session, path, name, True)
        except Sam3DError as e:
            path.unlink(missing_ok=True)
            return _error(413 if size > limit else 400, str(e).replace(str(path), name))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return JSONResponse({"session": entry.id, "name": entry.name})

    def with_session(sid: str, fn: Callable[[Entry], Response]) -> Response:
        try:
            with store.use(sid) as entry:
                return fn(entry)
        except UnknownSession:
            return _error(404, "this image's session has expired or is unknown; open it again")

    async def volume(request: Request) -> Response:
        sid = request.path_params["sid"]
        return await run_in_threadpool(
            with_session,
            sid,
            lambda e: _binary(volume_message(e, dataset), request, compress=False),
        )

    def _mask_answer(request: Request, action: Callable[[Entry], Any]) -> Callable:
        def run(entry: Entry) -> Response:
            t0 = time.perf_counter()
            action(entry)
            m = entry.session.mask  # bool, original grid; no copy on the CPU
            mask = entry.session.mask_numpy() if m is None else m.cpu().numpy()
            return _binary(mask_message(entry, mask, time.perf_counter() - t0), request)

        return run

    async def click(request: Request) -> Response:
        try:
            body = await request.json()
            point = [float(v) for v in body["point"]]
            positive = bool(body.get("positive", True))
            if len(point) != 3:
                raise ValueError
        except Exception:
            return _error(400, 'expected JSON {"point": [i, j, k], "positive": true}')
        sid = request.path_params["sid"]
        act = _mask_answer(request, lambda e: e.session.click(point, positive=positive))
        return await run_in_threadpool(with_session, sid, act)

    async def undo(request: Request) -> Response:
        act = _mask_answer(request, lambda e: e.session.undo())
        return await run_in_threadpool(with_session, request.path_params["sid"], act)

    async def reset(request: Request) -> Response:
        act = _mask_answer(request, lambda e: e.session.reset())
        return await run_in_threadpool(with_session, request.path_params["sid"], act)

    async def mask_file(request: Request) -> Response:
        def save(entry: Entry) -> Response:
            out = uploads / f"{time.time_ns()}_{nifti_stem(entry.name)}_seg.nii.gz"
            entry.session.save(out)
            return FileResponse(
                out,
                media_type="application/gzip",
                filename=f"{nifti_stem(entry.name)}_seg.nii.gz",
                background=BackgroundTask(out.unlink, missing_ok=True),
            )

        return await run_in_threadpool(with_session, request.path_params["sid"], save)

    async def on_user_error(request: Request, exc: Exception) -> Response:
        return _error(400, str(exc))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("error answering %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has details")

    def shutdown() -> None:
        store.close()
        if tmp is not None:
            tmp.cleanup()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        shutdown()

    sid = "/api/sessions/{sid:str}"
    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/files", files),
            Route("/api/open", open_file, methods=["POST"]),
            Route("/api/upload", upload, methods=["POST"]),
            Route(sid + "/volume", volume),
            Route(sid + "/click", click, methods=["POST"]),
            Route(sid + "/undo", undo, methods=["POST"]),
            Route(sid + "/reset", reset, methods=["POST"]),
            Route(sid + "/mask", mask_file),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={
            Sam3DError: on_user_error,
            HTTPException: on_http_error,
            Exception: on_error,
        },
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.served = served
    app.state.upload_dir = uploads
    app.state.close = shutdown
    return app
