"""Benchmark the viewer: opening an image and clicks in the page, measured in the browser.

Writes a synthetic CT (``make_ct_phantom``, 512x512x200 at 0.7x0.7x1 mm by default) to a
temporary folder, serves it with ``sam3d.serve.create_app`` on 127.0.0.1 (a thread of
this process), opens the page in headless chromium (Playwright, Debian's browser) and
clicks on the tumour in the axial view with the mouse. Opening: from the page's request
to the first slices drawn (``window.sam3d.openMs``: open, voxels received with progress,
three views drawn; the session's preprocessing runs after, in a thread, and the first
click waits for it). For every click the page
records ``performance.now()`` from the mouse event to two animation frames after the
overlay was drawn; the server reports its own time for the click (prompt, decode,
stitch, inversion to the original grid, packing). The first click also encodes its
window; further clicks in the same window run only the prompt encoder and the decoder.

Bytes per click: what the server sent for the mask update (box + packed bits, gzip on
the wire) against the full mask at one byte a voxel and at one bit a voxel.

Model: the ``tiny`` preset with random weights by default (window growth off: a random
model's "lesion" touches every border), or ``--checkpoint`` a trained one.
All loops are bounded: ``--clicks`` (at most 50) and ``--max-seconds``.

    python scripts/bench_serve.py                              # CPU or CUDA, tiny, 512x512x200
    python scripts/bench_serve.py --device cpu --shape 128 128 40 --spacing 1.8 1.8 3 --clicks 4
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sam3d.data.phantoms import make_ct_phantom
from sam3d.data.phantoms.common import save_nifti
from sam3d.inference import WindowGrowth, load_model_for_inference
from sam3d.models import build_sam3d
from sam3d.serve import create_app
from sam3d.serve.server import BackgroundServer

CLICK_JS = """([name, v]) => {
    window.sam3d.cursor = v; renderAll();
    const c = document.getElementById(name), m = c._map, r = c.getBoundingClientRect();
    const p = flipIndex(m.ax.x, v[m.ax.x]) + 0.5, q = flipIndex(m.ax.y, v[m.ax.y]) + 0.5;
    return [r.left + (m.ox + p * m.ux) / m.dpr, r.top + (m.oy + q * m.uy) / m.dpr];
}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="tiny", help="model preset (random weights)")
    ap.add_argument("--checkpoint", help="a trained Sam3D checkpoint instead of random weights")
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 1.0])
    ap.add_argument("--clicks", type=int, default=8, help="clicks in the page (at most 50)")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop clicking after this")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument(
        "--open-steps",
        action="store_true",
        help="only time the server's opening steps in this process (no browser, no model)",
    )
    args = ap.parse_args()
    if args.open_steps:
        open_steps(tuple(args.shape), tuple(args.spacing))
        return
    if not Path(args.chromium).exists():
        raise SystemExit(f"no chromium at {args.chromium} (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name} ({device}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    if args.checkpoint:
        model, meta = load_model_for_inference(args.checkpoint, device)
        growth = WindowGrowth()
    else:
        torch.manual_seed(0)
        model = build_sam3d(args.preset).to(device).eval()
        meta = {"dataset": "kits"}
        growth = WindowGrowth(enabled=False)
    what = args.checkpoint or f"{args.preset} (random weights, growth off)"
    print(f"model: {what}, crop {model.crop_size}")

    ph = make_ct_phantom(
        0, shape_vox=tuple(args.shape), spacing_mm=tuple(args.spacing), orientation="RAS"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    path = tmp / "ct.nii.gz"
    save_nifti(ph.image_hu, ph.affine, path, np.int16)
    tumour = np.argwhere(ph.label == 2)
    if len(tumour) == 0:
        tumour = np.argwhere(ph.label > 0)
    centre = tumour[np.argmin(((tumour - tumour.mean(0)) ** 2).sum(1))]
    n_vox = int(np.prod(args.shape))
    click = tuple(int(c) for c in centre)
    print(f"volume: {tuple(args.shape)} at {tuple(args.spacing)} mm; click near voxel {click}")

    app = create_app(model, meta, [path], device=str(device), growth=growth)
    rng = np.random.default_rng(0)
    n_clicks = max(1, min(args.clicks, 50))
    with BackgroundServer(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 560})
        page.set_default_timeout(int(args.max_seconds * 1000))
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_function("window.sam3d.vol !== null && window.sam3d.updates >= 1")
        wall = time.perf_counter() - t0
        open_ms = page.evaluate("window.sam3d.openMs")
        print(
            f"open -> first slices drawn (three slices through the centre): "
            f"{open_ms / 1000:.2f} s in the page ({wall:.2f} s from page load)"
        )
        page.wait_for_function("window.sam3d.vol.data !== null")
        print(
            f"  all {n_vox * 2 / 2**20:.0f} MiB of int16 voxels in the page: "
            f"{time.perf_counter() - t0:.2f} s from page load"
        )
        entry = next(iter(app.state.store._entries.values()))
        t1 = time.perf_counter()
        entry.ready.wait(args.max_seconds)
        print(f"  session preprocessing finished {time.perf_counter() - t1:.1f} s after that")
        for n in range(n_clicks):
            if time.monotonic() - start > args.max_seconds:
                print(f"stopped after {n} clicks: --max-seconds {args.max_seconds} reached")
                break
            offset = rng.integers(-2, 3, size=3) if n else np.zeros(3, int)
            vox = np.clip(centre + offset, 0, np.array(args.shape) - 1).tolist()
            x, y = page.evaluate(CLICK_JS, ["axial", vox])
            before = page.evaluate("window.sam3d.updates")
            page.mouse.click(x, y, button="left" if n % 4 != 3 else "right")
            page.wait_for_function(f"window.sam3d.updates > {before}")
        timings = [t for t in page.evaluate("window.sam3d.timings") if t["kind"] == "click"]
        message = page.inner_text("#message")
        browser.close()
        parts = server_breakdown(entry, repeats=3)  # before shutdown closes the entry
    if message:
        print(f"page message: {message}")
    if not timings:
        raise SystemExit("no click was answered")
    first, rest = timings[0], timings[1:]
    print(
        f"first click -> overlay drawn: {first['ms']:.0f} ms "
        f"(server {first['serverMs']:.0f} ms, includes encoding the window)"
    )
    if rest:
        ms = [t["ms"] for t in rest]
        srv = [t["serverMs"] for t in rest]
        print(
            f"further clicks -> overlay drawn: median {statistics.median(ms):.0f} ms, "
            f"max {max(ms):.0f} ms over {len(rest)} (server median {statistics.median(srv):.0f} ms)"
        )
        print(
            f"  page-side share (transfer, unpack, draw 3 views): "
            f"{statistics.median(m - s for m, s in zip(ms, srv)):.0f} ms median"
        )
    wire = [t["wireBytes"] for t in timings]
    raw = [t["rawBytes"] for t in timings]
    vox = [t["voxels"] for t in timings]
    print(
        f"bytes per mask update: median {statistics.median(wire):.0f} on the wire (gzip), "
        f"{statistics.median(raw):.0f} packed; mask voxels median {statistics.median(vox):.0f}"
    )
    print(
        f"full mask: {n_vox} bytes as uint8, {n_vox // 8} bytes bit-packed; ratio uint8 / sent "
        f"{n_vox / statistics.median(wire):.0f}x"
    )
    print("server side of a further click, median of 3 in this process (ms):")
    for k, v in parts.items():
        print(f"  {k}: {v:.0f}")
    print(
        f"  full-volume Invertd / region inversion: "
        f"{parts['inversion, whole map (Invertd)'] / parts['inversion, decoded box']:.1f}x"
    )
    shutil.rmtree(tmp, ignore_errors=True)


def open_steps(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    """The server's side of opening, step by step, against what opening did before."""
    import nibabel as nib

    from sam3d.data.io import load_image
    from sam3d.serve.app import read_voxels, slice_message, volume_message
    from sam3d.serve.sessions import Entry

    ph = make_ct_phantom(0, shape_vox=shape, spacing_mm=spacing, orientation="RAS")
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    path = tmp / "ct.nii.gz"
    save_nifti(ph.image_hu, ph.affine, path, np.int16)
    print(f"volume: {shape} at {spacing} mm, {path.stat().st_size / 2**20:.0f} MiB gzip")

    def timed(name, fn, n=2):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = fn()
            ts.append(time.perf_counter() - t0)
        print(f"  {name}: {min(ts):.2f} s (min of {n})", flush=True)
        return r

    v = timed("read_voxels (nibabel, int16 as stored)", lambda: read_voxels(path, "ct"))
    raw = timed(
        "  of which nibabel's gunzip + read", lambda: np.asanyarray(nib.load(str(path)).dataobj)
    )
    e = Entry("i", "ct", None, path, False, image=v)
    timed(
        "three slices through the centre (messages)",
        lambda: [slice_message(e, a, n // 2) for a, n in enumerate(v.data.shape)],
    )
    timed("the whole volume message", lambda: volume_message(e, {"window_hu": [0, 1]}))
    timed("before: a C-order copy for the page", lambda: np.ascontiguousarray(raw, "<i2"))
    timed("before: load_image (MONAI), what opening read with", lambda: load_image(path), n=1)
    shutil.rmtree(tmp, ignore_errors=True)


def server_breakdown(entry, repeats: int = 3) -> dict[str, float]:
    """Time the steps of a further click on the open session (same clicks, features cached)."""
    from sam3d.inference.grid import invert_region_to_original, invert_to_original
    from sam3d.serve.app import segment_message

    s = entry.session
    grid = torch.as_tensor(s._grid_points(s.points_vox), dtype=torch.float32)
    labels = torch.as_tensor(s.point_labels)
    seeds = s._state.seeds
    out: dict[str, list[float]] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        r = fn(*args)
        out.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
        return r

    def full_inversion(prob):
        return invert_to_original(prob, s.grid_image, s.transform) > s.threshold

    roi, shape = s.predictor.roi, s.predictor.shape
    for _ in range(repeats):
        probs = timed("prompt + decode", s.predictor.predict_windows, grid, labels, seeds)
        prob = timed("stitch", s.predictor.stitch, probs)
        lo = [max(0, min(o[a] for o in probs)) for a in range(3)]
        hi = [min(shape[a], max(o[a] + roi[a] for o in probs)) for a in range(3)]
        args = (prob, s.grid_image.affine, s.original_affine, s.original_shape, lo, hi)
        timed("inversion, decoded box", invert_region_to_original, *args)
        timed("inversion, whole map (Invertd)", full_inversion, prob)
        segs = entry.segments
        seg = segs.items[segs.active]
        timed("model mask -> compact (box pass over the volume)", segs._model_from_session, seg)
        timed("segment compose (model mask + strokes, box)", segs._compose, seg)
        box = seg.final.box
        timed("segment message (changed box, bits)", segment_message, entry, seg, box, 0.0)
    return {k: statistics.median(v) for k, v in out.items()}


if __name__ == "__main__":
    main()
