"""The viewer's web application: a thin HTTP layer over :class:`~sam3d.inference.ClickSession`.

Routes (all answers to errors are ``{"error": message}`` JSON with a 4xx status, never a
traceback; see :mod:`.guard` for the Host, origin, token, size and time checks and
:mod:`.schema` for the request bodies):

- ``GET /``: the page (``static/index.html``, with its token); ``GET /static/...``.
- ``GET /api/files``: the names of the served images, limits and window presets.
- ``POST /api/open`` ``{"file": name}``: open a served image by its *name* (a path in a
  request is never opened); ``POST /api/upload`` (raw body, ``X-Filename`` header): a
  size-limited upload, its header and gzip stream checked before it is read.
  Both answer once the voxels are read; the session (preprocessing) is built after.
- ``GET /api/sessions/{id}/info``: the image's shape, geometry and windows (JSON);
  ``.../slice?axis=a&index=n``: one slice of voxels (what the page draws first);
  ``.../volume``: all the voxels (message, see :mod:`.masks`), streamed with progress.
- ``POST /api/sessions/{id}/click`` ``{"point": [i, j, k], "positive": true, "segment": 1}``,
  ``.../brush`` (a stroke on one slice), ``.../undo``, ``.../redo``, ``.../reset``
  ``{"segment": n}``: the segment's mask inside the box where it changed, packed bits.
- ``POST /api/sessions/{id}/segments`` ``{"name": ...}``: a new segment.
- ``GET /api/sessions/{id}/mask``: the label map (segment ``n`` is ``n``) as NIfTI with
  the input's header (:func:`sam3d.inference.grid.save_mask`).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import re
import secrets
import tempfile
import threading
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
from sam3d.serve import schema
from sam3d.serve.guard import (
    Admission,
    Guard,
    Refusal,
    default_allowed_hosts,
    inspect_nifti,
    read_body,
    stream_to_file,
)
from sam3d.serve.masks import pack_message
from sam3d.serve.segments import Box, Segment, Segments
from sam3d.serve.sessions import Entry, SessionStore, UnknownSession, Voxels

log = logging.getLogger("sam3d.serve")
STATIC_DIR = Path(__file__).with_name("static")
# Window presets offered besides the dataset's own (HU, CT conventions).
WINDOW_PRESETS_HU = {
    "abdomen": (-160.0, 240.0),
    "soft tissue": (-125.0, 225.0),
    "bone": (-500.0, 1300.0),
    "lung": (-1350.0, 150.0),
}
MAX_NAME = 120  # characters of an upload's stem kept
MAX_JSON_BYTES = 64 << 10
# Peak memory of opening an image, per voxel of the file (read as float32, resampled to
# the 1 mm grid, intensity-transformed; measured ~100 B/voxel before the memory-bounded
# loader). The admission control reserves this much for every open in flight.
OPEN_BYTES_PER_VOXEL = 64
BUILD_DELAY_S = 5.0  # longest wait for the page's voxels before preprocessing anyway


def nifti_name(name: str) -> str:
    """A safe file name for an upload: its last component, NIfTI suffix required, the
    stem cut to ``MAX_NAME`` characters."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(name).replace("\\", "/")).name)
    if not is_nifti_name(base) or not nifti_stem(base):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise Sam3DError(f"{shown!r} is not a NIfTI file name (.nii or .nii.gz)")
    stem = nifti_stem(base)
    return stem[:MAX_NAME] + base[len(stem) :]


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


def page_voxels(img: np.ndarray) -> tuple[np.ndarray, str, list[float]]:
    """The voxels as the page takes them: int16 when they are whole numbers in range, else
    float32, little endian, in the array's own memory order (a NIfTI file's is Fortran:
    no transposed copy of the volume); with the data type's name and the value range."""
    lo, hi = float(img.min()), float(img.max())
    in_range = lo >= -32768 and hi <= 32767
    if img.dtype.kind in "iub" and in_range:
        data = img.astype("<i2", order="K", copy=False)
    elif img.dtype.kind == "f" and in_range:
        data = img.astype("<i2", order="K")
        if not np.array_equal(data, img):
            data = img.astype("<f4", order="K", copy=False)
    else:
        data = img.astype("<f4", order="K", copy=False)
    if not (data.flags.c_contiguous or data.flags.f_contiguous):
        data = np.ascontiguousarray(data)
    return data, "int16" if data.dtype == np.int16 else "float32", [lo, hi]


def read_voxels(path: Path, name: str) -> Voxels:
    """The file's voxels as stored (scaled values, file orientation), ready for the page,
    and its affine. nibabel only, no resampling: what the page draws, read before the
    session's preprocessing."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise Sam3DError(f"cannot read {name}: {type(e).__name__}") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise Sam3DError(f"cannot read {name}: expected one 3D volume, got shape {data.shape}")
    page, dtype, value_range = page_voxels(data)
    return Voxels(page, np.asarray(img.affine, dtype=np.float64), dtype, value_range)


def volume_header(entry: Entry, dataset: Mapping[str, Any]) -> dict[str, Any]:
    """What the page needs to draw the image: shape, geometry, data type, windows."""
    if entry.image is None:  # a session given ready-made: its own copy of the voxels
        img = entry.session.original_image[0].detach().cpu().numpy()
        data, dtype, value_range = page_voxels(img)
        entry.image = Voxels(data, entry.session.original_affine, dtype, value_range)
    v = entry.image
    affine = np.asarray(v.affine, dtype=np.float64)
    world, sign = display_axes(affine)
    presets = {f"{dataset.get('name', 'dataset')} (default)": list(dataset["window_hu"])}
    presets.update({k: list(w) for k, w in WINDOW_PRESETS_HU.items()})
    return {
        "session": entry.id,
        "name": entry.name,
        "shape": [int(n) for n in v.data.shape],
        "dtype": v.dtype,
        "spacing_mm": [float(x) for x in spacing_from_affine(affine)],
        "voxel_ml": float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0,
        "affine": affine.tolist(),
        "axis_world": world,
        "axis_sign": sign,
        "range": v.value_range,
        "order": "C" if v.data.flags.c_contiguous else "F",
        "windows": presets,
        "ready": entry.ready.is_set(),
    }


def volume_message(entry: Entry, dataset: Mapping[str, Any]) -> bytes:
    """The image voxels (int16 when they are whole numbers in range, else float32), in the
    order the header names (``"C"``: k fastest; ``"F"``: i fastest)."""
    header = volume_header(entry, dataset)
    data = entry.image.data
    raw = data if header["order"] == "C" else data.T  # .T of a Fortran array: C-contiguous
    return pack_message(header, memoryview(raw).cast("B"))


def slice_message(entry: Entry, axis: int, index: int) -> bytes:
    """One slice (voxel ``axis`` at ``index``): the other two axes in C order."""
    shape = entry.image.data.shape
    if axis not in (0, 1, 2) or not 0 <= index < shape[axis]:
        raise Refusal(400, f"no slice {index} along axis {axis} (shape {list(shape)})")
    where: list[Any] = [slice(None)] * 3
    where[axis] = index
    plane = np.ascontiguousarray(entry.image.data[tuple(where)])  # np.take: seconds on F order
    header = {"axis": axis, "index": index, "shape": list(plane.shape)}
    return pack_message(header, plane.tobytes())


def segment_summary(seg: Segment, spacing: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    b = seg.final.box
    voxels = seg.final.voxels()
    return {
        "id": seg.id,
        "name": seg.name,
        "colour": seg.colour,
        "voxels": voxels,
        "volume_ml": voxels * voxel_ml,
        "extent_mm": [float((b[a + 3] - b[a]) * spacing[a]) for a in range(3)],
    }


def segment_message(entry: Entry, seg: Segment, box: Box, seconds: float) -> bytes:
    """Segment ``seg`` inside ``box`` (where it changed) as packed bits, with every
    segment's volume and extent and ``seg``'s clicks."""
    s, segs = entry.session, entry.segments
    spacing = np.asarray(spacing_from_affine(s.original_affine))
    voxel_ml = float(abs(np.linalg.det(s.original_affine[:3, :3]))) / 1000.0
    window = segs.window(seg, box)
    bits = np.packbits(window, axis=None).tobytes() if window.size else b""
    header = {
        "segment": seg.id,
        "box": [int(v) for v in box],
        **segment_summary(seg, spacing, voxel_ml),
        "segments": [segment_summary(x, spacing, voxel_ml) for x in segs.items.values()],
        "points": seg.points,
        "labels": seg.labels,
        "can_undo": bool(seg.undo),
        "can_redo": bool(seg.redo),
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
    allowed_hosts: Sequence[str] | None = None,
    max_image_mb: float = 1024.0,
    body_timeout_s: float = 30.0,
    max_opens: int = 2,
    open_bytes_per_voxel: int = OPEN_BYTES_PER_VOXEL,
    admission_wait_s: float = 30.0,
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
        allowed_hosts: the ``Host`` names answered (default: the loopback names); ``"*"``
            answers any (not for a network).
        max_image_mb: an image whose header declares more voxel bytes is refused (413).
        body_timeout_s: a request body must arrive within this (idle and in total, 408).
        max_opens: images opened at once (more wait up to ``admission_wait_s``, then 429).
        open_bytes_per_voxel: memory reserved per voxel for an open in flight (the
            admission control's estimate; the budget is the store's ``max_bytes``).
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
    store = store if store is not None else SessionStore()  # an empty store is falsy
    admission = Admission(store.max_bytes, max_opens=max_opens, wait_s=admission_wait_s)
    token = secrets.token_urlsafe(24)
    hosts = set(allowed_hosts) if allowed_hosts is not None else default_allowed_hosts("127.0.0.1")
    tmp = tempfile.TemporaryDirectory(prefix="sam3d-serve-") if upload_dir is None else None
    uploads = Path(tmp.name if tmp else upload_dir)  # type: ignore[arg-type]
    uploads.mkdir(parents=True, exist_ok=True)
    limit = int(max_upload_mb * 1024 * 1024)
    image_limit = int(max_image_mb * 1024 * 1024)
    page = (STATIC_DIR / "index.html").read_text().replace("{{token}}", token)
    factory = session_factory or (
        lambda m, path, ds, dev, gr: ClickSession(m, path, ds, device=dev, growth=gr)
    )

    def build(entry: Entry, ticket: int) -> None:
        # the page's first slices go first: wait until the voxels were sent (or a
        # request needs the session), then preprocess
        entry.go.wait(BUILD_DELAY_S)
        try:
            session = factory(model, entry.source, dataset, device, growth)
            entry.finish(session, Segments(session))
        except BaseException as e:  # shown at the next request on this session
            if not isinstance(e, Sam3DError):
                log.error("preparing %s failed", entry.name, exc_info=e)
            entry.finish(error=e)
        finally:
            admission.release(ticket)
            if entry.id in store:
                store.settle(entry.id)

    async def open_path(path: Path, name: str, upload: bool) -> Entry:
        """Check the header (an upload's gzip stream bounded and unpacked to ``.nii``),
        reserve memory, read the voxels; the session is built in a thread."""
        unpacked = None
        if upload and path.name.lower().endswith(".gz"):
            unpacked = path.with_name(path.name[:-3])
        facts = await run_in_threadpool(inspect_nifti, path, image_limit, name, upload, unpacked)
        if unpacked is not None:
            path.unlink(missing_ok=True)
            path = unpacked
        ticket = 0
        try:
            need = facts.voxels * open_bytes_per_voxel
            ticket = await run_in_threadpool(admission.admit, need, name)
            image = await run_in_threadpool(read_voxels, path, name)
            entry = store.add(name, None, path, upload=upload, image=image)
        except BaseException:
            admission.release(ticket)
            if upload:
                path.unlink(missing_ok=True)
            raise
        threading.Thread(target=build, args=(entry, ticket), daemon=True).start()
        return entry

    async def json_body(request: Request, model_type: type[schema.M]) -> schema.M:
        raw = await read_body(request, MAX_JSON_BYTES, body_timeout_s, body_timeout_s)
        return schema.parse(model_type, raw)

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html", headers={"Cache-Control": "no-store"})

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
        body = await json_body(request, schema.OpenBody)
        if body.file not in served:  # names only: "../x", "/etc/passwd" are simply not names
            return _error(404, f"{body.file[:80]!r} is not one of the served files")
        entry = await open_path(served[body.file], body.file, False)
        return JSONResponse({"session": entry.id, "name": entry.name})

    async def upload(request: Request) -> Response:
        name = nifti_name(request.headers.get("x-filename", ""))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(413, f"the file is larger than the upload limit of {max_upload_mb} MB")
        path = uploads / f"{time.time_ns()}_{name}"
        what = f"{max_upload_mb} MB"
        size = await stream_to_file(request, path, limit, body_timeout_s, 10 * body_timeout_s, what)
        try:
            if size == 0:
                raise Refusal(400, "the uploaded file is empty")
            entry = await open_path(path, name, True)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return JSONResponse({"session": entry.id, "name": entry.name})

    def with_session(sid: str, fn: Callable[[Entry], Response], lock: bool = True) -> Response:
        try:
            if not lock:  # the voxels only: never blocked by a click waiting for the session
                return fn(store.peek(sid))
            with store.use(sid) as entry:
                return fn(entry)
        except UnknownSession:
            return _error(404, "this image's session has expired or is unknown; open it again")

    async def info(request: Request) -> Response:
        def answer(entry: Entry) -> Response:
            return JSONResponse(volume_header(entry, dataset))

        return await run_in_threadpool(with_session, request.path_params["sid"], answer, False)

    async def one_slice(request: Request) -> Response:
        q = request.query_params
        try:
            axis, index = int(q.get("axis", "")), int(q.get("index", ""))
        except ValueError:
            return _error(400, "expected ?axis=0..2&index=n")

        def answer(entry: Entry) -> Response:
            return _binary(slice_message(entry, axis, index), request, compress=False)

        return await run_in_threadpool(with_session, request.path_params["sid"], answer, False)

    async def volume(request: Request) -> Response:
        def send(entry: Entry) -> Response:
            response = _binary(volume_message(entry, dataset), request, compress=False)
            response.background = BackgroundTask(entry.go.set)  # once the page has them
            return response

        return await run_in_threadpool(with_session, request.path_params["sid"], send, False)

    async def edit(request: Request, body_type: type[schema.M], action: Callable) -> Response:
        body = await json_body(request, body_type)

        def run(entry: Entry) -> Response:
            t0 = time.perf_counter()
            entry.go.set()
            entry.wait()
            seg, box = action(entry.segments, body)
            message = segment_message(entry, seg, box, time.perf_counter() - t0)
            return _binary(message, request)

        return await run_in_threadpool(with_session, request.path_params["sid"], run)

    async def click(request: Request) -> Response:
        return await edit(
            request,
            schema.ClickBody,
            lambda segs, b: segs.click(b.segment, list(b.point), b.positive),
        )

    async def brush(request: Request) -> Response:
        return await edit(
            request,
            schema.BrushBody,
            lambda segs, b: segs.stroke(b.segment, b.axis, b.points, b.radius_mm, b.erase),
        )

    async def undo(request: Request) -> Response:
        return await edit(request, schema.SegmentBody, lambda segs, b: segs.undo(b.segment))

    async def redo(request: Request) -> Response:
        return await edit(request, schema.SegmentBody, lambda segs, b: segs.redo(b.segment))

    async def reset(request: Request) -> Response:
        return await edit(request, schema.SegmentBody, lambda segs, b: segs.reset(b.segment))

    async def new_segment(request: Request) -> Response:
        return await edit(
            request, schema.NewSegmentBody, lambda segs, b: (segs.add(b.name), (0,) * 6)
        )

    async def mask_file(request: Request) -> Response:
        def save(entry: Entry) -> Response:
            from sam3d.inference.grid import save_mask

            entry.go.set()
            entry.wait()
            s = entry.session
            out = uploads / f"{time.time_ns()}_{nifti_stem(entry.name)}_seg.nii.gz"
            reference = s.source if s.source is not None else s.original_affine
            save_mask(entry.segments.label_map(), out, reference)
            return FileResponse(
                out,
                media_type="application/gzip",
                filename=f"{nifti_stem(entry.name)}_seg.nii.gz",
                background=BackgroundTask(out.unlink, missing_ok=True),
            )

        return await run_in_threadpool(with_session, request.path_params["sid"], save)

    async def on_refusal(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refusal)
        return _error(exc.status, exc.message)

    async def on_user_error(request: Request, exc: Exception) -> Response:
        return _error(400, str(exc).replace(str(uploads), "uploads"))

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
            Route(sid + "/info", info),
            Route(sid + "/slice", one_slice),
            Route(sid + "/volume", volume),
            Route(sid + "/click", click, methods=["POST"]),
            Route(sid + "/brush", brush, methods=["POST"]),
            Route(sid + "/undo", undo, methods=["POST"]),
            Route(sid + "/redo", redo, methods=["POST"]),
            Route(sid + "/reset", reset, methods=["POST"]),
            Route(sid + "/segments", new_segment, methods=["POST"]),
            Route(sid + "/mask", mask_file),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={
            Refusal: on_refusal,
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
    app.state.token = token
    app.state.admission = admission
    return Guard(app, hosts, token)  # type: ignore[return-value]
