// The try-it page of `segq api`: plain browser JavaScript, no build step. It uses only the
// public HTTP API: POST /v1/uploads (then the presigned POST straight to S3), POST /v1/jobs,
// GET /v1/jobs/{id}/events (Server-Sent Events, read with fetch so the API key can travel
// in a header) and GET /v1/jobs/{id}/outputs/{name}.
"use strict";

const $ = (id) => document.getElementById(id);
const FINAL = ["succeeded", "failed", "cancelled"];
const MASK_RGBA = [30, 144, 255, 150];
const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
  [220, 190, 255], [170, 110, 40], [128, 0, 0], [170, 255, 195], [128, 128, 0]];
const WORDS = {
  invalid_image: "This file is not an image segq can read.",
  unsupported_image: "This kind of image is not supported.",
  image_too_large: "The image is too large.",
  image_too_small: "The image is too small to segment.",
  object_not_found: "The uploaded file is not in storage.",
  forbidden_location: "This API key may not use that storage location.",
  unauthorized: "The API needs a key: paste one under \u201cAPI key and links\u201d below.",
  rate_limited: "Too many requests; wait a moment and try again.",
  queue_unavailable: "The job queue cannot be reached right now; try again shortly.",
  storage_unavailable: "Storage cannot be reached right now; try again shortly.",
  prompt_out_of_bounds: "That click is outside the image.",
  invalid_prompt: "Those clicks do not make a valid prompt.",
  timeout: "The job took too long.",
  worker_lost: "The worker running the job was lost.",
  upload_failed: "The upload to storage failed.",
};

const state = { image: null, width: 0, height: 0, points: [], labels: [], box: null,
  masks: [], chosen: 0, seq: 0, drag: null, bitmap: null };

class JobError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

function explain(err) {
  const code = err.code || "error";
  return `${WORDS[code] || "Something went wrong."} (${code}: ${err.message})`;
}

function say(text) { $("status").textContent = text; }
function showError(text) { $("error").textContent = text; }

function headers(extra = {}) {
  const key = $("apikey").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(body ? { "Content-Type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  const json = (response.headers.get("content-type") || "").includes("json") ? await response.json() : null;
  if (!response.ok) {
    const e = (json && json.error) || { code: `http_${response.status}`, message: response.statusText };
    throw new JobError(e.code, e.message);
  }
  return json;
}

// The job's Server-Sent Events until a final state; resolves with that status.
async function follow(jobId, onStatus) {
  const response = await fetch(`/v1/jobs/${jobId}/events`, { headers: headers() });
  if (!response.ok) {
    const e = (await response.json()).error;
    throw new JobError(e.code, e.message);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue; // a keep-alive comment
      const parsed = JSON.parse(data);
      if (event === "error") throw new JobError(parsed.code, parsed.message);
      last = parsed;
      onStatus(parsed);
    }
  }
  if (!last || !FINAL.includes(last.state)) throw new JobError("stream_ended", "the event stream ended early");
  return last;
}

async function run(task, prompt, options) {
  const job = await api("POST", "/v1/jobs", { task, image: state.image, prompt, options });
  const final = await follow(job.job_id, (s) =>
    say(`${task} job ${s.job_id}: ${s.state}${s.stage ? ` (${s.stage})` : ""}`));
  document.body.dataset.lastJob = final.job_id;
  if (final.state === "failed") throw new JobError(final.error.code, final.error.message);
  if (final.state === "cancelled") throw new JobError("cancelled", "the job was cancelled");
  return final;
}

// The browser sends the file straight to S3 with the API's presigned POST policy.
async function upload(file) {
  const form = await api("POST", "/v1/uploads", {
    filename: file.name || "image", content_type: file.type || "application/octet-stream",
  });
  const body = new FormData();
  for (const [name, value] of Object.entries(form.fields)) body.append(name, value);
  body.append("file", file);
  const response = await fetch(form.url, { method: "POST", body });
  if (!response.ok) {
    const text = await response.text();
    const code = (text.match(/<Code>([^<]+)<\/Code>/) || [])[1] || `http_${response.status}`;
    if (code === "EntityTooLarge") {
      throw new JobError("image_too_large", `the file is over ${form.max_bytes} bytes`);
    }
    throw new JobError("upload_failed", code);
  }
  return form.image;
}

// --- drawing -----------------------------------------------------------------------------

// COCO RLE (column-major runs, zeros first) painted into ``image`` in one colour.
function paintRle(image, rle, rgba) {
  const [h, w] = rle.size;
  const d = image.data;
  let pos = 0;
  let on = false;
  for (const n of rle.counts) {
    if (on) {
      for (let p = pos; p < pos + n; p++) {
        const x = (p / h) | 0;
        const o = ((p - x * h) * w + x) * 4;
        d[o] = rgba[0]; d[o + 1] = rgba[1]; d[o + 2] = rgba[2]; d[o + 3] = rgba[3];
      }
    }
    pos += n;
    on = !on;
  }
}

function clearMask() {
  $("mask").getContext("2d").clearRect(0, 0, state.width, state.height);
  $("legend").replaceChildren();
}

function drawMask() {
  const ctx = $("mask").getContext("2d");
  const image = ctx.createImageData(state.width, state.height);
  const chosen = state.masks[state.chosen];
  if (chosen) paintRle(image, chosen.rle, MASK_RGBA);
  ctx.putImageData(image, 0, 0);
  $("mask").dataset.mask = chosen ? String(state.chosen) : "";
}

function drawInk() {
  const ctx = $("ink").getContext("2d");
  ctx.clearRect(0, 0, state.width, state.height);
  const r = Math.max(4, state.width / 150);
  ctx.lineWidth = Math.max(2, state.width / 400);
  state.points.forEach(([x, y], i) => {
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fillStyle = state.labels[i] ? "#2ecc40" : "#ff4136";
    ctx.fill();
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  });
  const box = state.drag && state.drag.box ? state.drag.box : state.box;
  if (box) {
    ctx.strokeStyle = "#ffdc00";
    ctx.strokeRect(box[0], box[1], box[2], box[3]);
  }
}

function showCandidates() {
  const bar = $("candidates");
  bar.replaceChildren();
  const add = (label, index) => {
    const b = document.createElement("button");
    b.textContent = label;
    b.dataset.index = String(index);
    b.setAttribute("aria-pressed", String(index === state.chosen));
    b.onclick = () => { state.chosen = index; showCandidates(); drawMask(); };
    bar.append(b);
  };
  if (!state.masks.length) return;
  add(`Best mask (score ${state.masks[0].score.toFixed(2)})`, 0);
  state.masks.forEach((m, i) => add(`Candidate ${i + 1}: ${m.score.toFixed(2)}`, i));
  bar.querySelectorAll("button")[1].setAttribute("aria-pressed", "false");
}

function showTiming(st) {
  const t = st.timings || {};
  const ms = (s) => `${Math.round((s || 0) * 1000)} ms`;
  const cache = st.result.embedding_cache;
  const encoder = cache === "hit" ? `cached embedding (${ms(t.encode_image)})` : `${ms(t.encode_image)} (new image)`;
  $("timing").textContent = `image encoder: ${encoder} \u00b7 prompt decoder: ${ms(t.decode_prompt)}`;
  $("timing").dataset.cache = cache || "";
}

// --- the prompt ------------------------------------------------------------------------------

function toImage(event) {
  const rect = $("ink").getBoundingClientRect();
  return [
    Math.min(state.width, Math.max(0, (event.clientX - rect.left) * state.width / rect.width)),
    Math.min(state.height, Math.max(0, (event.clientY - rect.top) * state.height / rect.height)),
  ].map((v) => Math.round(v * 10) / 10);
}

function prompt() {
  const p = {};
  if (state.points.length) { p.points = state.points; p.labels = state.labels; }
  if (state.box) p.box = state.box;
  return Object.keys(p).length ? p : null;
}

async function segmentNow() {
  const seq = ++state.seq;
  drawInk();
  showError("");
  try {
    const st = await run("segment", prompt(), { multimask: true, mask_formats: ["rle"] });
    if (seq !== state.seq) return; // a newer click has its own job
    state.masks = st.result.masks;
    state.chosen = 0;
    showCandidates();
    drawMask();
    showTiming(st);
    say(`${st.result.masks.length} masks for ${state.points.length} point(s)${state.box ? " and a box" : ""}`);
  } catch (err) {
    if (seq === state.seq) showError(explain(err));
  }
}

$("ink").addEventListener("pointerdown", (event) => {
  state.drag = { start: toImage(event), shift: event.shiftKey, box: null };
  $("ink").setPointerCapture(event.pointerId);
});

$("ink").addEventListener("pointermove", (event) => {
  if (!state.drag) return;
  const [x0, y0] = state.drag.start;
  const [x1, y1] = toImage(event);
  const rect = $("ink").getBoundingClientRect();
  const far = Math.hypot(x1 - x0, y1 - y0) * rect.width / state.width > 6;
  state.drag.box = far ? [Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0)] : null;
  drawInk();
});

$("ink").addEventListener("pointerup", (event) => {
  if (!state.drag) return;
  const drag = state.drag;
  state.drag = null;
  if (drag.box && drag.box[2] > 0 && drag.box[3] > 0) {
    state.box = drag.box;
  } else {
    state.points.push(drag.start);
    state.labels.push(drag.shift || event.shiftKey ? 0 : 1);
  }
  segmentNow();
});

// --- buttons ----------------------------------------------------------------------------

function reset() {
  state.points = [];
  state.labels = [];
  state.box = null;
  state.masks = [];
  state.seq++;
  showCandidates();
  clearMask();
  drawInk();
  $("timing").textContent = "";
}

$("reset").onclick = reset;

$("file").onchange = async () => {
  const file = $("file").files[0];
  if (!file) return;
  reset();
  showError("");
  $("stage").hidden = true;
  for (const id of ["reset", "cutout", "panoptic"]) $(id).disabled = true;
  let bitmap = null;
  try { bitmap = await createImageBitmap(file); } catch { bitmap = null; }
  try {
    say(`uploading ${file.name} ...`);
    state.image = await upload(file);
    if (!bitmap) {
      // The browser cannot show it: segq says what is wrong with it.
      say("this browser cannot show that file; asking segq ...");
      await run("segment", null, { mask_formats: ["rle"] });
      return;
    }
    state.width = bitmap.width;
    state.height = bitmap.height;
    for (const id of ["photo", "mask", "ink"]) { $(id).width = state.width; $(id).height = state.height; }
    $("photo").getContext("2d").drawImage(bitmap, 0, 0);
    $("stage").hidden = false;
    for (const id of ["reset", "cutout", "panoptic"]) $(id).disabled = false;
    say(`uploaded to ${state.image}: click the object, shift-click background, or drag a box`);
  } catch (err) {
    showError(explain(err));
  }
};

$("cutout").onclick = async () => {
  showError("");
  try {
    const st = await run("cutout", prompt(), {});
    const response = await fetch(`/v1/jobs/${st.job_id}/outputs/cutout.png`, { headers: headers() });
    if (!response.ok) throw new JobError(`http_${response.status}`, "cannot fetch the cutout");
    const link = $("download");
    link.href = URL.createObjectURL(await response.blob());
    link.download = "cutout.png";
    link.click();
    say(`cutout ${st.result.cutout_size ? st.result.cutout_size.join("x") : ""} downloaded (the best mask of this prompt)`);
  } catch (err) {
    showError(explain(err));
  }
};

$("panoptic").onclick = async () => {
  showError("");
  reset();
  try {
    const st = await run("panoptic", null, { mask_formats: ["rle"] });
    const ctx = $("mask").getContext("2d");
    const image = ctx.createImageData(state.width, state.height);
    const legend = $("legend");
    st.result.segments.forEach((seg, i) => {
      const rgb = PALETTE[i % PALETTE.length];
      paintRle(image, seg.rle, [...rgb, 150]);
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${rgb.join(",")})`;
      item.append(swatch, `${seg.label} (${seg.score.toFixed(2)})`);
      legend.append(item);
    });
    ctx.putImageData(image, 0, 0);
    say(`${st.result.segments.length} segments`);
  } catch (err) {
    showError(explain(err));
  }
};

$("apikey").value = localStorage.getItem("segq-api-key") || "";
$("apikey").onchange = () => localStorage.setItem("segq-api-key", $("apikey").value.trim());
