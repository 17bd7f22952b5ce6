// sam3d serve: three orthogonal views of one volume, clicks sent to the server,
// the mask drawn over every view. Plain JavaScript, no build step.
// Messages from the server are: uint32 header length, JSON header, payload.
"use strict";

const S = {                  // the page's state; window.sam3d for tests and benchmarks
  sid: null, name: null, vol: null, mask: null, box: [0, 0, 0, 0, 0, 0],
  cursor: [0, 0, 0], window: [0, 1], turn: [0.5, 0.35], surface: null, opacity: 0.5, points: [], labels: [],
  maxUploadMb: 512, updates: 0, clicks: 0, timings: [], queue: Promise.resolve(),
};
window.sam3d = S;

// Each view: the world axis it slices and the world axes along screen x and y
// (0 R, 1 A, 2 S). Screen coordinates run against world coordinates: patient right
// on the left (radiological), anterior and superior at the top, anterior left in sagittal.
const VIEWS = {
  axial: { slice: 2, x: 0, y: 1 },
  coronal: { slice: 1, x: 0, y: 2 },
  sagittal: { slice: 0, x: 1, y: 2 },
};

const $ = (id) => document.getElementById(id);

function say(text, kind) {
  const m = $("message");
  m.textContent = text || "";
  m.className = kind || "";
}

function readMessage(buf) {
  const n = new DataView(buf).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  return { header, payload: buf.slice(4 + n) };
}

async function api(path, options) {
  const res = await fetch(path, options);
  if (!res.ok) {
    let text = `${res.status} ${res.statusText}`;
    try { text = (await res.json()).error || text; } catch (e) { /* not JSON */ }
    throw new Error(text);
  }
  return res;
}

async function binary(path, options) {
  const res = await api(path, options);
  const msg = readMessage(await res.arrayBuffer());
  msg.wireBytes = Number(res.headers.get("X-Sam3d-Bytes") || 0);
  msg.rawBytes = Number(res.headers.get("X-Sam3d-Raw-Bytes") || 0);
  return msg;
}

const nextPaint = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));

// ---------------------------------------------------------------- volume geometry

function strides(shape) { return [shape[1] * shape[2], shape[2], 1]; }

function voxelAxis(world) { return S.vol.axisWorld.indexOf(world); }

// screen position p along voxel axis a -> voxel index (and back: the same map)
function flipIndex(a, p) { return S.vol.axisSign[a] > 0 ? S.vol.shape[a] - 1 - p : p; }

function viewAxes(name) {
  const v = VIEWS[name];
  return { s: voxelAxis(v.slice), x: voxelAxis(v.x), y: voxelAxis(v.y) };
}

// ---------------------------------------------------------------- drawing

// intensity -> grey; a table for int16 images (looked up per pixel), a function otherwise
function windowLut() {
  const [lo, hi] = S.window;
  const scale = 255 / Math.max(hi - lo, 1e-6);
  const grey = (v) => Math.max(0, Math.min(255, (v - lo) * scale)) | 0;
  if (!(S.vol.data instanceof Int16Array)) return grey;
  const key = `${lo},${hi}`;
  if (S.lutKey !== key) {
    S.lut = new Uint8Array(65536);
    for (let v = -32768; v < 32768; v++) S.lut[v + 32768] = grey(v);
    S.lutKey = key;
  }
  return S.lut;
}

function render(name) {
  const vol = S.vol;
  const canvas = $(name);
  const ctx = canvas.getContext("2d");
  const dpr = window.devicePixelRatio || 1;
  const W = Math.round(canvas.clientWidth * dpr), H = Math.round(canvas.clientHeight * dpr);
  if (canvas.width !== W || canvas.height !== H) { canvas.width = W; canvas.height = H; }
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, W, H);
  if (!vol) return;
  const ax = viewAxes(name), st = strides(vol.shape);
  const nx = vol.shape[ax.x], ny = vol.shape[ax.y];
  const offX = new Int32Array(nx), offY = new Int32Array(ny);
  for (let p = 0; p < nx; p++) offX[p] = flipIndex(ax.x, p) * st[ax.x];
  for (let q = 0; q < ny; q++) offY[q] = flipIndex(ax.y, q) * st[ax.y];
  const base = S.cursor[ax.s] * st[ax.s];
  const img = new ImageData(nx, ny);
  const px = img.data, data = vol.data, mask = S.mask, lut = windowLut();
  const table = typeof lut !== "function", offset = table ? 32768 : 0;
  const a = S.opacity, r = 255 * a, g = 60 * a, b = 60 * a, keep = 1 - a;
  let o = 0;
  for (let q = 0; q < ny; q++) {
    const row = base + offY[q];
    for (let p = 0; p < nx; p++, o += 4) {
      const lin = row + offX[p];
      const v = table ? lut[data[lin] + offset] : lut(data[lin]);
      if (mask[lin]) {
        px[o] = v * keep + r; px[o + 1] = v * keep + g; px[o + 2] = v * keep + b;
      } else {
        px[o] = px[o + 1] = px[o + 2] = v;
      }
      px[o + 3] = 255;
    }
  }
  // physical aspect: a voxel is spacing[x] by spacing[y] millimetres
  const sx = vol.spacing[ax.x], sy = vol.spacing[ax.y];
  const scale = Math.min(W / (nx * sx), H / (ny * sy));
  const dw = nx * sx * scale, dh = ny * sy * scale, ox = (W - dw) / 2, oy = (H - dh) / 2;
  const off = new OffscreenCanvas(nx, ny);
  off.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, ox, oy, dw, dh);
  canvas._map = { ax, ox, oy, ux: sx * scale, uy: sy * scale, nx, ny, dpr };
  // crosshair through the cursor
  const cx = ox + (flipIndex(ax.x, S.cursor[ax.x]) + 0.5) * sx * scale;
  const cy = oy + (flipIndex(ax.y, S.cursor[ax.y]) + 0.5) * sy * scale;
  ctx.strokeStyle = "rgba(255, 220, 0, 0.45)";
  ctx.lineWidth = dpr;
  ctx.beginPath();
  ctx.moveTo(cx, oy); ctx.lineTo(cx, oy + dh); ctx.moveTo(ox, cy); ctx.lineTo(ox + dw, cy);
  ctx.stroke();
  // clicks lying in this slice
  S.points.forEach((pt, n) => {
    if (Math.round(pt[ax.s]) !== S.cursor[ax.s]) return;
    const x = ox + (flipIndex(ax.x, Math.round(pt[ax.x])) + 0.5) * sx * scale;
    const y = oy + (flipIndex(ax.y, Math.round(pt[ax.y])) + 0.5) * sy * scale;
    ctx.fillStyle = S.labels[n] ? "#3f3" : "#39f";
    ctx.beginPath(); ctx.arc(x, y, 4 * dpr, 0, 2 * Math.PI); ctx.fill();
  });
}

// ---------------------------------------------------------------- 3D view

// Surface voxels of the mask (a voxel with a 6-neighbour outside it), in world mm.
function maskSurface() {
  const shape = S.vol.shape, st = strides(shape), b = S.box, A = S.vol.affine, m = S.mask;
  const pts = [];
  const on = (i, j, k) => i >= 0 && j >= 0 && k >= 0 && i < shape[0] && j < shape[1] &&
    k < shape[2] && m[i * st[0] + j * st[1] + k];
  for (let i = b[0]; i < b[3]; i++)
    for (let j = b[1]; j < b[4]; j++)
      for (let k = b[2]; k < b[5]; k++) {
        if (!m[i * st[0] + j * st[1] + k]) continue;
        if (on(i - 1, j, k) && on(i + 1, j, k) && on(i, j - 1, k) && on(i, j + 1, k) &&
            on(i, j, k - 1) && on(i, j, k + 1)) continue;
        for (let r = 0; r < 3; r++) pts.push(A[r][0] * i + A[r][1] * j + A[r][2] * k + A[r][3]);
      }
  return new Float32Array(pts);
}

// Shaded surface of the mask, turned by S.turn (azimuth about S, elevation).
function render3d() {
  const canvas = $("view3d"), ctx = canvas.getContext("2d");
  const dpr = window.devicePixelRatio || 1;
  const W = Math.round(canvas.clientWidth * dpr), H = Math.round(canvas.clientHeight * dpr);
  if (canvas.width !== W || canvas.height !== H) { canvas.width = W; canvas.height = H; }
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, W, H);
  if (!S.vol) return;
  if (!S.surface) S.surface = maskSurface();
  const p = S.surface, n = p.length / 3;
  if (!n) return;
  let cx = 0, cy = 0, cz = 0;
  for (let t = 0; t < n; t++) { cx += p[3 * t]; cy += p[3 * t + 1]; cz += p[3 * t + 2]; }
  cx /= n; cy /= n; cz /= n;
  const [az, el] = S.turn, ca = Math.cos(az), sa = Math.sin(az), ce = Math.cos(el), se = Math.sin(el);
  const X = new Float32Array(n), Y = new Float32Array(n), Z = new Float32Array(n);
  let rad = 1e-3;
  for (let t = 0; t < n; t++) {
    const r = p[3 * t] - cx, a = p[3 * t + 1] - cy, s = p[3 * t + 2] - cz;
    // from the front: screen x = patient's left, up = superior, depth = anterior (near)
    const x = -(ca * r - sa * a), d = sa * r + ca * a;
    X[t] = x; Y[t] = -(ce * s - se * d); Z[t] = se * s + ce * d;
    rad = Math.max(rad, Math.hypot(x, s, d));
  }
  const scale = 0.45 * Math.min(W, H) / rad;
  // every surface voxel is a small ball: the union of balls has a smooth depth map
  const rb = Math.max(1, 0.8 * Math.max(...S.vol.spacing) * scale), rb2 = rb * rb;
  const zbuf = new Float32Array(W * H).fill(-Infinity);
  for (let t = 0; t < n; t++) {
    const u = W / 2 + X[t] * scale, v = H / 2 + Y[t] * scale, zc = Z[t] * scale;
    for (let y = Math.max(0, Math.floor(v - rb)); y < Math.min(H, Math.ceil(v + rb)); y++)
      for (let x = Math.max(0, Math.floor(u - rb)); x < Math.min(W, Math.ceil(u + rb)); x++) {
        const d2 = (x - u) * (x - u) + (y - v) * (y - v);
        if (d2 >= rb2) continue;
        const z = zc + Math.sqrt(rb2 - d2);
        if (z > zbuf[y * W + x]) zbuf[y * W + x] = z;
      }
  }
  // Lambert shading from the depth map's slope (light from the viewer, up and left)
  const img = ctx.getImageData(0, 0, W, H), px = img.data, zr = rad * scale + rb;
  const L = [-0.4, -0.5, 0.77];
  for (let y = 0; y < H; y++)
    for (let x = 0; x < W; x++) {
      const o = y * W + x, z = zbuf[o];
      if (z === -Infinity) continue;
      const zx = x + 1 < W && zbuf[o + 1] > -Infinity ? zbuf[o + 1] - z : 0;
      const zy = y + 1 < H && zbuf[o + W] > -Infinity ? zbuf[o + W] - z : 0;
      const nx = -zx, ny = -zy, norm = Math.hypot(nx, ny, 1);
      const lam = Math.max(0, (nx * L[0] + ny * L[1] + L[2]) / norm);
      const lit = 0.25 + 0.75 * lam * (0.75 + 0.25 * (z / zr + 1) / 2);
      px[4 * o] = 255 * lit; px[4 * o + 1] = 75 * lit; px[4 * o + 2] = 60 * lit;
    }
  ctx.putImageData(img, 0, 0);
}

function renderAll() { for (const name of Object.keys(VIEWS)) render(name); render3d(); }

// canvas event -> voxel (i, j, k) in the image, or null outside it
function eventVoxel(name, ev) {
  const canvas = $(name), m = canvas._map;
  if (!m) return null;
  const rect = canvas.getBoundingClientRect();
  const x = (ev.clientX - rect.left) * m.dpr, y = (ev.clientY - rect.top) * m.dpr;
  const p = Math.floor((x - m.ox) / m.ux), q = Math.floor((y - m.oy) / m.uy);
  if (p < 0 || q < 0 || p >= m.nx || q >= m.ny) return null;
  const vox = S.cursor.slice();
  vox[m.ax.x] = flipIndex(m.ax.x, p);
  vox[m.ax.y] = flipIndex(m.ax.y, q);
  return vox;
}

// ---------------------------------------------------------------- masks

function applyMask(msg) {
  const h = msg.header, shape = S.vol.shape, st = strides(shape);
  const old = S.box;
  for (let i = old[0]; i < old[3]; i++)
    for (let j = old[1]; j < old[4]; j++)
      S.mask.fill(0, i * st[0] + j * st[1] + old[2], i * st[0] + j * st[1] + old[5]);
  const box = h.box, bits = new Uint8Array(msg.payload);
  let n = 0;
  for (let i = box[0]; i < box[3]; i++)
    for (let j = box[1]; j < box[4]; j++) {
      let lin = i * st[0] + j * st[1] + box[2];
      for (let k = box[2]; k < box[5]; k++, n++, lin++)
        if (bits[n >> 3] & (128 >> (n & 7))) S.mask[lin] = 1;
    }
  S.box = box;
  S.surface = null;
  S.points = h.points;
  S.labels = h.labels;
  const ext = h.extent_mm.map((v) => v.toFixed(1)).join(" x ");
  $("mask-info").textContent = h.voxels
    ? `lesion ${h.volume_ml.toFixed(2)} mL, extent ${ext} mm, ${h.points.length} click(s)`
    : `no mask, ${h.points.length} click(s)`;
}

function maskRequest(kind, path, body) {
  // one request at a time, in order; the server serialises too
  S.queue = S.queue.then(async () => {
    if (!S.sid) return;
    const t0 = performance.now();
    say(kind === "click" ? "segmenting\u2026" : `${kind}\u2026`, "busy");
    try {
      const msg = await binary(`/api/sessions/${S.sid}/${path}`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body || {}),
      });
      applyMask(msg);
      renderAll();
      await nextPaint();
      S.timings.push({
        kind, first: kind === "click" && S.clicks === 0, ms: performance.now() - t0,
        wireBytes: msg.wireBytes, rawBytes: msg.rawBytes, serverMs: msg.header.server_ms,
        voxels: msg.header.voxels,
      });
      if (kind === "click") S.clicks += 1;
      S.updates += 1;
      say("");
    } catch (e) {
      say(e.message, "error");
      S.updates += 1;
    }
  });
  return S.queue;
}

// ---------------------------------------------------------------- sessions

async function openSession(sid) {
  say("loading the image\u2026", "busy");
  const msg = await binary(`/api/sessions/${sid}/volume`);
  const h = msg.header;
  const Typed = h.dtype === "int16" ? Int16Array : Float32Array;
  S.vol = {
    shape: h.shape, spacing: h.spacing_mm, axisWorld: h.axis_world, axisSign: h.axis_sign,
    affine: h.affine,
    data: new Typed(msg.payload), range: h.range, windows: h.windows,
  };
  S.sid = sid; S.name = h.name;
  S.mask = new Uint8Array(h.shape[0] * h.shape[1] * h.shape[2]);
  S.box = [0, 0, 0, 0, 0, 0]; S.points = []; S.labels = []; S.clicks = 0; S.surface = null;
  S.cursor = h.shape.map((n) => Math.floor(n / 2));
  const sel = $("window");
  sel.innerHTML = "";
  const presets = Object.assign({}, h.windows, { "full range": h.range });
  for (const [label, win] of Object.entries(presets)) {
    const o = document.createElement("option");
    o.textContent = `${label} [${win[0]}, ${win[1]}]`;
    o.value = JSON.stringify(win);
    sel.appendChild(o);
  }
  S.window = Object.values(presets)[0];
  const sp = h.spacing_mm.map((v) => v.toFixed(2)).join(" x ");
  $("image-info").textContent = `${h.name}: ${h.shape.join(" x ")} voxels, ${sp} mm`;
  $("mask-info").textContent = "";
  renderAll();
  say("");
  S.updates += 1;
}

async function openServed(name) {
  try {
    const res = await api("/api/open", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ file: name }),
    });
    await openSession((await res.json()).session);
  } catch (e) { say(e.message, "error"); }
}

async function upload(file) {
  if (file.size > S.maxUploadMb * 1024 * 1024) {
    say(`${file.name} is larger than the upload limit of ${S.maxUploadMb} MB`, "error");
    return;
  }
  say(`uploading ${file.name}\u2026`, "busy");
  try {
    const res = await api("/api/upload", {
      method: "POST", headers: { "X-Filename": file.name }, body: file,
    });
    await openSession((await res.json()).session);
  } catch (e) {
    say(e.message, "error");  // the session that was open stays open
  }
}

async function saveMask() {
  if (!S.sid) return;
  try {
    const res = await api(`/api/sessions/${S.sid}/mask`);
    const url = URL.createObjectURL(await res.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = S.name.replace(/\.nii(\.gz)?$/i, "") + "_seg.nii.gz";
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) { say(e.message, "error"); }
}

// ---------------------------------------------------------------- events

function clampCursor() {
  S.cursor = S.cursor.map((c, a) => Math.max(0, Math.min(S.vol.shape[a] - 1, c)));
}

for (const name of Object.keys(VIEWS)) {
  const canvas = $(name);
  canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
  canvas.addEventListener("mousedown", (ev) => {
    const vox = eventVoxel(name, ev);
    if (!vox) return;
    ev.preventDefault();
    S.cursor = vox;
    renderAll();
    if (ev.ctrlKey || ev.altKey || ev.metaKey || ev.button === 1) return;  // navigate only
    const positive = ev.button === 0 && !ev.shiftKey;
    maskRequest("click", "click", { point: vox, positive });
  });
  canvas.addEventListener("wheel", (ev) => {
    if (!S.vol) return;
    ev.preventDefault();
    const a = viewAxes(name).s;
    S.cursor[a] += ev.deltaY > 0 ? 1 : -1;
    clampCursor();
    renderAll();
  }, { passive: false });
}

$("view3d").addEventListener("mousemove", (ev) => {
  if (!ev.buttons) return;
  S.turn = [S.turn[0] + ev.movementX * 0.01, Math.max(-1.5, Math.min(1.5, S.turn[1] + ev.movementY * 0.01))];
  render3d();
});

$("undo").addEventListener("click", () => maskRequest("undo", "undo"));
$("reset").addEventListener("click", () => maskRequest("reset", "reset"));
$("save").addEventListener("click", saveMask);
$("opacity").addEventListener("input", (ev) => { S.opacity = Number(ev.target.value); renderAll(); });
$("window").addEventListener("change", (ev) => { S.window = JSON.parse(ev.target.value); renderAll(); });
$("files").addEventListener("change", (ev) => openServed(ev.target.value));
$("picker").addEventListener("change", (ev) => {
  if (ev.target.files.length) upload(ev.target.files[0]);
  ev.target.value = "";
});
document.addEventListener("keydown", (ev) => {
  if ((ev.ctrlKey || ev.metaKey) && ev.key === "z") { ev.preventDefault(); maskRequest("undo", "undo"); }
});
document.body.addEventListener("dragover", (ev) => { ev.preventDefault(); document.body.classList.add("drag"); });
document.body.addEventListener("dragleave", () => document.body.classList.remove("drag"));
document.body.addEventListener("drop", (ev) => {
  ev.preventDefault();
  document.body.classList.remove("drag");
  if (ev.dataTransfer.files.length) upload(ev.dataTransfer.files[0]);
});
window.addEventListener("resize", renderAll);

(async () => {
  try {
    const info = await (await api("/api/files")).json();
    S.maxUploadMb = info.max_upload_mb;
    const sel = $("files");
    for (const f of info.files) {
      const o = document.createElement("option");
      o.textContent = o.value = f;
      sel.appendChild(o);
    }
    if (info.files.length) await openServed(info.files[0]);
    else say("no image served yet: open a .nii.gz file or drop one here");
  } catch (e) { say(e.message, "error"); }
  renderAll();
})();
