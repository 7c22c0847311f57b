// The embedkit page: gallery, similar images, upload search, duplicate review, map, probe.
// Plain DOM, no framework, no network beyond this server. Every text that comes from the
// store (paths, labels) goes through textContent, never innerHTML.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
// Ids are int64 and JS numbers hold 53 bits: the API sends each id as a string "key" too.
const TILE_W = 170, TILE_H = 190, PAGE = 200, K = 24;
let config = null;

function withToken(url) {
  if (!TOKEN) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

async function api(url, options) {
  const response = await fetch(withToken(url), options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return { body, headers: response.headers };
}

function showError(err) {
  const box = document.getElementById("error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

const thumbUrl = (key) => withToken(`api/images/${key}/thumb`);
const baseName = (path) => path.split(/[\\/]/).pop();

function card(item, extra) {
  const a = el("a", { class: "card", href: `#/similar/${item.key}`, title: item.path,
                      "data-key": item.key });
  a.append(el("img", { src: thumbUrl(item.key), loading: "lazy", alt: baseName(item.path) }));
  if (extra) a.append(extra);
  a.append(el("div", { text: baseName(item.path) }));
  return a;
}

// ---------------------------------------------------------------- gallery (virtualised)
const gallery = { total: 0, pages: new Map(), pending: new Set() };

async function loadGalleryPage(p) {
  if (gallery.pages.has(p) || gallery.pending.has(p)) return;
  gallery.pending.add(p);
  try {
    const { body, headers } = await api(`api/images?offset=${p * PAGE}&limit=${PAGE}`);
    gallery.total = Number(headers.get("X-Total-Count"));
    gallery.pages.set(p, body);
  } finally {
    gallery.pending.delete(p);
  }
  renderGallery();
}

function renderGallery() {
  const scroll = document.getElementById("gallery-scroll");
  const grid = document.getElementById("gallery-grid");
  const cols = Math.max(1, Math.floor(scroll.clientWidth / TILE_W));
  const rows = Math.ceil(gallery.total / cols);
  grid.style.height = `${rows * TILE_H}px`;
  // only the visible rows (plus one screen either side) exist in the DOM: smooth at 100k
  const first = Math.max(0, Math.floor(scroll.scrollTop / TILE_H) - 2);
  const last = Math.min(rows, Math.ceil((scroll.scrollTop + scroll.clientHeight) / TILE_H) + 2);
  const wanted = new Map();
  for (let i = first * cols; i < Math.min(gallery.total, last * cols); i++) {
    const page = gallery.pages.get(Math.floor(i / PAGE));
    if (!page) { loadGalleryPage(Math.floor(i / PAGE)).catch(showError); continue; }
    wanted.set(i, page[i % PAGE]);
  }
  for (const node of Array.from(grid.children)) {
    const i = Number(node.dataset.index);
    if (!wanted.has(i)) node.remove(); else wanted.delete(i);
  }
  for (const [i, item] of wanted) {
    const a = card(item);
    a.className = "tile";
    a.dataset.index = String(i);
    a.style.left = `${(i % cols) * TILE_W}px`;
    a.style.top = `${Math.floor(i / cols) * TILE_H}px`;
    grid.append(a);
  }
}

async function showGallery() {
  if (!gallery.total && !gallery.pages.size) await loadGalleryPage(0);
  renderGallery();
}

// ---------------------------------------------------------------- similar images
function renderHits(hits) {
  const box = document.getElementById("similar-hits");
  box.replaceChildren(...hits.map((h) =>
    card(h, el("div", { class: "score", text: `#${h.rank}  ${h.score.toFixed(4)}` }))));
  if (!hits.length) box.append(el("p", { text: "no results" }));
}

async function showSimilar(key) {
  const query = document.getElementById("similar-query");
  const classes = document.getElementById("similar-classes");
  query.replaceChildren(el("p", { text: "searching…" }));
  classes.replaceChildren();
  const [{ body: meta }, { body: hits }] = await Promise.all([
    api(`api/images/${key}`), api(`api/search?id=${key}&k=${K}`),
  ]);
  const link = el("a", { href: withToken(`api/images/${key}/file`), target: "_blank" },
                  el("img", { src: thumbUrl(key), alt: baseName(meta.path) }));
  const date = meta.mtime_ns ? new Date(meta.mtime_ns / 1e6).toLocaleString() : "";
  query.replaceChildren(link, el("div", {},
    el("h3", { text: "Similar to " + baseName(meta.path) }),
    el("div", { text: meta.path }),
    el("div", { text: `${meta.width}×${meta.height}, ${formatBytes(meta.size)}, ${date}` })));
  renderHits(hits);
  if (config && config.probe) {
    api(`api/probe/predictions?id=${key}`).then(({ body }) => {
      if (!body.length) return;
      const r = body[0];
      const truth = r.label == null ? "" : r.correct ? " (correct)" : ` (labelled ${r.label})`;
      classes.append(el("p", { class: "probe-line",
        text: `Probe: ${r.predicted} ${(100 * r.prob).toFixed(0)}%${truth}` }));
    }).catch(() => {});
  }
  if (config && config.head) {
    api(`api/classify?id=${key}`).then(({ body }) => {
      classes.append(el("p", { text: "ImageNet: " +
        body.top.map((t) => `${t.label} ${(100 * t.prob).toFixed(1)}%`).join(", ") }));
    }).catch(() => {});
  }
}

async function searchUpload(file) {
  showError(null);
  const form = new FormData();
  form.append("file", file);
  form.append("k", String(K));
  location.hash = "#/upload";
  const query = document.getElementById("similar-query");
  query.replaceChildren(el("p", { text: "embedding the photo…" }));
  document.getElementById("similar-classes").replaceChildren();
  document.getElementById("similar-hits").replaceChildren();
  const { body: hits } = await api("api/search", { method: "POST", body: form });
  const img = el("img", { src: URL.createObjectURL(file), alt: file.name });
  query.replaceChildren(img, el("h3", { text: "Similar to the uploaded " + file.name }));
  renderHits(hits);
}

function formatBytes(n) {
  if (n == null) return "?";
  return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MB` : `${(n / 1024).toFixed(0)} KB`;
}

// ---------------------------------------------------------------- duplicate review
const DUP_PAGE = 100;  // groups drawn at a time: a big collection can have thousands
const dups = { groups: [], keep: new Map(), shown: DUP_PAGE };

async function loadDuplicates() {
  const threshold = document.getElementById("dup-threshold").value;
  document.getElementById("dup-summary").textContent = "looking for duplicates…";
  const seq = (dups.seq = (dups.seq || 0) + 1);
  const { body } = await api(`api/duplicates?threshold=${encodeURIComponent(threshold)}`);
  if (seq !== dups.seq) return;  // a later request (another threshold) supersedes this one
  dups.groups = body;
  dups.shown = DUP_PAGE;
  // a choice made earlier for the same group (same members) survives reloads
  const saved = loadChoices();
  dups.keep = new Map(body.map((g, n) => {
    const earlier = saved[groupSignature(g)];
    const keeper = g.find((m) => m.key === earlier) || g.find((m) => m.keep) || g[0];
    return [n, keeper.key];
  }));
  renderDuplicates();
}

const CHOICES = () => `embedkit-duplicates:${config ? config.store : ""}`;
const groupSignature = (g) => g.map((m) => m.key).sort().join(",");

function loadChoices() {
  try { return JSON.parse(localStorage.getItem(CHOICES()) || "{}"); } catch (e) { return {}; }
}

function saveChoice(group, key) {
  const saved = loadChoices();
  saved[groupSignature(group)] = key;
  try { localStorage.setItem(CHOICES(), JSON.stringify(saved)); } catch (e) { /* private mode */ }
}

function renderDuplicates() {
  const box = document.getElementById("dup-groups");
  const images = dups.groups.reduce((s, g) => s + g.length, 0);
  document.getElementById("dup-summary").textContent =
    `${dups.groups.length} groups, ${images} images, ${images - dups.groups.length} to remove`;
  box.replaceChildren(...dups.groups.slice(0, dups.shown).map((g, n) => {
    const row = el("div", { class: "group", "data-group": String(n) });
    for (const m of g) {
      const keep = dups.keep.get(n) === m.key;
      const radio = el("input", { type: "radio", name: `keep-${n}`, value: m.key });
      radio.checked = keep;
      radio.addEventListener("change", () => {
        dups.keep.set(n, m.key);
        saveChoice(g, m.key);
        renderDuplicates();
      });
      const date = m.mtime_ns ? new Date(m.mtime_ns / 1e6).toLocaleDateString() : "?";
      const facts = el("div", {},
        el("label", {}, radio, document.createTextNode(keep ? " keep" : " remove")),
        el("div", { text: `${m.width}×${m.height} · ${formatBytes(m.size)} · ${date}` }),
        el("div", { text: m.exact ? "identical file" : `similarity ${m.score.toFixed(3)}` }),
        el("div", { text: m.path }));
      const c = el("div", { class: "card " + (keep ? "keep" : "remove"), "data-key": m.key },
        el("a", { href: `#/similar/${m.key}` }, el("img", { src: thumbUrl(m.key), alt: "" })),
        facts);
      row.append(c);
    }
    return row;
  }));
  if (dups.groups.length > dups.shown) {
    const more = el("button", { id: "dup-more",
      text: `Show ${Math.min(DUP_PAGE, dups.groups.length - dups.shown)} more groups` });
    more.addEventListener("click", () => { dups.shown += DUP_PAGE; renderDuplicates(); });
    box.append(more);
  }
}

function decisions() {
  return dups.groups.map((g, n) => {
    const keeper = g.find((m) => m.key === dups.keep.get(n));
    return { group: n + 1, keep: keeper,
             remove: g.filter((m) => m !== keeper) };
  });
}

function download(name, type, text) {
  const a = el("a", { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  document.body.append(a);
  a.click();
  a.remove();
}

function exportJson() {
  // ids written as exact integers: JSON.stringify would round them through a JS number
  const out = decisions().map((d) => ({
    group: d.group,
    keep: { id: `@@${d.keep.key}@@`, path: d.keep.path },
    remove: d.remove.map((m) => ({ id: `@@${m.key}@@`, path: m.path })),
  }));
  const text = JSON.stringify(out, null, 2).replace(/"@@(\d+)@@"/g, "$1");
  download("embedkit-duplicates.json", "application/json", text + "\n");
}

function exportCsv() {
  const quote = (s) => `"${String(s).replace(/"/g, '""')}"`;
  const lines = ["group,action,id,path"];
  for (const d of decisions()) {
    lines.push(`${d.group},keep,${d.keep.key},${quote(d.keep.path)}`);
    for (const m of d.remove) lines.push(`${d.group},remove,${m.key},${quote(m.path)}`);
  }
  download("embedkit-duplicates.csv", "text/csv", lines.join("\n") + "\n");
}

// ---------------------------------------------------------------- map
const map = { data: null };

async function showMap() {
  if (!map.data) {
    document.getElementById("map-hint").textContent = "computing the map…";
    map.data = (await api("api/map")).body;
    document.getElementById("map-hint").textContent =
      `${map.data.keys.length} images (${map.data.method.toUpperCase()}). ` +
      "Hover for a thumbnail, click to see similar images.";
  }
  const canvas = document.getElementById("map-canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "rgba(30, 90, 170, 0.6)";
  const { x, y } = map.data;
  // big dots for a few images, fine ones for a crowd (px)
  const size = x.length < 1000 ? 8 : x.length < 20000 ? 4 : 2;
  for (let i = 0; i < x.length; i++) {
    ctx.fillRect(8 + x[i] * (canvas.width - 16) - size / 2, 8 + y[i] * (canvas.height - 16) - size / 2,
                 size, size);
  }
}

function nearestOnMap(event) {
  if (!map.data) return -1;
  const canvas = document.getElementById("map-canvas");
  const r = canvas.getBoundingClientRect();
  const px = (event.clientX - r.left) * (canvas.width / r.width);
  const py = (event.clientY - r.top) * (canvas.height / r.height);
  const { x, y } = map.data;
  let best = -1, bestD = 64;  // within 8 canvas pixels
  for (let i = 0; i < x.length; i++) {
    const dx = 8 + x[i] * (canvas.width - 16) - px, dy = 8 + y[i] * (canvas.height - 16) - py;
    const d = dx * dx + dy * dy;
    if (d < bestD) { bestD = d; best = i; }
  }
  return best;
}

// ---------------------------------------------------------------- probe
async function showProbe() {
  const { body } = await api("api/probe");
  const acc = body.accuracy == null ? "no labelled images" :
    `accuracy ${(100 * body.accuracy).toFixed(1)}% on ${body.labelled} labelled images`;
  document.getElementById("probe-summary").textContent =
    `${body.classes.length} classes, ${body.rows} images, ${acc}`;
  const table = document.getElementById("probe-confusion");
  const head = el("tr", {}, el("th", { text: "true \\ predicted" }));
  for (const c of body.classes) head.append(el("th", { text: c }));
  table.replaceChildren(head);
  body.confusion.forEach((row, i) => {
    const tr = el("tr", {}, el("th", { text: body.classes[i] }));
    row.forEach((count, j) => {
      const b = el("button", { text: String(count) });
      b.addEventListener("click", () => loadPredictions(body.classes[i], body.classes[j]));
      tr.append(el("td", { class: i === j ? "diag" : count ? "off" : "" }, b));
    });
    table.append(tr);
  });
  await loadPredictions(null, null);
}

async function loadPredictions(trueClass, predicted) {
  const q = new URLSearchParams({ limit: "200" });
  if (trueClass != null) q.set("true", trueClass);
  if (predicted != null) q.set("predicted", predicted);
  const { body } = await api(`api/probe/predictions?${q}`);
  document.getElementById("probe-list-title").textContent = trueClass == null
    ? "Predictions, misclassified first"
    : `True ${trueClass}, predicted ${predicted}: ${body.length} images`;
  const box = document.getElementById("probe-list");
  box.replaceChildren(...body.map((r) => {
    const text = `${r.predicted} ${(100 * r.prob).toFixed(0)}%` + (r.label ? ` (true ${r.label})` : "");
    const c = card(r, el("div", { class: "score", text }));
    if (r.correct === false) c.classList.add("wrong");
    return c;
  }));
}

// ---------------------------------------------------------------- routing
async function route() {
  showError(null);
  const parts = (location.hash || "#/gallery").slice(2).split("/");
  let view = parts[0] || "gallery";
  const shown = view === "upload" ? "similar" : view;
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${shown}`;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.view === view);
  }
  try {
    if (view === "gallery") await showGallery();
    else if (view === "similar") await showSimilar(parts[1]);
    else if (view === "duplicates") { if (!dups.groups.length) await loadDuplicates(); }
    else if (view === "map") await showMap();
    else if (view === "probe") await showProbe();
  } catch (err) {
    showError(err);
  }
}

function setup() {
  document.getElementById("gallery-scroll").addEventListener("scroll", renderGallery,
                                                              { passive: true });
  window.addEventListener("resize", () => { if (!document.getElementById("view-gallery").hidden) renderGallery(); });
  window.addEventListener("hashchange", route);
  const upload = document.getElementById("upload");
  upload.addEventListener("change", () => {
    if (upload.files.length) searchUpload(upload.files[0]).catch(showError);
  });
  const drop = document.getElementById("drop");
  for (const target of [drop, document.body]) {
    target.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    target.addEventListener("dragleave", () => drop.classList.remove("over"));
    target.addEventListener("drop", (e) => {
      e.preventDefault();
      e.stopPropagation();
      drop.classList.remove("over");
      if (e.dataTransfer.files.length) searchUpload(e.dataTransfer.files[0]).catch(showError);
    });
  }
  document.getElementById("dup-load").addEventListener("click", () => loadDuplicates().catch(showError));
  document.getElementById("dup-export-json").addEventListener("click", exportJson);
  document.getElementById("dup-export-csv").addEventListener("click", exportCsv);
  const canvas = document.getElementById("map-canvas");
  const tip = document.getElementById("map-tip");
  canvas.addEventListener("mousemove", (e) => {
    const i = nearestOnMap(e);
    if (i < 0) { tip.hidden = true; return; }
    const key = map.data.keys[i];
    if (tip.dataset.key !== key) { tip.src = thumbUrl(key); tip.dataset.key = key; }
    tip.style.left = `${e.clientX + 14}px`;
    tip.style.top = `${e.clientY + 14}px`;
    tip.hidden = false;
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
  canvas.addEventListener("click", (e) => {
    const i = nearestOnMap(e);
    if (i >= 0) location.hash = `#/similar/${map.data.keys[i]}`;
  });
}

async function start() {
  setup();
  try {
    config = (await api("api/config")).body;
    document.getElementById("info").textContent =
      `${config.rows} images · ${config.model} · ${config.store}`;
    document.getElementById("nav-probe").hidden = !config.probe;
  } catch (err) {
    showError(err);
  }
  await route();
}

start();
