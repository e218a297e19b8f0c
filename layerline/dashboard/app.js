// The layerline dashboard: polls /api/cluster once a second and draws the stages as a bar of layer ranges across
// the model, as a table, and as charts of the last minutes (drawn here as SVG). No framework, nothing fetched from
// elsewhere.
"use strict";

const COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4f46e5", "#65a30d"];
const ROW = 46; // px per row of the layer bar

function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

function bytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function num(x, digits = 2) {
  return x === undefined || x === null ? "–" : Number(x).toFixed(digits);
}

function rangeOf(s) {
  return s.end > s.start ? `${s.start}:${s.end}` : "none";
}

function health(s) {
  if (!s.healthy) return ["down", "bad"];
  if (!s.ready) return ["loading", "muted"];
  const seen = s.seen_s_ago !== undefined ? `, seen ${num(s.seen_s_ago, 1)} s ago` : "";
  return [`ready${seen}`, "ok"];
}

function drawLayers(data) {
  const bar = document.getElementById("layers");
  const axis = document.getElementById("axis");
  bar.replaceChildren();
  axis.replaceChildren();
  const L = data.num_layers || Math.max(1, ...data.stages.map((s) => s.end || 0));
  // rows: stages whose ranges overlap go on separate rows (replicas below the chain)
  const rows = [];
  const placed = data.stages
    .filter((s) => s.end > s.start)
    .sort((a, b) => (a.replica === b.replica ? a.start - b.start : a.replica ? 1 : -1));
  for (const s of placed) {
    let r = rows.findIndex((row) => row.every((o) => o.end <= s.start || o.start >= s.end));
    if (r < 0) { rows.push([]); r = rows.length - 1; }
    rows[r].push(s);
    const i = data.stages.indexOf(s);
    const seg = el("div", {
      class: "segment" + (s.replica ? " replica" : "") + (s.healthy ? "" : " down"),
      "data-stage-address": s.address,
      "data-range": rangeOf(s),
      title: `${s.address}: layers ${rangeOf(s)}${s.replica ? " (replica)" : ""}`,
    }, `${s.address} · ${rangeOf(s)}${s.replica ? " · replica" : ""}`);
    seg.style.left = `${(100 * s.start) / L}%`;
    seg.style.width = `calc(${(100 * (s.end - s.start)) / L}% - 2px)`;
    seg.style.top = `${4 + r * ROW}px`;
    seg.style.background = COLORS[i % COLORS.length];
    bar.appendChild(seg);
  }
  bar.style.height = `${Math.max(1, rows.length) * ROW + 4}px`;
  const step = L <= 16 ? 1 : L <= 40 ? 5 : 10;
  for (let l = 0; l <= L; l += step) {
    const t = el("span", {}, String(l));
    t.style.left = `${(100 * l) / L}%`;
    axis.appendChild(t);
  }
}

function drawTable(data) {
  const body = document.querySelector("#stages tbody");
  body.replaceChildren();
  data.stages.forEach((s, i) => {
    const [h, cls] = health(s);
    const tr = el("tr", { "data-stage-address": s.address });
    const name = el("td");
    const sw = el("span", { class: "swatch" });
    sw.style.background = COLORS[i % COLORS.length];
    name.append(sw, document.createTextNode((s.id || String(i + 1)).slice(0, 8)));
    const layers = rangeOf(s) + (s.replica ? " (replica)" : "");
    let kv = s.kv_bytes_total ? `${bytes(s.kv_bytes_used)} / ${bytes(s.kv_bytes_total)}` : bytes(s.kv_bytes_used);
    if (s.kv_blocks_total) kv += ` (${s.kv_blocks_used}/${s.kv_blocks_total} blocks, ${s.kv_blocks_cached} cached)`;
    tr.append(
      name,
      el("td", {}, s.address),
      el("td", { title: s.device_name || "" }, `${s.device || "?"} / ${s.dtype || "?"}`),
      el("td", { class: "range" }, layers),
      el("td", {}, num(s.ms_per_layer_decode) + (s.load_factor && Math.abs(s.load_factor - 1) > 0.05
        ? ` (×${num(s.load_factor)} under load)` : "")),
      el("td", { title: s.weights || "" }, s.weight_bytes ? bytes(s.weight_bytes) : "–"),
      el("td", { title: s.device_name ? `on ${s.device_name}` : "" }, s.device_memory_total
        ? `${bytes(s.device_memory_used)} / ${bytes(s.device_memory_total)}`
        : (s.resident_bytes ? bytes(s.resident_bytes) : "–") + (s.memory_bytes ? ` / ${bytes(s.memory_bytes)}` : "")),
      el("td", {}, kv),
      el("td", {}, s.open_sessions === undefined ? "–" : String(s.open_sessions)),
      el("td", {}, num(s.tokens_per_s, 1)),
      el("td", { class: cls }, h),
    );
    body.appendChild(tr);
  });
}

const SVG = "http://www.w3.org/2000/svg";
const W = 600, H = 180, PAD_TOP = 14, PAD_BOTTOM = 16; // the charts' viewBox

function svgEl(tag, attrs = {}, text = "") {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

function axisLabel(metric, v) {
  if (metric === "kv_bytes_used") return bytes(v);
  if (metric === "open_sessions") return String(Math.round(v));
  return num(v, v >= 100 ? 0 : 1);
}

// One chart: a path per series (the cluster's, where it has one, and each stage's), over the history's span up to
// now; a gap where a series had no value (a stage down, no step computed in that second).
function drawChart(svg, data, series) {
  const metric = svg.dataset.metric;
  // the span shown: the history's (five minutes), or since the first point while there is less, at least a minute
  const since = data.history.length ? data.now - data.history[0].t : 0;
  const span = Math.min(data.history_s || 300, Math.max(60, since));
  const x = (t) => (W * (t - (data.now - span))) / span;
  let top = 0;
  for (const s of series) for (const p of data.history) {
    const v = s.value(p);
    if (v !== null && v !== undefined) top = Math.max(top, v);
  }
  top = top > 0 ? top * 1.1 : 1;
  const y = (v) => PAD_TOP + (H - PAD_TOP - PAD_BOTTOM) * (1 - v / top);
  svg.replaceChildren(
    svgEl("line", { class: "grid", x1: 0, x2: W, y1: y(0), y2: y(0) }),
    svgEl("line", { class: "grid", x1: 0, x2: W, y1: y(top / 1.1), y2: y(top / 1.1) }),
    svgEl("text", { x: 4, y: y(top / 1.1) - 3, class: "ymax" }, axisLabel(metric, top / 1.1)),
    svgEl("text", { x: 4, y: H - 3 }, span >= 120 ? `−${Math.round(span / 60)} min` : `−${Math.round(span)} s`),
    svgEl("text", { x: W - 4, y: H - 3, "text-anchor": "end" }, "now"),
  );
  for (const s of series) {
    let d = "", pen = "M", last = null;
    for (const p of data.history) {
      const v = s.value(p);
      if (v === null || v === undefined) { pen = "M"; continue; }
      d += `${pen}${x(p.t).toFixed(1)},${y(v).toFixed(1)} `;
      pen = "L";
      last = v;
    }
    const path = svgEl("path", { d: d.trim(), "data-series": s.name, "data-last": last === null ? "" : String(last) });
    if (s.name === "cluster") path.setAttribute("class", "cluster");
    else path.setAttribute("stroke", s.color);
    path.appendChild(svgEl("title", {}, s.name));
    svg.appendChild(path);
  }
}

function drawCharts(data) {
  if (!data.history) return;
  const stageSeries = (metric) => data.stages.map((s, i) => ({
    name: s.address,
    color: COLORS[i % COLORS.length],
    value: (p) => (p.stages[s.address] || {})[metric],
  }));
  for (const svg of document.querySelectorAll("svg.chart")) {
    const metric = svg.dataset.metric;
    const series = stageSeries(metric);
    if (metric === "tokens_per_s") series.unshift({ name: "cluster", value: (p) => p.tokens_per_s });
    drawChart(svg, data, series);
  }
}

function drawSummary(data) {
  document.getElementById("model").textContent = data.model || "";
  const parts = [`${data.stages.length} stage(s)`, `${data.num_layers} layers`];
  if (data.coordinator) parts.push(`coordinator ${data.coordinator}`, `plan v${data.plan_version}`);
  if (data.predicted_bottleneck_ms) parts.push(`predicted bottleneck ${num(data.predicted_bottleneck_ms)} ms/token`);
  if (data.tokens_per_s !== undefined) parts.push(`${num(data.tokens_per_s || 0, 1)} tokens/s generated (every client)`);
  if (data.api) parts.push(`API ${num(data.api.tokens_per_s, 1)} tokens/s (${data.api.tokens_generated} generated)`);
  parts.push(data.route.length ? `route ${data.route.join(" → ")}` : "no route");
  document.getElementById("summary").textContent = parts.join(" · ");
  const problem = document.getElementById("problem");
  problem.hidden = !data.problem;
  problem.textContent = data.problem || "";
}

async function refresh() {
  try {
    const response = await fetch("/api/cluster", { cache: "no-store" });
    const data = await response.json();
    drawSummary(data);
    drawLayers(data);
    drawTable(data);
    drawCharts(data);
    document.getElementById("updated").textContent = new Date().toLocaleTimeString();
    document.body.dataset.loaded = "true";
  } catch (e) {
    document.getElementById("summary").textContent = `cannot reach the api server: ${e}`;
  }
}

refresh();
setInterval(refresh, 1000);
