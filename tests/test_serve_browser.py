"""The viewer driven in a real headless browser (Debian's chromium through Playwright).

A phantom with two lesions is served with an oracle model (the component of similar
intensity under a click, :mod:`serve_oracle`), so what is checked is the whole road:
page -> click -> ClickSession (preprocessing, windows, inversion) -> packed mask ->
overlay. The tests run in order on one page. Set ``SAM3D_SERVE_SCREENSHOT=path.png``
to keep the screenshot the README shows.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))
from serve_oracle import BrightComponentOracle  # noqa: E402

CHROMIUM = next(
    (
        p
        for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
        if p and os.path.exists(p)
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium found (Debian: apt-get install chromium; .ci/run installs it)",
)
playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="the Python driver is missing: pip install -e '.[test]'"
)

# seed 4 at this geometry: two separate lesions the oracle segments with Dice ~0.87 / 0.9
PHANTOM = dict(
    seed=4,
    shape_vox=(128, 128, 40),
    spacing_mm=(1.8, 1.8, 3.0),
    n_lesions=2,
    noise_hu=3.0,
    orientation="LPS",
)
TOL_HU = 15.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from sam3d.data.phantoms import make_ct_phantom
    from sam3d.data.phantoms.common import save_nifti
    from sam3d.data.pipelines import load_dataset_preset
    from sam3d.serve import create_app
    from sam3d.serve.server import BackgroundServer

    seed = PHANTOM.pop("seed")
    ph = make_ct_phantom(seed, **PHANTOM)
    PHANTOM["seed"] = seed
    folder = tmp_path_factory.mktemp("serve")
    path = folder / "phantom.nii.gz"
    save_nifti(ph.image_hu, ph.affine, path, np.int16)
    comps, n = ndimage.label(ph.label == 2)
    assert n == 2
    lesions = sorted((comps == c for c in (1, 2)), key=lambda m: -int(m.sum()))
    # the deepest voxel of each lesion: a click a user would make
    centres = [
        tuple(
            int(v) for v in np.unravel_index(np.argmax(ndimage.distance_transform_edt(m)), m.shape)
        )
        for m in lesions
    ]
    dataset = load_dataset_preset("kits")
    model = BrightComponentOracle(tol=TOL_HU / dataset["std"], crop_size=64)
    app = create_app(model, {"dataset": "kits"}, [path], device="cpu", max_upload_mb=4)
    with BackgroundServer(app) as url:
        yield {
            "app": app,
            "url": url,
            "path": path,
            "phantom": ph,
            "lesions": lesions,
            "centres": centres,
            "folder": folder,
        }


@pytest.fixture(scope="module")
def page(served):
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(
            viewport={"width": 1400, "height": 900}, accept_downloads=True
        )
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(served["url"])
        pg.wait_for_function("window.sam3d.vol?.data && window.sam3d.updates > 0")
        yield pg
        browser.close()


def updates(page) -> int:
    return int(page.evaluate("window.sam3d.updates"))


def click_voxel(page, vox, view: str = "axial", negative: bool = False) -> None:
    """Scroll the views to ``vox`` (navigation), then click on it with the mouse."""
    page.evaluate("(v) => { window.sam3d.cursor = v; renderAll(); }", list(vox))
    x, y = page.evaluate(
        """([name, v]) => {
            const c = document.getElementById(name), m = c._map, r = c.getBoundingClientRect();
            const p = flipIndex(m.ax.x, v[m.ax.x]) + 0.5, q = flipIndex(m.ax.y, v[m.ax.y]) + 0.5;
            return [r.left + (m.ox + p * m.ux) / m.dpr, r.top + (m.oy + q * m.uy) / m.dpr];
        }""",
        [view, list(vox)],
    )
    before = updates(page)
    if negative:
        page.keyboard.down("Shift")
    page.mouse.click(x, y)
    if negative:
        page.keyboard.up("Shift")
    page.wait_for_function(f"window.sam3d.updates > {before}")


def page_mask(page, shape) -> np.ndarray:
    """The mask as the page holds it (decoded in JavaScript from the packed bits)."""
    idx = page.evaluate(
        "() => { const m = window.sam3d.mask, o = []; "
        "for (let i = 0; i < m.length; i++) if (m[i]) o.push(i); return o; }"
    )
    out = np.zeros(int(np.prod(shape)), dtype=bool)
    out[np.asarray(idx, dtype=np.int64)] = True
    return out.reshape(shape)


def overlay_pixels(page, view: str) -> tuple[int, float]:
    """Red-tinted pixels drawn in ``view``, and the area the page's mask slice should cover."""
    return tuple(
        page.evaluate(
            """(name) => {
            const c = document.getElementById(name), m = c._map, S = window.sam3d;
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let red = 0;
            for (let o = 0; o < d.length; o += 4)
                if (d[o] > d[o + 1] + 40 && d[o] > d[o + 2] + 40) red++;
            const st = [S.vol.shape[1] * S.vol.shape[2], S.vol.shape[2], 1];
            let n = 0;
            for (let p = 0; p < m.nx; p++)
                for (let q = 0; q < m.ny; q++) {
                    const v = S.cursor.slice(); v[m.ax.x] = p; v[m.ax.y] = q;
                    n += S.mask[v[0] * st[0] + v[1] * st[1] + v[2]];
                }
            return [red, n * m.ux * m.uy];
        }""",
            view,
        )
    )


def red_pixels_3d(page) -> int:
    """Pixels of the 3D view showing the mask (red shades)."""
    return page.evaluate(
        """() => { const c = document.getElementById("view3d");
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let o = 0; o < d.length; o += 4) if (d[o] > d[o + 1] + 40) n++;
        return n; }"""
    )


def test_page_opens_the_served_phantom(page, served):
    shape = page.evaluate("window.sam3d.vol.shape")
    assert tuple(shape) == served["phantom"].image_hu.shape
    assert "phantom.nii.gz" in page.inner_text("#image-info")
    # the voxels arrived unchanged (int16 HU)
    i, j, k = served["centres"][0]
    order = page.evaluate("window.sam3d.vol.order")
    lin = (i * shape[1] + j) * shape[2] + k if order == "C" else (k * shape[1] + j) * shape[0] + i
    value = page.evaluate(f"window.sam3d.vol.data[{lin}]")
    assert value == int(np.rint(served["phantom"].image_hu[i, j, k]))


def test_click_in_tumour_draws_overlay(page, served):
    big = served["lesions"][0]
    click_voxel(page, served["centres"][0], view="axial")
    assert page.inner_text("#message") == ""
    mask = page_mask(page, big.shape)
    assert dice(mask, big) > 0.8, dice(mask, big)
    assert not (mask & served["lesions"][1]).any()
    for view in ("axial", "coronal", "sagittal"):  # the overlay is drawn in every view
        red, area = overlay_pixels(page, view)
        assert area > 100 and abs(red - area) < 0.25 * area, (view, red, area)
    assert red_pixels_3d(page) > 200  # the 3D rendering shows the lesion
    assert page.evaluate("window.sam3d.points")[0] == list(served["centres"][0])
    text = page.inner_text("#mask-info")
    voxel_ml = abs(np.linalg.det(served["phantom"].affine[:3, :3])) / 1000
    assert f"{mask.sum() * voxel_ml:.2f} mL" in text


def test_negative_click_removes_a_region_and_undo_restores_it(page, served):
    big, small = served["lesions"]
    click_voxel(page, served["centres"][1], view="coronal")
    both = page_mask(page, big.shape)
    assert dice(both, big | small) > 0.8
    click_voxel(page, served["centres"][1], view="sagittal", negative=True)
    after = page_mask(page, big.shape)
    assert not (after & small).any()
    assert dice(after, big) > 0.8
    assert page.evaluate("window.sam3d.labels") == [1, 1, 0]
    before = updates(page)
    page.click("#undo")
    page.wait_for_function(f"window.sam3d.updates > {before}")
    assert np.array_equal(page_mask(page, big.shape), both)


def test_save_mask_writes_the_inputs_header(page, served, tmp_path):
    with page.expect_download() as info:
        page.click("#save")
    out = tmp_path / info.value.suggested_filename
    info.value.save_as(out)
    assert out.name == "phantom_seg.nii.gz"
    saved, given = nib.load(str(out)), nib.load(str(served["path"]))
    assert saved.shape == given.shape
    np.testing.assert_array_equal(saved.affine, given.affine)
    assert np.array_equal(np.asarray(saved.dataobj) > 0, page_mask(page, given.shape))


def _post(url: str, body: dict, token: str) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", "X-Sam3d-Token": token}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_paths_outside_the_served_files_are_refused(served):
    import http.client

    url, token = served["url"], served["app"].state.token
    for name in ("../../../etc/passwd", "/etc/passwd", str(served["path"]), "phantom.nii"):
        status, body = _post(url + "/api/open", {"file": name}, token)
        assert status == 404 and "not one of the served files" in body["error"], name
    assert _post(url + "/api/open", {"file": "phantom.nii.gz"}, token)[0] == 200
    host, port = url.removeprefix("http://").split(":")
    for path in ("/static/../app.py", "/static/..%2F..%2Fcli.py", "/static/%2e%2e/app.py"):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", path)  # raw: no client-side normalisation of ".."
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 404, (path, resp.status)
        assert b"create_app" not in body and b"Traceback" not in body
        conn.close()
    status, body = _post(url + "/api/sessions/nope/click", {"point": [1, 1, 1]}, token)
    assert status == 404 and "open it again" in body["error"]


def test_corrupt_upload_shows_a_message_and_keeps_the_session(page, served, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a NIfTI volume" * 10)
    sid = page.evaluate("window.sam3d.sid")
    page.set_input_files("#picker", str(bad))
    page.wait_for_selector("#message.error")
    text = page.inner_text("#message")
    assert "cannot read" in text and "broken.nii.gz" in text and "Traceback" not in text
    assert str(served["folder"]) not in text  # no server paths in messages
    assert page.evaluate("window.sam3d.sid") == sid
    big = tmp_path / "big.nii.gz"  # over the 4 MB limit: refused in the page before sending
    big.write_bytes(os.urandom(5 * 1024 * 1024))
    page.set_input_files("#picker", str(big))
    page.wait_for_function("document.getElementById('message').textContent.includes('limit')")
    # the session still answers clicks: reset, click the small lesion
    before = updates(page)
    page.click("#reset")
    page.wait_for_function(f"window.sam3d.updates > {before}")
    assert not page_mask(page, served["lesions"][0].shape).any()
    assert red_pixels_3d(page) == 0
    click_voxel(page, served["centres"][1])
    small = served["lesions"][1]
    assert dice(page_mask(page, small.shape), small) > 0.8
    assert page.inner_text("#message") == ""


def test_server_refuses_an_upload_over_the_limit(served):
    import http.client

    host, port = served["url"].removeprefix("http://").split(":")
    limit = 4 * 1024 * 1024
    # a declared size over the limit is refused before any byte of the body is read
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/api/upload")
    conn.putheader("X-Filename", "x.nii.gz")
    conn.putheader("X-Sam3d-Token", served["app"].state.token)
    conn.putheader("Content-Length", str(limit + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "upload limit" in json.loads(resp.read())["error"]
    conn.close()
    # an undeclared (chunked) body is counted while it streams
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = [b"\0" * (1024 * 1024)] * 4 + [b"\0"]
    conn.request(
        "POST",
        "/api/upload",
        body=iter(chunks),
        headers={"X-Filename": "y.nii.gz", "X-Sam3d-Token": served["app"].state.token},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    assert resp.status == 413 and "upload limit" in json.loads(resp.read())["error"]
    conn.close()
    assert not list(Path(served["app"].state.upload_dir).iterdir())  # nothing left behind


def test_gzip_is_smaller_on_the_wire_than_the_full_mask(page, served):
    t = page.evaluate("window.sam3d.timings")
    clicks = [x for x in t if x["kind"] == "click"]
    full = int(np.prod(served["phantom"].image_hu.shape))
    assert clicks and all(0 < x["wireBytes"] < full / 50 for x in clicks)


def test_uploading_a_good_file_opens_it(page, served, tmp_path):
    from sam3d.data.phantoms import make_ct_phantom
    from sam3d.data.phantoms.common import save_nifti

    ph = make_ct_phantom(7, shape_vox=(48, 40, 16), spacing_mm=(2.0, 2.0, 4.0), orientation="RAS")
    path = tmp_path / "other case.nii.gz"
    save_nifti(ph.image_hu, ph.affine, path, np.int16)
    sid = page.evaluate("window.sam3d.sid")
    page.set_input_files("#picker", str(path))
    page.wait_for_function(f"window.sam3d.sid !== {json.dumps(sid)} && window.sam3d.vol.data")
    assert page.evaluate("window.sam3d.vol.shape") == [48, 40, 16]
    assert "other_case.nii.gz" in page.inner_text("#image-info")  # the name made safe
    assert page.eval_on_selector("#files", "s => s.value") == "other_case.nii.gz"
    assert page.inner_text("#message") == ""
    uploads = list(Path(served["app"].state.upload_dir).iterdir())
    # kept unpacked (the bounded gunzip wrote it), under the safe name
    assert [p.name.split("_", 1)[1] for p in uploads] == ["other_case.nii"]


# ---------------------------------------------------------------- navigation and readouts


def voxel_xy(page, vox, view: str = "axial") -> tuple[float, float]:
    """Where voxel ``vox``'s centre is on the screen (CSS pixels), at the page's zoom/pan."""
    return tuple(
        page.evaluate(
            """([name, v]) => {
            const c = document.getElementById(name), m = c._map, r = c.getBoundingClientRect();
            const p = flipIndex(m.ax.x, v[m.ax.x]) + 0.5, q = flipIndex(m.ax.y, v[m.ax.y]) + 0.5;
            return [r.left + (m.ox + p * m.ux) / m.dpr, r.top + (m.oy + q * m.uy) / m.dpr];
        }""",
            [view, list(vox)],
        )
    )


def voxel_under(page, x: float, y: float, view: str = "axial"):
    return page.evaluate("([n, x, y]) => eventVoxel(n, {clientX: x, clientY: y})", [view, x, y])


def test_served_image_reopens_from_the_list(page, served):
    sid = page.evaluate("window.sam3d.sid")
    page.select_option("#files", "phantom.nii.gz")
    page.wait_for_function(f"window.sam3d.sid !== {json.dumps(sid)} && window.sam3d.vol")
    # drawn from the three slices first, the whole volume after
    page.wait_for_function("window.sam3d.vol.data !== null")
    assert tuple(page.evaluate("window.sam3d.vol.shape")) == served["phantom"].image_hu.shape
    assert page.eval_on_selector("#files", "s => s.value") == "phantom.nii.gz"
    assert page.evaluate("window.sam3d.openMs") is not None


def test_value_under_the_cursor_is_the_files_value(page, served):
    given = np.asarray(nib.load(str(served["path"])).dataobj)
    rng = np.random.default_rng(0)
    for view in ("axial", "coronal", "sagittal"):
        vox = [int(rng.integers(0, n)) for n in given.shape]
        page.evaluate("(v) => { window.sam3d.cursor = v; renderAll(); }", vox)
        x, y = voxel_xy(page, vox, view)
        page.mouse.move(x, y)
        hover = page.evaluate("window.sam3d.hover")
        assert hover["view"] == view and hover["vox"] == vox
        assert hover["value"] == int(given[tuple(vox)])
        assert f"({vox[0]}, {vox[1]}, {vox[2]}) {int(given[tuple(vox)])} HU" in page.inner_text(
            "#hover-info"
        )


def test_zoom_keeps_the_voxel_under_the_mouse_and_middle_drag_pans(page, served):
    vox = list(served["centres"][0])
    page.evaluate("(v) => { window.sam3d.cursor = v; renderAll(); }", vox)
    x, y = voxel_xy(page, vox)
    width0 = page.evaluate("document.getElementById('axial')._map.ux")
    page.mouse.move(x, y)
    page.keyboard.down("Control")
    for _ in range(3):
        page.mouse.wheel(0, -100)
    page.keyboard.up("Control")
    page.wait_for_function("window.sam3d.view.axial.zoom > 1.9")
    zoom = page.evaluate("window.sam3d.view.axial.zoom")
    assert zoom == pytest.approx(1.25**3)
    assert page.evaluate("document.getElementById('axial')._map.ux") == pytest.approx(width0 * zoom)
    assert voxel_under(page, x, y) == vox  # zoomed about the mouse
    # middle drag by (40, -30) CSS px: the voxel follows the mouse
    page.mouse.down(button="middle")
    page.mouse.move(x + 20, y - 15)
    page.mouse.move(x + 40, y - 30)
    page.mouse.up(button="middle")
    assert voxel_under(page, x + 40, y - 30) == vox
    assert page.evaluate("window.sam3d.points") == []  # navigation made no click
    page.keyboard.press("r")
    assert page.evaluate("window.sam3d.view.axial") == {"zoom": 1, "panX": 0, "panY": 0}


def pixel_grey(page, vox, view="axial") -> int:
    x, y = voxel_xy(page, vox, view)
    return page.evaluate(
        """([n, x, y]) => { const c = document.getElementById(n), r = c.getBoundingClientRect();
        const d = c.getContext("2d").getImageData(
            Math.floor((x - r.left) * c._map.dpr), Math.floor((y - r.top) * c._map.dpr), 1, 1).data;
        return d[0]; }""",
        [view, x, y],
    )


def test_right_drag_sets_window_and_level(page, served):
    given = np.asarray(nib.load(str(served["path"])).dataobj)
    vox = list(served["centres"][1])
    page.evaluate("(v) => { window.sam3d.cursor = v; renderAll(); }", vox)
    lo0, hi0 = page.evaluate("window.sam3d.window")
    lo_r, hi_r = page.evaluate("window.sam3d.vol.range")
    span = max(1.0, (hi_r - lo_r) / 400)  # HU per pixel of drag
    x, y = voxel_xy(page, vox)
    updates_before = updates(page)
    page.mouse.move(x, y)
    page.mouse.down(button="right")
    page.mouse.move(x + 30, y)
    page.mouse.move(x + 60, y + 20)
    page.mouse.up(button="right")
    lo, hi = page.evaluate("window.sam3d.window")
    assert hi - lo == pytest.approx(hi0 - lo0 + 60 * span)  # right: wider
    assert (lo + hi) / 2 == pytest.approx((lo0 + hi0) / 2 - 20 * span)  # down: lower level
    assert updates(page) == updates_before  # a drag is no (negative) click
    assert page.inner_text("#wl") == f"W {hi - lo:.0f} L {(lo + hi) / 2:.0f}"
    # the drawn grey is the file's value through the new window (off the crosshair)
    off = [vox[0] + 3, vox[1] + 4, vox[2]]
    v = float(given[tuple(off)])
    expected = int(max(0, min(255, (v - lo) * 255 / (hi - lo))))
    assert abs(pixel_grey(page, off) - expected) <= 1


def test_keyboard_steps_slices(page, served):
    vox = list(served["centres"][0])
    page.evaluate("(v) => { window.sam3d.cursor = v; renderAll(); }", vox)
    x, y = voxel_xy(page, vox, "coronal")
    page.mouse.move(x, y)  # the view under the mouse takes the keys
    axis = page.evaluate("viewAxes('coronal').s")
    n = served["phantom"].image_hu.shape[axis]
    page.keyboard.press("ArrowUp")
    assert page.evaluate("window.sam3d.cursor")[axis] == vox[axis] + 1
    page.keyboard.press("PageDown")
    assert page.evaluate("window.sam3d.cursor")[axis] == max(0, vox[axis] + 1 - 10)
    for _ in range(n // 10 + 2):
        page.keyboard.press("PageUp")
    assert page.evaluate("window.sam3d.cursor")[axis] == n - 1  # clamped


# ---------------------------------------------------------------- segments and hand edits


def page_labels(page, shape) -> np.ndarray:
    """The segment id at every voxel, as the page holds it."""
    pairs = page.evaluate(
        "() => { const m = window.sam3d.mask, o = []; "
        "for (let i = 0; i < m.length; i++) if (m[i]) o.push([i, m[i]]); return o; }"
    )
    out = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    if pairs:
        idx, val = np.asarray(pairs, dtype=np.int64).T
        out[idx] = val
    return out.reshape(shape)


def test_two_segments_have_their_own_clicks_and_volumes(page, served):
    big, small = served["lesions"]
    voxel_ml = abs(np.linalg.det(served["phantom"].affine[:3, :3])) / 1000
    # a first right click is explained
    click_voxel(page, served["centres"][0], negative=True)
    assert "left-click inside the lesion first" in page.inner_text("#mask-info")
    page.click("#undo")
    page.wait_for_function("window.sam3d.points.length === 0")
    click_voxel(page, served["centres"][0])
    before = updates(page)
    page.click("#new-segment")
    page.wait_for_function(f"window.sam3d.updates > {before}")
    assert page.evaluate("window.sam3d.active") == 2
    click_voxel(page, served["centres"][1], view="coronal")
    labels = page_labels(page, big.shape)
    assert dice(labels == 1, big) > 0.8 and dice(labels == 2, small) > 0.8
    segs = page.evaluate("window.sam3d.segments")
    assert [s["id"] for s in segs] == [1, 2] and segs[0]["colour"] != segs[1]["colour"]
    for s, lab in zip(segs, (1, 2)):
        assert s["voxels"] == int((labels == lab).sum())
        assert s["volume_ml"] == pytest.approx((labels == lab).sum() * voxel_ml)
        nz = np.argwhere(labels == lab)
        ext = (nz.max(0) - nz.min(0) + 1) * np.linalg.norm(served["phantom"].affine[:3, :3], axis=0)
        assert s["extent_mm"] == pytest.approx(ext.tolist())
    items = page.inner_text("#segments")
    assert f"{segs[0]['volume_ml']:.2f} mL" in items and f"{segs[1]['volume_ml']:.2f} mL" in items
    assert page.evaluate("window.sam3d.points") == [list(served["centres"][1])]
    page.click("#segments li[data-id='1']")  # choose segment 1: its own clicks come back
    assert page.evaluate("window.sam3d.active") == 1
    assert page.evaluate("window.sam3d.points") == [list(served["centres"][0])]
    # both colours are drawn: red for 1, green for 2 (slices through each lesion)
    page.evaluate("(v) => { window.sam3d.cursor = v; renderAll(); }", list(served["centres"][1]))
    green = page.evaluate(
        """() => { const c = document.getElementById("axial");
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let o = 0; o < d.length; o += 4) if (d[o + 1] > d[o] + 40) n++;
        return n; }"""
    )
    assert green > 50
    shot = served["folder"] / "serve.png"
    page.evaluate(
        "(v) => { window.sam3d.cursor = v; renderAll(); }",
        [int(v) for v in np.round((np.array(served["centres"][0]) + served["centres"][1]) / 2)],
    )
    page.mouse.move(*voxel_xy(page, served["centres"][0], "axial"))
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("SAM3D_SERVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["SAM3D_SERVE_SCREENSHOT"])


def discs(shape, spacing, stroke) -> np.ndarray:
    """Hand expectation of a stroke: voxels of its slice within radius_mm of a point."""
    a = stroke["axis"]
    grid = np.indices(shape).astype(float)
    out = np.zeros(shape, bool)
    for p in stroke["points"]:
        d2 = sum(((grid[b] - p[b]) * spacing[b]) ** 2 for b in range(3) if b != a)
        out |= (d2 <= stroke["radius_mm"] ** 2) & (grid[a] == p[a])
    return out


def drag(page, start, end, view="axial", steps=6) -> None:
    x0, y0 = voxel_xy(page, start, view)
    x1, y1 = voxel_xy(page, end, view)
    before = updates(page)
    page.mouse.move(x0, y0)
    page.mouse.down()
    for t in np.linspace(0, 1, steps)[1:]:
        page.mouse.move(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
    page.mouse.up()
    page.wait_for_function(f"window.sam3d.updates > {before}")


def test_brush_and_eraser_edit_the_saved_label_map(page, served, tmp_path):
    shape = served["phantom"].image_hu.shape
    spacing = np.linalg.norm(served["phantom"].affine[:3, :3], axis=0)
    c0 = list(served["centres"][0])
    start = labels = page_labels(page, shape)
    # brush: segment 2 gets a stroke across empty tissue on the slice of lesion 1's centre
    page.click("#segments li[data-id='2']")
    page.check("input[value='brush']")
    page.fill("#radius", "4")
    page.dispatch_event("#radius", "input")
    page.evaluate("(v) => { window.sam3d.cursor = v; renderAll(); }", c0)
    a, b = [c0[0] + 12, c0[1] - 20, c0[2]], [c0[0] + 24, c0[1] - 20, c0[2]]
    drag(page, a, b)
    brush = page.evaluate("window.sam3d.lastStroke")
    assert brush["erase"] is False and brush["radius_mm"] == 4 and len(brush["points"]) >= 2
    assert brush["points"][0] == a and brush["points"][-1] == b
    painted = discs(shape, spacing, brush)
    expected = start.copy()
    expected[painted] = 2
    assert np.array_equal(page_labels(page, shape), expected)
    # eraser: segment 1 loses a disc at its centre on this slice
    page.click("#segments li[data-id='1']")
    page.check("input[value='eraser']")
    drag(page, c0, [c0[0] + 1, c0[1], c0[2]], steps=2)
    eraser = page.evaluate("window.sam3d.lastStroke")
    assert eraser["erase"] is True
    erased = discs(shape, spacing, eraser)
    expected[erased & (expected == 1)] = 0
    labels = page_labels(page, shape)
    assert np.array_equal(labels, expected)
    assert (erased & (start == 1)).sum() > 10
    # undo and redo the eraser
    page.click("#undo")
    page.wait_for_function("window.sam3d.seg[1].canRedo")
    undone = expected.copy()
    undone[erased & (start == 1)] = 1
    assert np.array_equal(page_labels(page, shape), undone)
    before = updates(page)
    page.keyboard.press("Control+y")
    page.wait_for_function(f"window.sam3d.updates > {before}")
    assert np.array_equal(page_labels(page, shape), expected)
    page.check("input[value='click']")
    # the saved label map: the same labels, the input's affine and shape
    with page.expect_download() as info:
        page.click("#save")
    out = tmp_path / info.value.suggested_filename
    info.value.save_as(out)
    saved, given = nib.load(str(out)), nib.load(str(served["path"]))
    assert saved.shape == given.shape
    np.testing.assert_array_equal(saved.affine, given.affine)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), expected)
    assert set(np.unique(expected)) == {0, 1, 2}
    segs = page.evaluate("window.sam3d.segments")
    assert [s["voxels"] for s in segs] == [int((expected == 1).sum()), int((expected == 2).sum())]
