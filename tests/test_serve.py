"""The viewer's server side without a browser: mask messages, sessions, names, HTTP errors."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from sam3d.errors import Sam3DError
from sam3d.serve.app import display_axes, nifti_name, segment_message, volume_message
from sam3d.serve.masks import decode_mask, encode_mask, mask_box, pack_message, unpack_message
from sam3d.serve.sessions import Entry, SessionStore, UnknownSession, session_bytes

# ---------------------------------------------------------------- masks


def test_one_voxel_mask_by_hand():
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3] = True
    box, bits = encode_mask(mask)
    assert box == [1, 2, 3, 2, 3, 4]
    assert bits == b"\x80"  # one voxel: the most significant bit of one byte


def test_mask_round_trip_and_box_against_argwhere():
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 20, 17), bool)
    mask[5:19, 3:11, 2:16] = rng.random((14, 8, 14)) > 0.6
    box, bits = encode_mask(mask)
    nz = np.argwhere(mask)
    assert box == [*nz.min(0).tolist(), *(nz.max(0) + 1).tolist()]
    n = int(np.prod(np.subtract(box[3:], box[:3])))
    assert len(bits) == (n + 7) // 8
    np.testing.assert_array_equal(decode_mask(box, bits, mask.shape), mask.astype(np.uint8))


def test_empty_mask():
    box, bits = encode_mask(np.zeros((3, 3, 3), np.uint8))
    assert box == [0] * 6 and bits == b""
    assert mask_box(np.zeros((2, 2, 2))) == (0, 0, 0, 0, 0, 0)
    assert not decode_mask(box, bits, (3, 3, 3)).any()


def test_message_round_trip():
    data = pack_message({"box": [1, 2], "name": "x"}, b"\x01\x02")
    header, payload = unpack_message(data)
    assert header == {"box": [1, 2], "name": "x"} and payload == b"\x01\x02"
    assert int.from_bytes(data[:4], "little") == len(json.dumps(header, separators=(",", ":")))


# ---------------------------------------------------------------- names and geometry


@pytest.mark.parametrize(
    "given, safe",
    [
        ("case.nii.gz", "case.nii.gz"),
        ("a/b/../c.nii", "c.nii"),
        ("x y?.nii.gz", "x_y_.nii.gz"),
        ("C:\\data\\scan.NII.GZ", "scan.NII.GZ"),
    ],
)
def test_nifti_name_keeps_only_a_base_name(given, safe):
    assert nifti_name(given) == safe


@pytest.mark.parametrize("bad", ["../../etc/passwd", "", ".nii.gz", "image.png", "/"])
def test_nifti_name_refuses(bad):
    with pytest.raises(Sam3DError):
        nifti_name(bad)


def test_display_axes():
    assert display_axes(np.diag([1.0, 1.0, 2.0, 1.0])) == ([0, 1, 2], [1, 1, 1])
    assert display_axes(np.diag([-0.7, -0.7, 3.0, 1.0])) == ([0, 1, 2], [-1, -1, 1])  # LPS
    perm = np.zeros((4, 4))
    perm[2, 0], perm[0, 1], perm[1, 2], perm[3, 3] = -2.0, 1.0, 1.0, 1.0  # i->-S, j->R, k->A
    assert display_axes(perm) == ([2, 0, 1], [-1, 1, 1])


# ---------------------------------------------------------------- sessions


class FakeSession:
    """Stands in for ClickSession: tensors of a known size, a click that can be watched."""

    def __init__(self, nbytes: int = 1000, delay_s: float = 0.0) -> None:
        self.original_image = torch.zeros(nbytes // 4, dtype=torch.float32)
        self.grid_image = None
        self.predictor = type("P", (), {"cache": {}})()
        self.prob_grid = self.mask = None
        self.delay_s, self.inside, self.overlaps = delay_s, 0, 0

    def click(self) -> None:
        self.inside += 1
        self.overlaps += self.inside > 1
        time.sleep(self.delay_s)
        self.inside -= 1


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_session_bytes_counts_images_and_cached_features():
    s = FakeSession(4000)
    s.predictor.cache[(0, 0, 0)] = [torch.zeros(10, dtype=torch.float64), {"x": torch.zeros(5)}]
    assert session_bytes(s) == 4000 + 80 + 20


def test_sessions_expire_after_ttl(tmp_path):
    clock = Clock()
    store = SessionStore(ttl_s=60, clock=clock)
    upload = tmp_path / "up.nii.gz"
    upload.write_bytes(b"x")
    a = store.add("a", FakeSession(), upload, upload=True)
    clock.t = 30
    b = store.add("b", FakeSession(), tmp_path / "given.nii.gz")
    clock.t = 61
    assert store.expire() == [a.id]
    assert a.id not in store and b.id in store
    assert not upload.exists()  # an upload goes with its session
    with pytest.raises(UnknownSession):
        with store.use(a.id):
            pass


def test_least_recently_used_session_goes_first(tmp_path):
    clock = Clock()
    store = SessionStore(max_sessions=2, clock=clock)
    a = store.add("a", FakeSession(), tmp_path / "a")
    clock.t = 1
    b = store.add("b", FakeSession(), tmp_path / "b")
    clock.t = 2
    with store.use(a.id):  # a is now more recent than b
        pass
    clock.t = 3
    c = store.add("c", FakeSession(), tmp_path / "c")
    assert a.id in store and b.id not in store and c.id in store


def test_memory_bound(tmp_path):
    store = SessionStore(max_bytes=2500)
    a = store.add("a", FakeSession(1000), tmp_path / "a")
    b = store.add("b", FakeSession(1000), tmp_path / "b")
    c = store.add("c", FakeSession(1000), tmp_path / "c")
    assert a.id not in store and {b.id, c.id} <= set(store._entries)
    assert store.total_bytes() == 2000
    with pytest.raises(Sam3DError, match="more memory"):
        store.add("huge", FakeSession(4000), tmp_path / "huge")
    assert set(store._entries) == {b.id, c.id}  # refused without evicting the others


def test_requests_on_one_session_are_serialised(tmp_path):
    store = SessionStore()
    s = FakeSession(delay_s=0.02)
    e = store.add("a", s, tmp_path / "a")

    def work() -> None:
        for _ in range(5):
            with store.use(e.id) as entry:
                entry.session.click()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert s.overlaps == 0


def test_unserialised_clicks_do_overlap():
    """The check above can fail: without the lock, the same clicks overlap."""
    s = FakeSession(delay_s=0.02)
    threads = [threading.Thread(target=s.click) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert s.overlaps > 0


# ---------------------------------------------------------------- messages of a real session


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory) -> Path:
    from sam3d.data.phantoms import make_ct_phantom
    from sam3d.data.phantoms.common import save_nifti

    ph = make_ct_phantom(1, shape_vox=(40, 36, 12), spacing_mm=(2.0, 2.5, 4.0), orientation="RAS")
    path = tmp_path_factory.mktemp("serve") / "small.nii.gz"
    save_nifti(ph.image_hu, ph.affine, path, np.int16)
    return path


class BoxModel(torch.nn.Module):
    """Predicts a fixed cube around each positive click (window voxels)."""

    crop_size = 32

    def encode(self, images):
        return images

    def decode(self, feats, points, labels):
        out = torch.full((1, 2, *feats.shape[2:]), -5.0)
        for p, lab in zip(points[0], labels[0]):
            if lab == 1:
                lo = [max(0, int(c) - 3) for c in p]
                out[0, 1, lo[0] : lo[0] + 7, lo[1] : lo[1] + 7, lo[2] : lo[2] + 7] = 5.0
        return out


def test_volume_and_segment_messages(phantom_file):
    import nibabel as nib

    from sam3d.inference import ClickSession
    from sam3d.serve.app import read_voxels
    from sam3d.serve.segments import Segments

    s = ClickSession(BoxModel(), phantom_file, "kits", device="cpu")
    image = read_voxels(phantom_file, "small.nii.gz")
    np.testing.assert_allclose(image.affine, s.original_affine, atol=1e-5)
    entry = Entry("id", "small.nii.gz", s, phantom_file, False, image=image)
    entry.segments = Segments(s)
    header, payload = unpack_message(volume_message(entry, s.dataset))
    given = np.asarray(nib.load(str(phantom_file)).dataobj)
    assert header["shape"] == list(given.shape) and header["dtype"] == "int16"
    assert header["order"] == "F"  # a NIfTI file's own order: no transposed copy
    flat = np.frombuffer(payload, "<i2")
    np.testing.assert_array_equal(flat.reshape(given.shape, order="F"), given)
    assert header["spacing_mm"] == pytest.approx([2.0, 2.5, 4.0])
    assert header["voxel_ml"] == pytest.approx(0.02)
    seg, box = entry.segments.click(1, (20, 18, 6), True)
    mask = s.mask.numpy()
    header, bits = unpack_message(segment_message(entry, seg, box, 0.0))
    np.testing.assert_array_equal(decode_mask(header["box"], bits, mask.shape), mask)
    assert header["voxels"] == int(mask.sum()) > 0
    assert header["volume_ml"] == pytest.approx(mask.sum() * 0.02)
    nz = np.argwhere(mask)
    ext = (nz.max(0) - nz.min(0) + 1) * np.array([2.0, 2.5, 4.0])
    assert header["extent_mm"] == pytest.approx(ext.tolist())
    assert header["points"] == [[20.0, 18.0, 6.0]] and header["labels"] == [1]
    assert header["can_undo"] and not header["can_redo"]


def _post(url, body, token, headers=None):
    h = {"Content-Type": "application/json", "X-Sam3d-Token": token, **(headers or {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=h)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_errors_are_messages(phantom_file, tmp_path):
    from sam3d.serve import create_app
    from sam3d.serve.server import BackgroundServer

    def broken_factory(*args):
        raise RuntimeError("secret internal detail")

    app = create_app(BoxModel(), {"dataset": "kits"}, [phantom_file], device="cpu")
    token = app.state.token
    with BackgroundServer(app) as url:
        status, body = _post(url + "/api/open", {"file": "small.nii.gz"}, token)
        assert status == 200
        sid = json.loads(body)["session"]
        status, body = _post(url + f"/api/sessions/{sid}/click", {"point": [400, 1, 1]}, token)
        assert status == 400 and "outside the image" in body["error"]
        status, body = _post(url + f"/api/sessions/{sid}/undo", {}, token)
        assert status == 400 and body["error"] == "nothing to undo"
        status, body = _post(url + f"/api/sessions/{sid}/redo", {}, token)
        assert status == 400 and body["error"] == "nothing to redo"
        status, body = _post(url + f"/api/sessions/{sid}/click", {"point": "here"}, token)
        assert status == 400 and "point" in body["error"]
        # the page's first draw: geometry, then single slices of the file's voxels
        import nibabel as nib

        given = np.asarray(nib.load(str(phantom_file)).dataobj)
        with urllib.request.urlopen(url + f"/api/sessions/{sid}/info", timeout=60) as r:
            info = json.loads(r.read())
        assert info["shape"] == list(given.shape) and info["dtype"] == "int16"
        for axis, index in ((0, 3), (1, 35), (2, 11)):
            q = f"/api/sessions/{sid}/slice?axis={axis}&index={index}"
            with urllib.request.urlopen(url + q, timeout=60) as r:
                header, payload = unpack_message(r.read())
            plane = np.frombuffer(payload, "<i2").reshape(header["shape"])
            np.testing.assert_array_equal(plane, np.take(given, index, axis=axis))
        for q in ("axis=3&index=0", "axis=0&index=40", "axis=x&index=1", "index=1"):
            try:
                urllib.request.urlopen(url + f"/api/sessions/{sid}/slice?{q}", timeout=60)
                raise AssertionError(q)
            except urllib.error.HTTPError as e:
                assert e.code == 400 and "error" in json.loads(e.read())
    app = create_app(
        BoxModel(), {"dataset": "kits"}, [phantom_file], session_factory=broken_factory
    )
    with BackgroundServer(app) as url:
        token = app.state.token
        status, body = _post(url + "/api/open", {"file": "small.nii.gz"}, token)
        assert status == 200  # the voxels are read; the session fails while it is built
        sid = json.loads(body)["session"]
        status, body = _post(url + f"/api/sessions/{sid}/click", {"point": [1, 1, 1]}, token)
        assert status == 500 and "internal error (RuntimeError)" in body["error"]
        assert "secret" not in body["error"] and "Traceback" not in body["error"]


def test_create_app_refuses_missing_and_non_nifti_files(phantom_file, tmp_path):
    from sam3d.serve import create_app

    with pytest.raises(Sam3DError, match="no such file"):
        create_app(BoxModel(), {"dataset": "kits"}, [tmp_path / "missing.nii.gz"])
    png = tmp_path / "x.png"
    png.write_bytes(b"x")
    with pytest.raises(Sam3DError, match="not a NIfTI"):
        create_app(BoxModel(), {"dataset": "kits"}, [png])


def test_cli_serve_without_checkpoint_uses_the_shipped_model(tmp_path, monkeypatch, capsys):
    import uvicorn

    import sam3d.weights
    from sam3d.cli import main

    monkeypatch.chdir(tmp_path)  # no demo_out/ here
    # an install without the shipped model: one line that says what to pass
    monkeypatch.setattr(sam3d.weights, "SHIPPED_MODEL", tmp_path / "absent.pt")
    assert main(["serve"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    monkeypatch.undo()
    if not sam3d.weights.SHIPPED_MODEL.is_file():
        return  # a checkout without the shipped model: the error above is the behaviour
    monkeypatch.chdir(tmp_path)
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert main(["serve"]) == 0
    out = capsys.readouterr().out
    assert "tiny_synth.pt" in out and "synthetic volumes only" in out and "0 image(s)" in out
    assert served["host"] == "127.0.0.1"
    # images given and no checkpoint: the shipped model too (a missing image is refused)
    assert main(["serve", str(tmp_path / "a.nii.gz")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_demo_inputs_finds_the_demos_model_and_held_out_phantoms(tmp_path):
    from sam3d.serve.server import demo_inputs

    (tmp_path / "kits_bundle_run" / "models").mkdir(parents=True)
    (tmp_path / "kits_bundle_run" / "models" / "model.pt").write_bytes(b"x")
    folder = tmp_path / "phantoms_ct"
    (folder / "imagesTr").mkdir(parents=True)
    for n in (0, 1, 2):
        (folder / "imagesTr" / f"phantom_{n:03d}.nii.gz").write_bytes(b"x")
    listing = {
        "training": [{"image": "./imagesTr/phantom_000.nii.gz"}],
        "validation": [{"image": "./imagesTr/phantom_001.nii.gz"}],
        "test": [{"image": "./imagesTr/phantom_002.nii.gz"}],
    }
    (folder / "dataset.json").write_text(json.dumps(listing))
    checkpoint, images = demo_inputs(tmp_path)
    assert checkpoint == tmp_path / "kits_bundle_run" / "models" / "model.pt"
    assert [p.name for p in images] == ["phantom_002.nii.gz", "phantom_001.nii.gz"]


def test_run_server_warns_off_loopback(phantom_file, tmp_path, monkeypatch, capsys):
    import uvicorn

    import sam3d.inference
    from sam3d.serve.server import run_server

    calls = []
    monkeypatch.setattr(
        uvicorn, "run", lambda app, **kw: calls.append({"hosts": app.allowed, **kw})
    )
    monkeypatch.setattr(
        sam3d.inference, "load_model_for_inference", lambda c, d: (BoxModel(), {"dataset": "kits"})
    )
    run_server([phantom_file], tmp_path / "model.pt", host="127.0.0.1", port=8123)
    out = capsys.readouterr()
    assert "http://127.0.0.1:8123/" in out.out and "warning" not in out.err
    run_server(
        [phantom_file], tmp_path / "model.pt", host="0.0.0.0", port=8124, allow_hosts=["ct.lan"]
    )
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
    import socket

    assert calls[0]["hosts"] == {"127.0.0.1", "localhost", "::1"}
    assert {"ct.lan", socket.gethostname().lower(), "127.0.0.1"} <= calls[1]["hosts"]
    assert "0.0.0.0" not in calls[1]["hosts"] and "*" not in calls[1]["hosts"]
    assert [(c["host"], c["port"], c["timeout_keep_alive"]) for c in calls] == [
        ("127.0.0.1", 8123, 5.0),
        ("0.0.0.0", 8124, 5.0),
    ]


# ---------------------------------------------------------------- guard, schema, segments


@pytest.mark.parametrize(
    "header, name",
    [
        ("127.0.0.1:8000", "127.0.0.1"),
        ("[::1]:8000", "::1"),
        ("LocalHost", "localhost"),
        ("evil.example.com.:80", "evil.example.com"),
        ("", ""),
    ],
)
def test_host_name(header, name):
    from sam3d.serve.guard import host_name

    assert host_name(header) == name


def test_upload_names_are_capped():
    long = nifti_name("a" * 5000 + ".nii.gz")
    assert long == "a" * 120 + ".nii.gz"
    with pytest.raises(Sam3DError) as e:
        nifti_name("b" * 5000 + ".png")
    assert len(str(e.value)) < 200


def _nifti_bytes(shape, dtype, extra_zero_bytes: int) -> bytes:
    """A NIfTI-1 header declaring ``shape`` / ``dtype``, then ``extra`` zero bytes (raw)."""
    import nibabel as nib

    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(dtype)
    h["vox_offset"] = 352
    return h.binaryblock + b"\0" * 4 + b"\0" * extra_zero_bytes


def test_inspect_nifti_refuses_by_the_declared_size_and_the_stream(tmp_path):
    import gzip

    from sam3d.serve.guard import Refusal, inspect_nifti

    ok = tmp_path / "ok.nii.gz"
    ok.write_bytes(gzip.compress(_nifti_bytes((10, 10, 10), np.int16, 2000)))
    facts = inspect_nifti(ok, 1 << 20, "ok.nii.gz")
    assert facts.shape == (10, 10, 10) and facts.data_bytes == 2000 and facts.voxels == 1000
    big = tmp_path / "big.nii.gz"  # declares 512 MiB: refused from the header alone
    big.write_bytes(gzip.compress(_nifti_bytes((1024, 1024, 256), np.int16, 0)))
    with pytest.raises(Refusal) as e:
        inspect_nifti(big, 256 << 20, "big.nii.gz")
    assert e.value.status == 413 and "1024 x 1024 x 256" in e.value.message
    # declares 2000 bytes, holds 8 MiB: the stream stops one chunk past what was declared
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(gzip.compress(_nifti_bytes((10, 10, 10), np.int16, 8 << 20)))
    with pytest.raises(Refusal) as e:
        inspect_nifti(padded, 64 << 20, "padded.nii.gz")
    assert e.value.status == 413 and "more than its header declares" in e.value.message
    inspect_nifti(padded, 64 << 20, "padded.nii.gz", check_stream=False)  # served: trusted
    # an upload is unpacked while it is checked: the same bytes, or nothing on a refusal
    out = tmp_path / "ok.nii"
    inspect_nifti(ok, 1 << 20, "ok.nii.gz", unpack_to=out)
    assert out.read_bytes() == gzip.decompress(ok.read_bytes())
    out = tmp_path / "padded.nii"
    with pytest.raises(Refusal):
        inspect_nifti(padded, 64 << 20, "padded.nii.gz", unpack_to=out)
    assert not out.exists()
    for bad in (b"\x1f\x8b not gzip at all" * 20, b"plain junk" * 100):
        junk = tmp_path / "junk.nii.gz"
        junk.write_bytes(bad)
        with pytest.raises(Refusal) as e:
            inspect_nifti(junk, 1 << 20, "junk.nii.gz")
        assert e.value.status == 400 and "cannot read junk.nii.gz" in e.value.message


def test_admission_bounds_memory_and_count():
    from sam3d.serve.guard import Admission, Refusal

    adm = Admission(max_bytes=100, max_opens=2, wait_s=0.05)
    a = adm.admit(60, "a")
    with pytest.raises(Refusal) as e:
        adm.admit(50, "b")  # 110 > 100 in flight
    assert e.value.status == 429
    b = adm.admit(40, "b")
    with pytest.raises(Refusal) as e:
        adm.admit(0, "c")  # a third open at once
    assert e.value.status == 429
    with pytest.raises(Refusal) as e:
        adm.admit(101, "huge")
    assert e.value.status == 413 and "huge" in e.value.message
    adm.release(a)
    adm.release(b)
    adm.release(adm.admit(100, "d"))
    assert adm.in_flight == {}
    # an open that does not fit waits for room instead of failing at once
    adm.wait_s = 30.0
    first = adm.admit(80, "e")
    threading.Timer(0.3, adm.release, args=(first,)).start()
    t0 = time.monotonic()
    adm.release(adm.admit(80, "f"))
    assert 0.2 < time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"point": [1, 2, 3], "positive": "false"}, "positive"),
        ({"point": [True, False, True]}, "point.0"),
        ({"point": ["1", "2", "3"]}, "point.0"),
        ({"point": [1, 2]}, "point"),
        ({"point": [1, 2, 3, 4]}, "point"),
        ({"point": [1, 2, 3], "segment": 0}, "segment"),
        ({"point": [1, 2, 3], "extra": 1}, "extra"),
        ({"positive": True}, "point"),
    ],
)
def test_click_schema_is_strict(body, problem):
    from sam3d.serve.guard import Refusal
    from sam3d.serve.schema import ClickBody, parse

    with pytest.raises(Refusal) as e:
        parse(ClickBody, json.dumps(body).encode())
    assert e.value.status == 400 and problem in e.value.message
    ok = parse(ClickBody, b'{"point": [1, 2.5, 3], "positive": false}')
    assert ok.point == (1.0, 2.5, 3.0) and ok.positive is False and ok.segment == 1


def test_click_schema_refuses_non_finite():
    from sam3d.serve.guard import Refusal
    from sam3d.serve.schema import ClickBody, parse

    for raw in (
        b'{"point": [1, 2, NaN]}',
        b'{"point": [1, 2, Infinity]}',
        b'{"point": [1, 2, 1e999]}',
    ):
        with pytest.raises(Refusal):
            parse(ClickBody, raw)


class _FakeClicks:
    """A ClickSession stand-in: each positive click adds a 3^3 cube, negative removes it."""

    def __init__(self, shape=(20, 20, 10)) -> None:
        from sam3d.inference.session import _State

        self.original_shape = shape
        self.original_affine = np.diag([2.0, 1.0, 3.0, 1.0])
        self._state, self._history, self._windows = _State([], [], []), [], []
        self.mask = self.prob_grid = None

    @property
    def points_vox(self):
        return list(self._state.points_vox)

    @property
    def point_labels(self):
        return list(self._state.labels)

    def click(self, p, positive=True):
        from sam3d.inference.session import _State

        self._history.append(self._state)
        self._state = _State(self.points_vox + [tuple(p)], self.point_labels + [int(positive)], [])
        return self._update()

    def undo(self):
        self._state = self._history.pop()
        return self._update()

    def reset(self):
        from sam3d.inference.session import _State

        self._history.clear()
        self._state, self.mask = _State([], [], []), None

    def _update(self):
        m = np.zeros(self.original_shape, bool)
        for p, lab in zip(self._state.points_vox, self._state.labels):
            i, j, k = (int(c) for c in p)
            m[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = bool(lab)
        self.mask = torch.as_tensor(m)
        return self.mask


def test_segments_keep_their_own_clicks_strokes_and_history():
    from sam3d.serve.segments import Segments

    s = _FakeClicks()
    segs = Segments(s)
    segs.click(1, (5, 5, 5), True)
    two = segs.add("kidney")
    assert two.id == 2 and two.name == "kidney" and segs.active == 2
    seg, box = segs.click(2, (14, 14, 5), True)
    assert seg.points == [[14, 14, 5]] and segs.items[1].points == [[5, 5, 5]]
    assert box == (13, 13, 4, 16, 16, 7) and seg.final.voxels() == 27
    # a stroke on axial slice k=5: discs of 2.5 mm (spacing 2 x 1 mm): |di| <= 1, |dj| <= 2
    seg, box = segs.stroke(2, 2, [[3, 15, 5]], 2.5, erase=False)
    painted = {
        (i, j) for i in range(20) for j in range(20) if ((i - 3) * 2) ** 2 + (j - 15) ** 2 <= 6.25
    }
    assert len(painted) == 11 and seg.final.voxels() == 27 + 11
    assert box == (2, 13, 4, 16, 18, 7)  # old final box joined with the new one
    # the eraser removes a hand-painted disc and model voxels alike
    seg, _ = segs.stroke(2, 2, [[14, 14, 5]], 1.0, erase=True)
    assert seg.final.voxels() == 27 + 11 - 3  # (14, 13..15, 5)
    labels = segs.label_map()
    assert (labels == 1).sum() == 27 and (labels == 2).sum() == 35
    assert labels[14, 14, 5] == 0 and labels[14, 14, 4] == 2 and labels[3, 17, 5] == 2
    # undo walks back strokes, then the click; redo replays them; seg 1 is untouched
    segs.undo(2)
    segs.undo(2)
    assert segs.items[2].final.voxels() == 27
    seg, _ = segs.undo(2)
    assert seg.final.voxels() == 0 and seg.points == []
    seg, _ = segs.redo(2)
    assert seg.final.voxels() == 27 and seg.points == [[14, 14, 5]]
    seg, _ = segs.redo(2)
    assert seg.final.voxels() == 38
    seg, _ = segs.click(2, (14, 14, 5), False)  # a new edit drops what could be redone
    assert not seg.redo
    with pytest.raises(Sam3DError, match="nothing to redo"):
        segs.redo(2)
    # the model removed its cube, the hand-painted disc stays
    assert seg.final.voxels() == 11
    seg1, _ = segs.undo(1)
    assert seg1.final.voxels() == 0 and segs.items[2].final.voxels() == 11
    with pytest.raises(Sam3DError, match="nothing to undo"):
        segs.undo(1)
    with pytest.raises(Sam3DError, match="outside"):
        segs.stroke(1, 0, [[25, 1, 1]], 2.0, erase=False)


def test_voxels_are_served_while_a_click_waits_for_the_session(phantom_file):
    """The page's voxels never wait behind a click that waits for preprocessing."""
    from sam3d.inference import ClickSession
    from sam3d.serve import create_app
    from sam3d.serve.server import BackgroundServer

    gate = threading.Event()

    def slow_factory(model, path, dataset, device, growth):
        gate.wait(60)
        return ClickSession(model, path, dataset, device=device, growth=growth)

    app = create_app(
        BoxModel(), {"dataset": "kits"}, [phantom_file], device="cpu", session_factory=slow_factory
    )
    token = app.state.token
    with BackgroundServer(app) as url:
        status, body = _post(url + "/api/open", {"file": "small.nii.gz"}, token)
        sid = json.loads(body)["session"]
        answers = []
        clicker = threading.Thread(
            target=lambda: answers.append(
                _post(url + f"/api/sessions/{sid}/click", {"point": [20, 18, 6]}, token)
            )
        )
        clicker.start()
        time.sleep(0.5)  # the click holds the session's lock, waiting for the build
        assert clicker.is_alive()
        t0 = time.monotonic()
        for path in ("info", "slice?axis=2&index=5", "volume"):
            with urllib.request.urlopen(url + f"/api/sessions/{sid}/{path}", timeout=30) as r:
                assert r.status == 200
        assert time.monotonic() - t0 < 10
        gate.set()
        clicker.join(60)
        assert answers and answers[0][0] == 200


def test_cli_passes_the_network_options(tmp_path, monkeypatch):
    import sam3d.serve.server
    from sam3d.cli import main

    seen = {}
    monkeypatch.setattr(
        sam3d.serve.server, "run_server", lambda images, checkpoint, **kw: seen.update(kw)
    )
    argv = ["serve", "--allow-host", "ct.lan", "--allow-host", "ct2.lan", "--max-image-mb", "100"]
    assert main(argv) in (0, None)
    assert seen["allow_hosts"] == ["ct.lan", "ct2.lan"] and seen["max_image_mb"] == 100.0
