"""Attacks on ``sam3d serve`` over 127.0.0.1: each must end in a 4xx with a message.

DNS rebinding (a foreign ``Host``), cross-site posts (``text/plain`` forms, foreign
``Origin``, no page token) and the session eviction they allowed, gzip bombs, long
upload names, slow bodies and silent connections, loose JSON, and opens beyond the
memory budget. The server runs in this process (:class:`BackgroundServer`), so its
memory is this process's.
"""

from __future__ import annotations

import gzip
import http.client
import json
import resource
import socket
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sam3d.serve import create_app
from sam3d.serve.server import BackgroundServer
from sam3d.serve.sessions import SessionStore

BODY_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 2.0


class CubeModel:
    """A 7^3 cube around each positive click (window voxels), as logits."""

    crop_size = 32

    def encode(self, images):
        return images

    def decode(self, feats, points, labels):
        import torch

        out = torch.full((1, 2, *feats.shape[2:]), -5.0)
        for p, lab in zip(points[0], labels[0]):
            if lab == 1:
                lo = [max(0, int(c) - 3) for c in p]
                out[0, 1, lo[0] : lo[0] + 7, lo[1] : lo[1] + 7, lo[2] : lo[2] + 7] = 5.0
        return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    from sam3d.data.phantoms import make_ct_phantom
    from sam3d.data.phantoms.common import save_nifti

    ph = make_ct_phantom(1, shape_vox=(40, 36, 12), spacing_mm=(2.0, 2.5, 4.0), orientation="RAS")
    path = tmp_path_factory.mktemp("attacks") / "small.nii.gz"
    save_nifti(ph.image_hu, ph.affine, path, np.int16)
    return path


@pytest.fixture(scope="module")
def server(small):
    store = SessionStore(max_sessions=2)
    app = create_app(
        CubeModel(),
        {"dataset": "kits"},
        [small],
        device="cpu",
        max_upload_mb=4,
        max_image_mb=64,
        store=store,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    with BackgroundServer(app, idle_timeout_s=IDLE_TIMEOUT_S) as url:
        host, port = url.removeprefix("http://").split(":")
        yield {"app": app, "url": url, "host": host, "port": int(port), "store": store}


def request(server, method, path, body=b"", headers=None, timeout=60.0):
    """Raw HTTP (no client-side normalisation): (status, parsed JSON or bytes)."""
    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=timeout)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.getheader("content-type", "").startswith("application/json"):
        return resp.status, json.loads(data)
    return resp.status, data


def page_headers(server, **extra):
    """What the page sends: JSON, its token, its own origin."""
    return {
        "Content-Type": "application/json",
        "X-Sam3d-Token": server["app"].state.token,
        "Origin": server["url"],
        **extra,
    }


def open_small(server) -> str:
    status, body = request(
        server, "POST", "/api/open", json.dumps({"file": "small.nii.gz"}), page_headers(server)
    )
    assert status == 200, body
    return body["session"]


def refused(status, body, code, words) -> None:
    assert status == code, (status, body)
    assert isinstance(body, dict) and words in body["error"], body


# ---------------------------------------------------------------- DNS rebinding


def test_only_the_listening_hosts_are_answered(server):
    port = server["port"]
    for host in ("evil.example.com", f"evil.example.com:{port}", "127.0.0.2", "", "attacker"):
        for path in ("/", "/api/files", "/api/sessions/x/volume", "/static/viewer.js"):
            status, body = request(server, "GET", path, headers={"Host": host})
            refused(status, body, 400, "not one this server answers to")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        status, body = request(server, "GET", "/api/files", headers={"Host": host})
        assert status == 200 and body["files"] == ["small.nii.gz"], host


# ---------------------------------------------------------------- cross-site requests


def test_cross_site_posts_are_refused_and_evict_nothing(server):
    sid = open_small(server)
    before = set(server["store"]._entries)
    form = json.dumps({"file": "small.nii.gz"})
    attacks = [
        # a form or fetch(mode: no-cors) from another site: text/plain, foreign Origin
        {"Content-Type": "text/plain", "Origin": "http://evil.example.com"},
        # the same with the page's content type but no token (it cannot read the page)
        {"Content-Type": "application/json", "Origin": "http://evil.example.com"},
        # no Origin header at all, no token
        {"Content-Type": "text/plain"},
        # a browser's own word for it
        {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
    ]
    for headers in attacks * 2:  # eight posts: twice what the store holds
        status, body = request(server, "POST", "/api/open", form, headers)
        assert status == 403, (headers, status, body)
        assert "cross-site" in body["error"] or "token" in body["error"]
    # a token stolen is not enough from a foreign origin
    bad = page_headers(server, Origin="http://evil.example.com")
    refused(*request(server, "POST", "/api/open", form, bad), 403, "cross-site")
    wrong = page_headers(server, **{"X-Sam3d-Token": "guess"})
    refused(*request(server, "POST", "/api/open", form, wrong), 403, "token")
    # clicks, resets and uploads need the same
    click = json.dumps({"point": [20, 18, 6]})
    for path in (f"/api/sessions/{sid}/click", f"/api/sessions/{sid}/reset", "/api/upload"):
        status, _ = request(server, "POST", path, click, {"Content-Type": "text/plain"})
        assert status == 403, path
    assert set(server["store"]._entries) == before and sid in server["store"]
    status, _ = request(server, "POST", f"/api/sessions/{sid}/click", click, page_headers(server))
    assert status == 200  # the user's session still answers


def test_the_page_carries_its_token(server):
    status, html = request(server, "GET", "/")
    assert status == 200
    token = server["app"].state.token
    assert f'<meta name="sam3d-token" content="{token}">' in html.decode()


# ---------------------------------------------------------------- sizes


def nifti_header(shape, dtype) -> bytes:
    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(dtype)
    h["vox_offset"] = 352
    return h.binaryblock + b"\0" * 4


def gzip_with_zeros(head: bytes, zeros: int) -> bytes:
    """``head`` + ``zeros`` zero bytes, gzip-compressed in a stream (never all in memory)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts, block = [c.compress(head)], bytes(1 << 20)
    for _ in range(zeros >> 20):
        parts.append(c.compress(block))
    parts.append(c.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def bombs():
    """1 GiB of zeros, gzipped to about 1 MB, behind two headers: one declaring it
    (1024^3 uint8), one declaring 2000 bytes (10^3 int16) and hiding the rest.

    Each file is two gzip members (header, zeros), which gzip readers concatenate."""
    zeros = gzip_with_zeros(b"", 1 << 30)
    assert len(zeros) < 1_100_000
    return {
        "declared": gzip.compress(nifti_header((1024, 1024, 1024), np.uint8)) + zeros,
        "hidden": gzip.compress(nifti_header((10, 10, 10), np.int16)) + zeros,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@pytest.mark.parametrize("kind", ["declared", "hidden"])
def test_gzip_bomb_is_refused_quickly_without_a_big_allocation(server, bombs, kind):
    data = bombs[kind]
    assert len(data) < 1_100_000
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    headers = page_headers(server, **{"X-Filename": "bomb.nii.gz"})
    del headers["Content-Type"]
    status, body = request(server, "POST", "/api/upload", data, headers)
    seconds = time.perf_counter() - t0
    assert status == 413, body
    words = "over the image limit" if kind == "declared" else "more than its header declares"
    assert words in body["error"]
    assert seconds < 5.0, seconds
    assert peak_rss_mb() - rss0 < 100, (rss0, peak_rss_mb())
    assert not list(Path(server["app"].state.upload_dir).iterdir())  # nothing left behind


def test_a_5000_character_upload_name_is_capped(server, small):
    headers = page_headers(server, **{"X-Filename": "x" * 5000 + ".nii.gz"})
    del headers["Content-Type"]
    status, body = request(server, "POST", "/api/upload", small.read_bytes(), headers)
    assert status == 200, body
    assert body["name"] == "x" * 120 + ".nii.gz"
    headers["X-Filename"] = "y" * 5000 + ".png"
    status, body = request(server, "POST", "/api/upload", small.read_bytes(), headers)
    refused(status, body, 400, "not a NIfTI file name")
    assert len(body["error"]) < 200


def test_an_oversized_json_body_is_refused(server):
    sid = open_small(server)
    big = json.dumps({"point": [1, 2, 3], "pad": "x" * (100 << 10)})
    status, body = request(server, "POST", f"/api/sessions/{sid}/click", big, page_headers(server))
    refused(status, body, 413, "larger than")


# ---------------------------------------------------------------- time


def connect(server) -> socket.socket:
    s = socket.create_connection((server["host"], server["port"]))
    s.settimeout(30)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def test_a_slow_body_gets_408_and_loses_its_connection(server):
    token = server["app"].state.token
    s = connect(server)
    t0 = time.perf_counter()
    s.sendall(
        (
            "POST /api/open HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-Sam3d-Token: {token}\r\nContent-Length: 1000\r\n\r\n" + '{"file": "sm'
        ).encode()
    )
    data = read_until_closed(s)
    seconds = time.perf_counter() - t0
    assert data.startswith(b"HTTP/1.1 408") and b"too slowly" in data
    assert seconds < BODY_TIMEOUT_S + IDLE_TIMEOUT_S + 2.0, seconds
    s.close()


@pytest.mark.parametrize("sent", [b"", b"GET /api/files HTTP/1.1\r\nHost: 127."])
def test_silent_and_slow_header_connections_are_closed(server, sent):
    s = connect(server)
    t0 = time.perf_counter()
    s.sendall(sent)
    assert read_until_closed(s) == b""
    assert time.perf_counter() - t0 < IDLE_TIMEOUT_S + 2.0
    s.close()


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "body, words",
    [
        ({"point": [20, 18, 6], "positive": "false"}, "positive"),
        ({"point": [True, False, True]}, "point.0"),
        ({"point": ["1", "2", "3"]}, "point.0"),
        ({"point": [20, 18]}, "point"),
        ({"point": {"i": 1}}, "point"),
        ({"point": [20, 18, 6], "segment": "1"}, "segment"),
        ({"point": [20, 18, 6], "segment": 99}, "no segment 99"),
    ],
)
def test_loose_click_bodies_are_refused(server, body, words):
    sid = open_small(server)
    path = f"/api/sessions/{sid}/click"
    refused(*request(server, "POST", path, json.dumps(body), page_headers(server)), 400, words)
    entry = server["store"]._entries[sid]
    entry.wait(60)
    assert entry.session.points_vox == []  # nothing was clicked


def test_non_finite_and_broken_json_are_refused(server):
    sid = open_small(server)
    path = f"/api/sessions/{sid}/click"
    for raw in ('{"point": [1, 2, NaN]}', '{"point": [1, 2, 1e999]}', "{", "[]", "null"):
        refused(*request(server, "POST", path, raw, page_headers(server)), 400, "bad request")
    brush = {"axis": 3, "points": [[1, 2, 3]], "radius_mm": 2}
    path = f"/api/sessions/{sid}/brush"
    refused(*request(server, "POST", path, json.dumps(brush), page_headers(server)), 400, "axis")


# ---------------------------------------------------------------- memory


def test_opens_in_flight_are_bounded(small, tmp_path):
    """A second open while one is being prepared is refused (429), and an image needing
    more than the whole budget is refused outright (413); nothing is a 500."""
    gate = threading.Event()

    def slow_factory(model, path, dataset, device, growth):
        from sam3d.inference import ClickSession

        gate.wait(30)
        return ClickSession(model, path, dataset, device=device, growth=growth)

    app = create_app(
        CubeModel(),
        {"dataset": "kits"},
        [small],
        device="cpu",
        session_factory=slow_factory,
        max_opens=1,
        admission_wait_s=0.5,
    )
    srv = {"app": app}
    with BackgroundServer(app) as url:
        host, port = url.removeprefix("http://").split(":")
        srv.update(url=url, host=host, port=int(port))
        body = json.dumps({"file": "small.nii.gz"})
        status, first = request(srv, "POST", "/api/open", body, page_headers(srv))
        assert status == 200
        app.state.store._entries[first["session"]].go.set()  # as if the page had its voxels
        refused(*request(srv, "POST", "/api/open", body, page_headers(srv)), 429, "try again")
        gate.set()
        app.state.store._entries[first["session"]].wait(60)
        deadline = time.monotonic() + 10
        while app.state.admission.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert request(srv, "POST", "/api/open", body, page_headers(srv))[0] == 200
    voxels = 40 * 36 * 12
    app = create_app(
        CubeModel(),
        {"dataset": "kits"},
        [small],
        device="cpu",
        store=SessionStore(max_bytes=voxels * 10),
    )
    srv = {"app": app}
    with BackgroundServer(app) as url:
        host, port = url.removeprefix("http://").split(":")
        srv.update(url=url, host=host, port=int(port))
        body = json.dumps({"file": "small.nii.gz"})
        status, answer = request(srv, "POST", "/api/open", body, page_headers(srv))
        refused(status, answer, 413, "needs about")
        assert len(app.state.store) == 0


def test_the_bombs_hold_what_they_claim(bombs, tmp_path):
    """The hidden bomb's stream really is 1 GiB (counted in chunks, not held)."""
    path = tmp_path / "hidden.nii.gz"
    path.write_bytes(bombs["hidden"])
    n = 0
    with gzip.open(path) as f:
        while chunk := f.read(1 << 22):
            n += len(chunk)
    assert n == 352 + (1 << 30)
    assert nib.load(str(path)).shape == (10, 10, 10)


def test_plain_gzip_file_is_still_readable(small, tmp_path):
    """The size checks leave a normal file alone (the reader sees the same voxels)."""
    from sam3d.serve.guard import inspect_nifti

    facts = inspect_nifti(small, 64 << 20, "small.nii.gz")
    with gzip.open(small) as f:
        assert len(f.read()) >= facts.data_bytes + 348
    assert facts.shape == (40, 36, 12) and facts.dtype == np.int16
