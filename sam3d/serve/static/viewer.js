// sam3d serve: three orthogonal views of one volume, clicks and brush strokes sent to the
// server, every segment drawn over every view. Plain JavaScript, no build step.
// Messages from the server are: uint32 header length, JSON header, payload.
"use strict";

const S = {                  // the page's state; window.sam3d for tests and benchmarks
  sid: null, name: null, vol: null,
  mask: null,                // Uint8Array over the volume: the segment id drawn at each voxel
  segments: [], active: 1, seg: {},   // seg[id]: {points, labels, canUndo, canRedo, ...}
  cursor: [0, 0, 0], window: [0, 1], turn: [0.5, 0.35], surface: null, opacity: 0.5,
  points: [], labels: [],    // the active segment's clicks
  view: {},                  // per view: {zoom, panX, panY} (CSS pixels)
  tool: "click", radiusMm: 3, hover: null, focus: "axial",
  maxUploadMb: 512, updates: 0, clicks: 0, timings: [], queue: Promise.resolve(),
  token: document.querySelector('meta[name="sam3d-token"]').content,
  openMs: null,
};
window.sam3d = S;

// Each view: the world axis it slices and the world axes along screen x and y
// (0 R, 1 A, 2 S). Screen coordinates run against world coordinates: patient right
// on the left (radiological), anterior and superior at the top, anterior left in sagittal.
// letters: what lies at the left, right, top and bottom edges.
const VIEWS = {
  axial: { slice: 2, x: 0, y: 1, letters: ["R", "L", "A", "P"] },
  coronal: { slice: 1, x: 0, y: 2, letters: ["R", "L", "S", "I"] },
  sagittal: { slice: 0, x: 1, y: 2, letters: ["A", "P", "S", "I"] },
};
for (const name of Object.keys(VIEWS)) S.view[name] = { zoom: 1, panX: 0, panY: 0 };

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
  options = Object.assign({}, options || {});
  if (options.method && options.method !== "GET")
    options.headers = Object.assign({ "X-Sam3d-Token": S.token }, options.headers || {});
  const res = await fetch(path, options);
  if (!res.ok) {
    let text = `${res.status} ${res.statusText}`;
    try { text = (await res.json()).error || text; } catch (e) { /* not JSON */ }
    throw new Error(text);
  }
  return res;
}

// the body as an ArrayBuffer, reporting progress (fraction) while it arrives
async function readAll(res, progress) {
  const total = Number(res.headers.get("Content-Length") || 0);
  if (!progress || !total || !res.body) return res.arrayBuffer();
  const out = new Uint8Array(total), reader = res.body.getReader();
  let got = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    out.set(value, got);
    got += value.length;
    progress(got / total);
  }
  return out.buffer;
}

async function binary(path, options, progress) {
  const res = await api(path, options);
  const msg = readMessage(await readAll(res, progress));
  msg.wireBytes = Number(res.headers.get("X-Sam3d-Bytes") || 0);
  msg.rawBytes = Number(res.headers.get("X-Sam3d-Raw-Bytes") || 0);
  return msg;
}

const nextPaint = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));

// ---------------------------------------------------------------- volume geometry

function strides(shape) { return [shape[1] * shape[2], shape[2], 1]; }

// strides of the volume's voxels as they arrived (C: k fastest; F, a NIfTI file's: i fastest)
function dataStrides() {
  const n = S.vol.shape;
  return S.vol.order === "F" ? [1, n[0], n[0] * n[1]] : strides(n);
}

function voxelAxis(world) { return S.vol.axisWorld.indexOf(world); }

// screen position p along voxel axis a -> voxel index (and back: the same map)
function flipIndex(a, p) { return S.vol.axisSign[a] > 0 ? S.vol.shape[a] - 1 - p : p; }

function viewAxes(name) {
  const v = VIEWS[name];
  return { s: voxelAxis(v.slice), x: voxelAxis(v.x), y: voxelAxis(v.y) };
}

// the value at voxel v, from the volume or from a slice holding v (null if neither is here)
function voxelValue(v) {
  if (S.vol.data) {
    const st = dataStrides();
    return S.vol.data[v[0] * st[0] + v[1] * st[1] + v[2] * st[2]];
  }
  for (let a = 0; a < 3; a++) {
    const sl = S.vol.slices[`${a}:${v[a]}`];
    if (!sl) continue;
    const st2 = sliceStrides(a);
    return sl[v[0] * st2[0] + v[1] * st2[1] + v[2] * st2[2]];
  }
  return null;
}

// strides of a slice along voxel axis a (the other two axes, C order; a itself: 0)
function sliceStrides(a) {
  const [u, v] = [0, 1, 2].filter((x) => x !== a), st = [0, 0, 0];
  st[u] = S.vol.shape[v]; st[v] = 1;
  return st;
}

// where render() reads the grey values of a view: the volume, or the slice fetched for it
function sliceSource(ax) {
  if (S.vol.data) {
    const st = dataStrides();
    return { data: S.vol.data, base: S.cursor[ax.s] * st[ax.s], st };
  }
  const sl = S.vol.slices[`${ax.s}:${S.cursor[ax.s]}`];
  if (!sl) { ensureSlice(ax.s, S.cursor[ax.s]); return null; }
  return { data: sl, base: 0, st: sliceStrides(ax.s) };
}

// fetch one slice (before the whole volume has arrived), then draw again
function ensureSlice(a, index) {
  const key = `${a}:${index}`, vol = S.vol;
  if (vol.data || vol.slices[key] || vol.pending[key]) return vol.pending[key];
  vol.pending[key] = binary(`/api/sessions/${S.sid}/slice?axis=${a}&index=${index}`).then((msg) => {
    const Typed = vol.dtype === "int16" ? Int16Array : Float32Array;
    vol.slices[key] = new Typed(msg.payload);
    delete vol.pending[key];
    if (S.vol === vol && !vol.data) renderSlices();
  }).catch(() => { delete vol.pending[key]; });
  return vol.pending[key];
}

function segmentColour(id) {
  const seg = S.segments.find((s) => s.id === id);
  const hex = seg ? seg.colour : "#ff3c3c";
  return [1, 3, 5].map((o) => parseInt(hex.slice(o, o + 2), 16));
}

// ---------------------------------------------------------------- drawing

// intensity -> grey; a table for int16 images (looked up per pixel), a function otherwise
function windowLut() {
  const [lo, hi] = S.window;
  const scale = 255 / Math.max(hi - lo, 1e-6);
  const grey = (v) => Math.max(0, Math.min(255, (v - lo) * scale)) | 0;
  if (S.vol.dtype !== "int16") return grey;
  const key = `${lo},${hi}`;
  if (S.lutKey !== key) {
    S.lut = new Uint8Array(65536);
    for (let v = -32768; v < 32768; v++) S.lut[v + 32768] = grey(v);
    S.lutKey = key;
  }
  return S.lut;
}

function niceLength(mm) {  // the largest 1, 2, 5 x 10^n not above mm
  const p = Math.pow(10, Math.floor(Math.log10(mm)));
  return [5, 2, 1].map((f) => f * p).find((v) => v <= mm) || p;
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
  const src = sliceSource(ax) || { data: new Int16Array(1), base: 0, st: [0, 0, 0] };
  // offsets of the grey values (volume or slice) and of the mask (always the volume)
  const offX = new Int32Array(nx), offY = new Int32Array(ny);
  const mX = new Int32Array(nx), mY = new Int32Array(ny);
  for (let p = 0; p < nx; p++) { const i = flipIndex(ax.x, p); offX[p] = i * src.st[ax.x]; mX[p] = i * st[ax.x]; }
  for (let q = 0; q < ny; q++) { const i = flipIndex(ax.y, q); offY[q] = i * src.st[ax.y]; mY[q] = i * st[ax.y]; }
  const base = src.base, mBase = S.cursor[ax.s] * st[ax.s];
  const img = new ImageData(nx, ny);
  const px = img.data, data = src.data, mask = S.mask, lut = windowLut();
  const table = typeof lut !== "function", offset = table ? 32768 : 0;
  const a = S.opacity, keep = 1 - a;
  const tint = [[0, 0, 0]];
  for (let id = 1; id < 256 && id <= S.segments.length + 1; id++)
    tint.push(segmentColour(id).map((c) => c * a));
  let o = 0;
  for (let q = 0; q < ny; q++) {
    const row = base + offY[q], mRow = mBase + mY[q];
    for (let p = 0; p < nx; p++, o += 4) {
      const lin = row + offX[p];
      const v = table ? lut[data[lin] + offset] : lut(data[lin]);
      const m = mask[mRow + mX[p]];
      if (m) {
        const t = tint[m] || tint[1];
        px[o] = v * keep + t[0]; px[o + 1] = v * keep + t[1]; px[o + 2] = v * keep + t[2];
      } else {
        px[o] = px[o + 1] = px[o + 2] = v;
      }
      px[o + 3] = 255;
    }
  }
  // physical aspect (a voxel is spacing[x] by spacing[y] mm), then zoom and pan
  const sx = vol.spacing[ax.x], sy = vol.spacing[ax.y], vw = S.view[name];
  const scale = Math.min(W / (nx * sx), H / (ny * sy)) * vw.zoom;
  const dw = nx * sx * scale, dh = ny * sy * scale;
  const ox = (W - dw) / 2 + vw.panX * dpr, oy = (H - dh) / 2 + vw.panY * dpr;
  const off = new OffscreenCanvas(nx, ny);
  off.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, ox, oy, dw, dh);
  canvas._map = { ax, ox, oy, ux: sx * scale, uy: sy * scale, nx, ny, dpr, mmPerPx: 1 / scale };
  // crosshair through the cursor
  const cx = ox + (flipIndex(ax.x, S.cursor[ax.x]) + 0.5) * sx * scale;
  const cy = oy + (flipIndex(ax.y, S.cursor[ax.y]) + 0.5) * sy * scale;
  ctx.strokeStyle = "rgba(255, 220, 0, 0.45)";
  ctx.lineWidth = dpr;
  ctx.beginPath();
  ctx.moveTo(cx, oy); ctx.lineTo(cx, oy + dh); ctx.moveTo(ox, cy); ctx.lineTo(ox + dw, cy);
  ctx.stroke();
  // the active segment's clicks lying in this slice
  S.points.forEach((pt, n) => {
    if (Math.round(pt[ax.s]) !== S.cursor[ax.s]) return;
    const x = ox + (flipIndex(ax.x, Math.round(pt[ax.x])) + 0.5) * sx * scale;
    const y = oy + (flipIndex(ax.y, Math.round(pt[ax.y])) + 0.5) * sy * scale;
    ctx.fillStyle = S.labels[n] ? "#3f3" : "#39f";
    ctx.beginPath(); ctx.arc(x, y, 4 * dpr, 0, 2 * Math.PI); ctx.fill();
  });
  // a stroke being drawn
  if (S.stroke && S.stroke.view === name) {
    ctx.fillStyle = S.stroke.erase ? "rgba(120, 170, 255, 0.5)" : "rgba(255, 255, 255, 0.4)";
    for (const pt of S.stroke.points) {
      const x = ox + (flipIndex(ax.x, pt[ax.x]) + 0.5) * sx * scale;
      const y = oy + (flipIndex(ax.y, pt[ax.y]) + 0.5) * sy * scale;
      ctx.beginPath(); ctx.ellipse(x, y, S.radiusMm * scale, S.radiusMm * scale, 0, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  drawOverlay(ctx, name, W, H, dpr, scale);
}

// orientation letters, slice number, scale bar, the brush outline
function drawOverlay(ctx, name, W, H, dpr, scale) {
  const v = VIEWS[name], ax = viewAxes(name), pad = 6 * dpr;
  ctx.font = `${13 * dpr}px system-ui, sans-serif`;
  ctx.fillStyle = "#fc6";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left"; ctx.fillText(v.letters[0], pad, H / 2);
  ctx.textAlign = "right"; ctx.fillText(v.letters[1], W - pad, H / 2);
  ctx.textAlign = "center";
  ctx.textBaseline = "top"; ctx.fillText(v.letters[2], W / 2, pad);
  ctx.textBaseline = "bottom"; ctx.fillText(v.letters[3], W / 2, H - pad);
  ctx.fillStyle = "#ccc";
  ctx.textAlign = "left"; ctx.textBaseline = "top";
  const zoom = S.view[name].zoom;
  const z = zoom !== 1 ? `  x${zoom.toFixed(zoom < 2 ? 2 : 1)}` : "";
  ctx.fillText(`${name} ${S.cursor[ax.s] + 1}/${S.vol.shape[ax.s]}${z}`, pad, pad);
  // scale bar: a round number of mm, at most a quarter of the width
  const mm = niceLength((W / 4) / scale), len = mm * scale, y = H - pad - 4 * dpr;
  ctx.strokeStyle = "#ccc"; ctx.lineWidth = 2 * dpr;
  ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(pad + len, y);
  ctx.moveTo(pad, y - 4 * dpr); ctx.lineTo(pad, y + 4 * dpr);
  ctx.moveTo(pad + len, y - 4 * dpr); ctx.lineTo(pad + len, y + 4 * dpr); ctx.stroke();
  ctx.textBaseline = "bottom";
  ctx.fillText(`${mm >= 10 ? mm.toFixed(0) : mm} mm`, pad, y - 5 * dpr);
  if (S.hover && S.hover.view === name) {
    ctx.textAlign = "right";
    ctx.fillText(`${S.hover.text}`, W - pad, H - pad);
    if (S.tool !== "click") {
      ctx.strokeStyle = S.tool === "eraser" ? "#7af" : "#fff"; ctx.lineWidth = dpr;
      ctx.beginPath();
      ctx.arc(S.hover.x * dpr, S.hover.y * dpr, S.radiusMm * scale, 0, 2 * Math.PI);
      ctx.stroke();
    }
  }
}

// ---------------------------------------------------------------- 3D view

// Surface voxels of the masks (a voxel with a 6-neighbour outside its segment), in world mm.
function maskSurface() {
  const shape = S.vol.shape, st = strides(shape), A = S.vol.affine, m = S.mask;
  const b = unionBox(S.segments.map((s) => S.seg[s.id] && S.seg[s.id].box).filter(Boolean));
  const pts = [], ids = [];
  const same = (i, j, k, id) => i >= 0 && j >= 0 && k >= 0 && i < shape[0] && j < shape[1] &&
    k < shape[2] && m[i * st[0] + j * st[1] + k] === id;
  for (let i = b[0]; i < b[3]; i++)
    for (let j = b[1]; j < b[4]; j++)
      for (let k = b[2]; k < b[5]; k++) {
        const id = m[i * st[0] + j * st[1] + k];
        if (!id) continue;
        if (same(i - 1, j, k, id) && same(i + 1, j, k, id) && same(i, j - 1, k, id) &&
            same(i, j + 1, k, id) && same(i, j, k - 1, id) && same(i, j, k + 1, id)) continue;
        for (let r = 0; r < 3; r++) pts.push(A[r][0] * i + A[r][1] * j + A[r][2] * k + A[r][3]);
        ids.push(id);
      }
  return { p: new Float32Array(pts), ids: new Uint8Array(ids) };
}

// Shaded surfaces of the masks, turned by S.turn (azimuth about S, elevation).
function render3d() {
  const canvas = $("view3d"), ctx = canvas.getContext("2d");
  const dpr = window.devicePixelRatio || 1;
  const W = Math.round(canvas.clientWidth * dpr), H = Math.round(canvas.clientHeight * dpr);
  if (canvas.width !== W || canvas.height !== H) { canvas.width = W; canvas.height = H; }
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, W, H);
  if (!S.vol) return;
  if (!S.surface) S.surface = maskSurface();
  const p = S.surface.p, ids = S.surface.ids, n = p.length / 3;
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
  const zbuf = new Float32Array(W * H).fill(-Infinity), owner = new Uint8Array(W * H);
  for (let t = 0; t < n; t++) {
    const u = W / 2 + X[t] * scale, v = H / 2 + Y[t] * scale, zc = Z[t] * scale;
    for (let y = Math.max(0, Math.floor(v - rb)); y < Math.min(H, Math.ceil(v + rb)); y++)
      for (let x = Math.max(0, Math.floor(u - rb)); x < Math.min(W, Math.ceil(u + rb)); x++) {
        const d2 = (x - u) * (x - u) + (y - v) * (y - v);
        if (d2 >= rb2) continue;
        const z = zc + Math.sqrt(rb2 - d2);
        if (z > zbuf[y * W + x]) { zbuf[y * W + x] = z; owner[y * W + x] = ids[t]; }
      }
  }
  // Lambert shading from the depth map's slope (light from the viewer, up and left)
  const img = ctx.getImageData(0, 0, W, H), px = img.data, zr = rad * scale + rb;
  const L = [-0.4, -0.5, 0.77], colours = {};
  for (let y = 0; y < H; y++)
    for (let x = 0; x < W; x++) {
      const o = y * W + x, z = zbuf[o];
      if (z === -Infinity) continue;
      const zx = x + 1 < W && zbuf[o + 1] > -Infinity ? zbuf[o + 1] - z : 0;
      const zy = y + 1 < H && zbuf[o + W] > -Infinity ? zbuf[o + W] - z : 0;
      const nx = -zx, ny = -zy, norm = Math.hypot(nx, ny, 1);
      const lam = Math.max(0, (nx * L[0] + ny * L[1] + L[2]) / norm);
      const lit = 0.25 + 0.75 * lam * (0.75 + 0.25 * (z / zr + 1) / 2);
      const c = colours[owner[o]] || (colours[owner[o]] = segmentColour(owner[o]));
      px[4 * o] = c[0] * lit; px[4 * o + 1] = c[1] * lit; px[4 * o + 2] = c[2] * lit;
    }
  ctx.putImageData(img, 0, 0);
}

function renderAll() { for (const name of Object.keys(VIEWS)) render(name); render3d(); }

function renderSlices() { for (const name of Object.keys(VIEWS)) render(name); }

// canvas event -> voxel (i, j, k) in the image, or null outside it
function eventVoxel(name, ev, clamp) {
  const canvas = $(name), m = canvas._map;
  if (!m) return null;
  const rect = canvas.getBoundingClientRect();
  const x = (ev.clientX - rect.left) * m.dpr, y = (ev.clientY - rect.top) * m.dpr;
  let p = Math.floor((x - m.ox) / m.ux), q = Math.floor((y - m.oy) / m.uy);
  if (clamp) { p = Math.max(0, Math.min(m.nx - 1, p)); q = Math.max(0, Math.min(m.ny - 1, q)); }
  if (p < 0 || q < 0 || p >= m.nx || q >= m.ny) return null;
  const vox = S.cursor.slice();
  vox[m.ax.x] = flipIndex(m.ax.x, p);
  vox[m.ax.y] = flipIndex(m.ax.y, q);
  return vox;
}

// ---------------------------------------------------------------- masks and segments

function unionBox(boxes) {
  const full = boxes.filter((b) => b[3] > b[0]);
  if (!full.length) return [0, 0, 0, 0, 0, 0];
  return [0, 1, 2, 3, 4, 5].map((n) => (n < 3 ? Math.min : Math.max)(...full.map((b) => b[n])));
}

function applyMask(msg) {
  const h = msg.header, shape = S.vol.shape, st = strides(shape), id = h.segment;
  // the segment's voxels inside the box where it changed: off where the bit is 0
  const box = h.box, bits = new Uint8Array(msg.payload), m = S.mask;
  let n = 0;
  for (let i = box[0]; i < box[3]; i++)
    for (let j = box[1]; j < box[4]; j++) {
      let lin = i * st[0] + j * st[1] + box[2];
      for (let k = box[2]; k < box[5]; k++, n++, lin++) {
        if (bits[n >> 3] & (128 >> (n & 7))) m[lin] = id;
        else if (m[lin] === id) m[lin] = 0;
      }
    }
  S.segments = h.segments;
  const old = S.seg[id] || {};
  S.seg[id] = {
    points: h.points, labels: h.labels, canUndo: h.can_undo, canRedo: h.can_redo,
    box: segmentBox(h, old.box),
  };
  S.surface = null;
  if (id === S.active) { S.points = h.points; S.labels = h.labels; }
  showSegments();
}

// the box a segment may occupy after an update (for the 3D surface): grown, never shrunk
function segmentBox(h, old) {
  return unionBox([old || [0, 0, 0, 0, 0, 0], h.box]);
}

function showSegments() {
  const ul = $("segments");
  ul.innerHTML = "";
  for (const s of S.segments) {
    const li = document.createElement("li");
    li.dataset.id = s.id;
    if (s.id === S.active) li.className = "active";
    const sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = s.colour;
    const name = document.createElement("span");
    name.className = "name"; name.textContent = s.name;
    const stats = document.createElement("div");
    stats.className = "stats";
    const ext = s.extent_mm.map((v) => v.toFixed(1)).join(" x ");
    stats.textContent = s.voxels ? `${s.volume_ml.toFixed(2)} mL, ${ext} mm` : "empty";
    li.append(sw, name, stats);
    li.addEventListener("click", () => selectSegment(s.id));
    ul.appendChild(li);
  }
  const a = S.segments.find((s) => s.id === S.active), st = S.seg[S.active] || {};
  const pts = S.points.length, pos = S.labels.filter((v) => v === 1).length;
  let text = "";
  if (a && a.voxels) {
    const ext = a.extent_mm.map((v) => v.toFixed(1)).join(" x ");
    text = `${a.name} ${a.volume_ml.toFixed(2)} mL, extent ${ext} mm, ${pts} click(s)`;
  } else if (pts && !pos) {
    text = `no mask yet: a right click (or shift+click) only says "not tumour" and removes; ` +
      `left-click inside the lesion first (${pts} click(s))`;
  } else if (a) {
    text = `${a.name}: no mask, ${pts} click(s)`;
  }
  $("mask-info").textContent = text;
  $("undo").disabled = !st.canUndo;
  $("redo").disabled = !st.canRedo;
}

function selectSegment(id) {
  S.active = id;
  const st = S.seg[id] || { points: [], labels: [] };
  S.points = st.points; S.labels = st.labels;
  showSegments();
  renderSlices();
}

function maskRequest(kind, path, body) {
  // one request at a time, in order; the server serialises too
  S.queue = S.queue.then(async () => {
    if (!S.sid) return;
    const t0 = performance.now();
    say(kind === "click" && S.clicks === 0 ? "segmenting\u2026 (the first click also prepares the image)"
      : kind === "click" ? "segmenting\u2026" : `${kind}\u2026`, "busy");
    try {
      const msg = await binary(`/api/sessions/${S.sid}/${path}`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(Object.assign({ segment: S.active }, body || {})),
      });
      if (kind === "new segment") S.active = msg.header.segment;
      applyMask(msg);
      if (kind === "new segment") selectSegment(msg.header.segment);
      renderAll();
      await nextPaint();
      S.timings.push({
        kind, first: kind === "click" && S.clicks === 0, ms: performance.now() - t0,
        wireBytes: msg.wireBytes, rawBytes: msg.rawBytes, serverMs: msg.header.server_ms,
        voxels: msg.header.voxels, box: msg.header.box,
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

// Opening: the image's geometry, the three slices through the centre (drawn at once),
// then the whole volume in the background (progress in the info line).
async function openSession(sid, t0) {
  say("reading the image\u2026", "busy");
  const h = await (await api(`/api/sessions/${sid}/info`)).json();
  S.vol = {
    shape: h.shape, spacing: h.spacing_mm, axisWorld: h.axis_world, axisSign: h.axis_sign,
    affine: h.affine, dtype: h.dtype, order: h.order, data: null, slices: {}, pending: {},
    range: h.range, windows: h.windows,
  };
  S.sid = sid; S.name = h.name;
  S.mask = new Uint8Array(h.shape[0] * h.shape[1] * h.shape[2]);
  S.segments = [{ id: 1, name: "lesion 1", colour: "#ff3c3c", voxels: 0, volume_ml: 0, extent_mm: [0, 0, 0] }];
  S.seg = {}; S.active = 1;
  S.points = []; S.labels = []; S.clicks = 0; S.surface = null;
  S.cursor = h.shape.map((n) => Math.floor(n / 2));
  for (const name of Object.keys(VIEWS)) S.view[name] = { zoom: 1, panX: 0, panY: 0 };
  const sel = $("window");
  sel.innerHTML = "";
  const presets = Object.assign({}, h.windows, { "full range": h.range });
  for (const [label, win] of Object.entries(presets)) {
    const o = document.createElement("option");
    o.textContent = `${label} [${win[0]}, ${win[1]}]`;
    o.value = JSON.stringify(win);
    sel.appendChild(o);
  }
  setWindow(Object.values(presets)[0]);
  const sp = h.spacing_mm.map((v) => v.toFixed(2)).join(" x ");
  $("image-info").textContent = `${h.name}: ${h.shape.join(" x ")} voxels, ${sp} mm`;
  showName(h.name);
  showSegments();
  await Promise.all([0, 1, 2].map((a) => ensureSlice(a, S.cursor[a])));
  renderAll();
  await nextPaint();
  if (t0 !== undefined) S.openMs = performance.now() - t0;
  say("");
  S.updates += 1;
  loadVolume(sid, S.vol);
}

async function loadVolume(sid, vol) {
  const info = $("load-info");
  try {
    const msg = await binary(`/api/sessions/${sid}/volume`, {}, (f) => {
      if (S.vol === vol) info.textContent = `receiving the voxels\u2026 ${Math.round(100 * f)}%`;
    });
    if (S.vol !== vol) return;
    vol.data = new (vol.dtype === "int16" ? Int16Array : Float32Array)(msg.payload);
    vol.slices = {};
    info.textContent = "";
    renderSlices();
  } catch (e) {
    if (S.vol === vol) info.textContent = `the voxels did not arrive: ${e.message}`;
  }
}

// the image drop-down shows the open image, an upload included
function showName(name) {
  const sel = $("files");
  let opt = [...sel.options].find((o) => o.value === name);
  if (!opt) {
    opt = document.createElement("option");
    opt.value = name; opt.textContent = `${name} (uploaded)`; opt.dataset.uploaded = "1";
    sel.appendChild(opt);
  }
  sel.value = name;
}

async function openServed(name) {
  const t0 = performance.now();
  say(`reading ${name}\u2026`, "busy");
  try {
    const res = await api("/api/open", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ file: name }),
    });
    await openSession((await res.json()).session, t0);
  } catch (e) { say(e.message, "error"); if (S.name) showName(S.name); }
}

async function upload(file) {
  if (file.size > S.maxUploadMb * 1024 * 1024) {
    say(`${file.name} is larger than the upload limit of ${S.maxUploadMb} MB`, "error");
    return;
  }
  const t0 = performance.now();
  say(`uploading ${file.name}\u2026`, "busy");
  try {
    const res = await api("/api/upload", {
      method: "POST", headers: { "X-Filename": file.name }, body: file,
    });
    await openSession((await res.json()).session, t0);
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

// ---------------------------------------------------------------- window / level

function setWindow(win) {
  S.window = [Number(win[0]), Number(win[1])];
  const w = S.window[1] - S.window[0], l = (S.window[0] + S.window[1]) / 2;
  $("wl").textContent = `W ${w.toFixed(0)} L ${l.toFixed(0)}`;
}

// ---------------------------------------------------------------- events

function clampCursor() {
  S.cursor = S.cursor.map((c, a) => Math.max(0, Math.min(S.vol.shape[a] - 1, c)));
}

function stepSlice(name, delta) {
  if (!S.vol) return;
  const a = viewAxes(name).s;
  S.cursor[a] += delta;
  clampCursor();
  renderSlices();
}

function hoverText(vox) {
  const v = voxelValue(vox);
  const val = v === null ? "" : S.vol.dtype === "int16" ? `${v} HU` : `${v.toFixed(1)}`;
  return `(${vox.join(", ")}) ${val}`;
}

function zoomAt(name, factor, ev) {
  const vw = S.view[name], canvas = $(name), rect = canvas.getBoundingClientRect();
  const z = Math.max(0.5, Math.min(20, vw.zoom * factor)), f = z / vw.zoom;
  // keep the point under the mouse where it is: pan' = (pan - c) * f + c (c from the centre)
  const cx = ev ? ev.clientX - rect.left - rect.width / 2 : 0;
  const cy = ev ? ev.clientY - rect.top - rect.height / 2 : 0;
  vw.panX = (vw.panX - cx) * f + cx; vw.panY = (vw.panY - cy) * f + cy; vw.zoom = z;
  render(name);
}

for (const name of Object.keys(VIEWS)) {
  const canvas = $(name);
  canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
  canvas.addEventListener("mousedown", (ev) => {
    if (!S.vol) return;
    ev.preventDefault();
    S.focus = name;
    const vox = eventVoxel(name, ev);
    S.drag = { name, button: ev.button, x: ev.clientX, y: ev.clientY, moved: false,
      vox, shift: ev.shiftKey, nav: ev.ctrlKey || ev.altKey || ev.metaKey,
      win: S.window.slice(), pan: [S.view[name].panX, S.view[name].panY] };
    if (ev.button === 0 && !S.drag.nav && S.tool !== "click" && vox) {
      S.stroke = { view: name, axis: viewAxes(name).s, erase: S.tool === "eraser", points: [vox] };
      render(name);
    }
  });
  canvas.addEventListener("mousemove", (ev) => {
    if (!S.vol) return;
    const vox = eventVoxel(name, ev);
    const rect = canvas.getBoundingClientRect();
    S.hover = vox ? { view: name, vox, value: voxelValue(vox), text: hoverText(vox),
      x: ev.clientX - rect.left, y: ev.clientY - rect.top } : null;
    $("hover-info").textContent = vox ? hoverText(vox) : "";
    S.focus = name;
    if (!S.drag || S.drag.name !== name) { render(name); return; }
    const d = S.drag, dx = ev.clientX - d.x, dy = ev.clientY - d.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) d.moved = true;
    if (d.button === 2 && d.moved) {  // window / level: right/left width, down/up level
      const span = Math.max(1, (S.vol.range[1] - S.vol.range[0]) / 400);
      const w = Math.max(1, d.win[1] - d.win[0] + dx * span);
      const l = (d.win[0] + d.win[1]) / 2 - dy * span;
      setWindow([l - w / 2, l + w / 2]);
      renderSlices();
    } else if (d.button === 1) {  // pan
      S.view[name].panX = d.pan[0] + dx; S.view[name].panY = d.pan[1] + dy;
      render(name);
    } else if (S.stroke && S.stroke.view === name) {
      const v = eventVoxel(name, ev, true);
      S.stroke.points.push(v);
      render(name);
    } else {
      render(name);
    }
  });
  canvas.addEventListener("mouseleave", () => { S.hover = null; if (S.vol) render(name); });
  canvas.addEventListener("wheel", (ev) => {
    if (!S.vol) return;
    ev.preventDefault();
    if (ev.ctrlKey || ev.metaKey) zoomAt(name, ev.deltaY < 0 ? 1.25 : 0.8, ev);
    else stepSlice(name, ev.deltaY > 0 ? 1 : -1);
  }, { passive: false });
}

window.addEventListener("mouseup", (ev) => {
  const d = S.drag;
  S.drag = null;
  if (!d || !S.vol) return;
  if (S.stroke) {  // brush or eraser: one request for the whole stroke
    const st = S.stroke;
    S.stroke = null;
    const seen = new Set(), pts = [];
    for (const p of st.points) { const k = p.join(","); if (!seen.has(k)) { seen.add(k); pts.push(p); } }
    S.lastStroke = {
      axis: st.axis, points: pts.slice(0, 512), radius_mm: S.radiusMm, erase: st.erase,
    };
    maskRequest(st.erase ? "eraser" : "brush", "brush", S.lastStroke);
    return;
  }
  if (d.moved || !d.vox) return;  // a drag (window/level, pan) is no click
  S.cursor = d.vox;
  renderAll();
  if (d.nav || d.button === 1) return;  // navigate only
  if (S.tool !== "click") return;
  const positive = d.button === 0 && !d.shift;
  maskRequest("click", "click", { point: d.vox, positive });
});

$("view3d").addEventListener("mousemove", (ev) => {
  if (!ev.buttons) return;
  S.turn = [S.turn[0] + ev.movementX * 0.01, Math.max(-1.5, Math.min(1.5, S.turn[1] + ev.movementY * 0.01))];
  render3d();
});

$("undo").addEventListener("click", () => maskRequest("undo", "undo"));
$("redo").addEventListener("click", () => maskRequest("redo", "redo"));
$("reset").addEventListener("click", () => maskRequest("reset", "reset"));
$("new-segment").addEventListener("click", () => maskRequest("new segment", "segments", { segment: undefined }));
$("save").addEventListener("click", saveMask);
$("opacity").addEventListener("input", (ev) => { S.opacity = Number(ev.target.value); renderSlices(); });
$("window").addEventListener("change", (ev) => { setWindow(JSON.parse(ev.target.value)); renderSlices(); });
$("files").addEventListener("change", (ev) => {
  const opt = ev.target.selectedOptions[0];
  if (opt && opt.dataset.uploaded) { say("an upload cannot be reopened from the list; open the file again"); showName(S.name); return; }
  openServed(ev.target.value);
});
$("picker").addEventListener("change", (ev) => {
  if (ev.target.files.length) upload(ev.target.files[0]);
  ev.target.value = "";
});
for (const r of document.querySelectorAll('input[name="tool"]'))
  r.addEventListener("change", (ev) => { S.tool = ev.target.value; });
$("radius").addEventListener("input", (ev) => {
  S.radiusMm = Number(ev.target.value);
  $("radius-mm").textContent = `${S.radiusMm} mm`;
});
document.addEventListener("keydown", (ev) => {
  if (ev.target instanceof HTMLInputElement && ev.target.type !== "radio" && ev.target.type !== "range") return;
  if (ev.target instanceof HTMLSelectElement) return;
  const key = ev.key;
  if ((ev.ctrlKey || ev.metaKey) && (key === "y" || (key.toLowerCase() === "z" && ev.shiftKey))) {
    ev.preventDefault(); maskRequest("redo", "redo"); return;
  }
  if ((ev.ctrlKey || ev.metaKey) && key === "z") { ev.preventDefault(); maskRequest("undo", "undo"); return; }
  const steps = { ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10 };
  if (key in steps) { ev.preventDefault(); stepSlice(S.focus, steps[key]); return; }
  if (key === "r" || key === "R") {
    for (const name of Object.keys(VIEWS)) S.view[name] = { zoom: 1, panX: 0, panY: 0 };
    renderSlices();
  } else if (key === "+" || key === "=") zoomAt(S.focus, 1.25);
  else if (key === "-") zoomAt(S.focus, 0.8);
  else if (key === "n" || key === "N") maskRequest("new segment", "segments", { segment: undefined });
  else if (key === "b") { document.querySelector('input[value="brush"]').click(); }
  else if (key === "e") { document.querySelector('input[value="eraser"]').click(); }
  else if (key === "c") { document.querySelector('input[value="click"]').click(); }
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
    const t0 = performance.now();
    const info = await (await api("/api/files")).json();
    S.maxUploadMb = info.max_upload_mb;
    const sel = $("files");
    for (const f of info.files) {
      const o = document.createElement("option");
      o.textContent = o.value = f;
      sel.appendChild(o);
    }
    if (info.files.length) {
      await openServed(info.files[0]);
      S.openMs = performance.now() - t0;
    } else say("no image served yet: open a .nii.gz file or drop one here");
  } catch (e) { say(e.message, "error"); }
  renderAll();
})();
