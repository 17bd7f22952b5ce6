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
from sam3d.serve.app import display_axes, mask_message, nifti_name, volume_message
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


def test_volume_and_mask_messages(phantom_file):
    import nibabel as nib

    from sam3d.inference import ClickSession

    s = ClickSession(BoxModel(), phantom_file, "kits", device="cpu")
    entry = Entry("id", "small.nii.gz", s, phantom_file, False)
    header, payload = unpack_message(volume_message(entry, s.dataset))
    given = np.asarray(nib.load(str(phantom_file)).dataobj)
    assert header["shape"] == list(given.shape) and header["dtype"] == "int16"
    np.testing.assert_array_equal(np.frombuffer(payload, "<i2").reshape(given.shape), given)
    assert header["spacing_mm"] == pytest.approx([2.0, 2.5, 4.0])
    assert header["voxel_ml"] == pytest.approx(0.02)
    mask = s.click((20, 18, 6)).numpy()
    header, bits = unpack_message(mask_message(entry, mask, 0.0))
    np.testing.assert_array_equal(decode_mask(header["box"], bits, mask.shape), mask)
    assert header["voxels"] == int(mask.sum()) > 0
    assert header["volume_ml"] == pytest.approx(mask.sum() * 0.02)
    nz = np.argwhere(mask)
    ext = (nz.max(0) - nz.min(0) + 1) * np.array([2.0, 2.5, 4.0])
    assert header["extent_mm"] == pytest.approx(ext.tolist())
    assert header["points"] == [[20.0, 18.0, 6.0]] and header["labels"] == [1]


def test_http_errors_are_messages(phantom_file, tmp_path):
    from sam3d.serve import create_app
    from sam3d.serve.server import BackgroundServer

    def broken_factory(*args):
        raise RuntimeError("secret internal detail")

    def post(url, body):
        req = urllib.request.Request(url, data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    app = create_app(BoxModel(), {"dataset": "kits"}, [phantom_file], device="cpu")
    with BackgroundServer(app) as url:
        status, body = post(url + "/api/open", {"file": "small.nii.gz"})
        assert status == 200
        sid = body["session"]
        status, body = post(url + f"/api/sessions/{sid}/click", {"point": [400, 1, 1]})
        assert status == 400 and "outside the image" in body["error"]
        status, body = post(url + f"/api/sessions/{sid}/undo", {})
        assert status == 400 and body["error"] == "nothing to undo"
        status, body = post(url + f"/api/sessions/{sid}/click", {"point": "here"})
        assert status == 400 and "expected JSON" in body["error"]
    app = create_app(
        BoxModel(), {"dataset": "kits"}, [phantom_file], session_factory=broken_factory
    )
    with BackgroundServer(app) as url:
        status, body = post(url + "/api/open", {"file": "small.nii.gz"})
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
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.setattr(
        sam3d.inference, "load_model_for_inference", lambda c, d: (BoxModel(), {"dataset": "kits"})
    )
    run_server([phantom_file], tmp_path / "model.pt", host="127.0.0.1", port=8123)
    out = capsys.readouterr()
    assert "http://127.0.0.1:8123/" in out.out and "warning" not in out.err
    run_server([phantom_file], tmp_path / "model.pt", host="0.0.0.0", port=8124)
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
    assert calls == [
        {"host": "127.0.0.1", "port": 8123, "log_level": "warning"},
        {"host": "0.0.0.0", "port": 8124, "log_level": "warning"},
    ]
