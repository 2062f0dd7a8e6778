// turbofleet's dashboard: one fetch of /admin/fleet every REFRESH_MS, rendered with plain DOM and SVG.
// Every value goes in through textContent (never innerHTML), so nothing a worker reports can inject markup.
"use strict";

const REFRESH_MS = 2000;
const COLORS = ["#3b6fd8", "#e4572e", "#17a398", "#a05cce", "#f2a541", "#6c8a2b", "#d6457a", "#4b8fb8"];
const TOKEN_KEY = "turbofleet.adminToken";

// ---- formatting (the browser test formats the JSON's numbers with the same rules)
const fmt = {
  none: "—",
  int: (v) => (v === null || v === undefined ? fmt.none : String(Math.round(v))),
  rate: (v) => (v === null || v === undefined ? fmt.none : v.toFixed(2)),
  pct: (v) => (v === null || v === undefined ? fmt.none : (v * 100).toFixed(1) + "%"),
  ms: (s) => (s === null || s === undefined ? fmt.none : (s * 1000).toFixed(1) + " ms"),
  age: (s) => (s === null || s === undefined ? fmt.none : s.toFixed(1) + " s ago"),
  dur: (s) => {
    if (s === null || s === undefined) return fmt.none;
    if (s < 120) return Math.round(s) + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  },
};
window.turbofleetFormat = fmt;

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function gpuText(gpu) {
  // the agent's GPU facts: {count, devices: [{index, name, total_mib, free_mib}], total_mib, free_mib}
  if (!gpu || !Object.keys(gpu).length) return fmt.none;
  const devices = Array.isArray(gpu.devices) ? gpu.devices : [];
  const names = [...new Set(devices.map((d) => String(d.name)))];
  const parts = [];
  if (gpu.count !== undefined) parts.push(gpu.count + "×");
  if (names.length) parts.push(names.join(", "));
  if (gpu.total_mib) {
    const used = gpu.total_mib - (gpu.free_mib || 0);
    parts.push((used / 1024).toFixed(0) + "/" + (gpu.total_mib / 1024).toFixed(0) + " GiB");
  }
  return parts.length ? parts.join(" ") : Object.entries(gpu).map(([k, v]) => k + "=" + v).join(", ");
}

// ---- the fleet cards
function renderFleet(doc) {
  const f = doc.fleet;
  const reg = f.registry || {};
  const regText = String(reg.backend) + (reg.reachable ? "" : " UNREACHABLE") +
    (reg.stale_s ? " · " + Number(reg.stale_s).toFixed(1) + " s stale" : "");
  const values = {
    requests_per_s: fmt.rate(f.requests_per_s),
    ttft_p50_s: fmt.ms(f.ttft_p50_s),
    ttft_p99_s: fmt.ms(f.ttft_p99_s),
    error_rate: fmt.pct(f.error_rate),
    hit_rate: fmt.pct(f.hit_rate),
    in_flight: fmt.int(f.in_flight),
    queue_depth: f.queue_depth === null || f.queue_depth === undefined ? fmt.none : fmt.int(f.queue_depth),
    ready: f.ready_workers + " / " + f.workers,
    registry: regText,
  };
  for (const [k, v] of Object.entries(values)) {
    const node = document.querySelector(`[data-fleet="${k}"]`);
    node.textContent = v;
    node.title = v;
  }
  document.querySelector('[data-fleet="registry"]').classList.toggle("bad", !reg.reachable);
  document.getElementById("policy").textContent = doc.policy;
  document.getElementById("uptime").textContent = fmt.dur(doc.uptime_s);
  document.getElementById("window").textContent = "(last " + Math.round(f.window_s) + " s)";
}

// ---- the worker table
const COLUMNS = [
  ["worker", (w) => w.url],
  ["models", (w) => w.models.join(", ")],
  ["state", null],
  ["in_flight", (w) => fmt.int(w.in_flight), "num"],
  ["waiting", (w) => fmt.int(w.waiting), "num"],
  ["kv_usage", (w) => fmt.pct(w.kv_usage), "num"],
  ["hit_rate", (w) => fmt.pct(w.hit_rate), "num"],
  ["ttft_p50_s", (w) => fmt.ms(w.ttft_p50_s), "num"],
  ["ttft_p99_s", (w) => fmt.ms(w.ttft_p99_s), "num"],
  ["requests_per_s", (w) => fmt.rate(w.requests_per_s), "num"],
  ["ejections", (w) => fmt.int(w.ejections), "num"],
  ["gpu", (w) => gpuText(w.gpu)],
  ["heartbeat", (w) => fmt.age(w.heartbeat_age_s)],
];
const LABELS = ["worker", "models", "state", "in flight", "waiting", "KV", "hit rate", "TTFT p50", "TTFT p99",
  "req/s", "ejections", "GPU", "heartbeat"];

function renderWorkers(doc) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  doc.workers.forEach((w) => {
    const tr = el("tr", { "data-worker": w.url });
    tr.classList.toggle("out", w.state !== "ready");
    COLUMNS.forEach(([field, text, cls], i) => {
      const td = el("td", { "data-field": field, "data-label": LABELS[i] });
      if (cls) td.className = cls;
      if (field === "state") {
        const badge = el("span", { class: "state " + w.state }, w.state);
        td.appendChild(badge);
        if (w.reason) td.appendChild(el("span", { class: "why", "data-field": "reason" }, w.reason));
      } else {
        td.textContent = text(w);
      }
      tr.appendChild(td);
    });
    body.appendChild(tr);
  });
  if (!doc.workers.length) {
    const td = el("td", { colspan: String(COLUMNS.length) }, "No workers registered.");
    body.appendChild(el("tr")).appendChild(td);
  }
}

// ---- charts: hand-drawn SVG, one line per worker
const SVGNS = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function drawChart(id, t, series, color, label) {
  const root = document.getElementById(id);
  const W = 320, H = 160, L = 40, R = 6, T = 8, B = 18;
  root.setAttribute("viewBox", `0 0 ${W} ${H}`);
  root.setAttribute("preserveAspectRatio", "none");
  root.replaceChildren();
  let max = 0;
  for (const ys of Object.values(series)) for (const y of ys) if (y !== null && y > max) max = y;
  if (max <= 0) max = 1;
  // the x axis spans the history there is (at least a minute, at most the ring's 15 minutes)
  const span = Math.max(60, t.length ? -t[0] + 5 : 0);
  const x = (ti) => L + (W - L - R) * (1 + ti / span);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  root.appendChild(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  root.appendChild(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  const top = svg("text", { x: 2, y: T + 8 });
  top.textContent = label(max);
  root.appendChild(top);
  const zero = svg("text", { x: 2, y: H - B });
  zero.textContent = label(0);
  root.appendChild(zero);
  const left = svg("text", { x: L, y: H - 4 });
  left.textContent = "−" + fmt.dur(span);
  root.appendChild(left);
  const right = svg("text", { x: W - R - 22, y: H - 4 });
  right.textContent = "now";
  root.appendChild(right);
  for (const [worker, ys] of Object.entries(series)) {
    let d = "", pen = false;
    ys.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const alone = (i === 0 || ys[i - 1] === null) && (i === ys.length - 1 || ys[i + 1] === null);
      if (alone) {  // a point with no neighbour draws no line: mark it
        root.appendChild(svg("circle", { cx: x(t[i]).toFixed(1), cy: y(v).toFixed(1), r: 2, fill: color(worker) }));
      }
      d += (pen ? "L" : "M") + x(t[i]).toFixed(1) + " " + y(v).toFixed(1) + " ";
      pen = true;
    });
    if (d) {
      const p = svg("path", { d, stroke: color(worker), "data-worker": worker });
      p.setAttribute("vector-effect", "non-scaling-stroke");
      root.appendChild(p);
    }
  }
}

function renderCharts(doc) {
  const c = doc.charts;
  const names = Object.keys(c.workers).sort();
  const color = (w) => COLORS[names.indexOf(w) % COLORS.length];
  const pick = (key) => Object.fromEntries(names.map((w) => [w, c.workers[w][key]]));
  drawChart("chart-rps", c.t, pick("requests_per_s"), color, (v) => v.toFixed(1));
  drawChart("chart-ttft", c.t, pick("ttft_p99_s"), color, (v) => (v * 1000).toFixed(0) + "ms");
  drawChart("chart-hit", c.t, pick("hit_rate"), color, (v) => (v * 100).toFixed(0) + "%");
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  for (const w of names) {
    const li = el("li");
    const sw = el("i");
    sw.style.background = color(w);
    li.appendChild(sw);
    li.appendChild(document.createTextNode(w));
    legend.appendChild(li);
  }
}

// ---- routing
function bars(id, counts) {
  const ul = document.getElementById(id);
  ul.replaceChildren();
  const entries = Object.entries(counts).sort((a, b) => b[1] - a[1]);
  const max = entries.length ? entries[0][1] : 1;
  for (const [name, n] of entries) {
    const li = el("li", { "data-reason": name });
    li.appendChild(el("span", { class: "name", title: name }, name));
    const bar = el("span", { class: "bar" });
    bar.style.width = (100 * n / max).toFixed(1) + "%";
    li.appendChild(bar);
    li.appendChild(el("span", { class: "n" }, fmt.int(n)));
    ul.appendChild(li);
  }
  if (!entries.length) ul.appendChild(el("li", { class: "muted" }, "none"));
}

function renderRouting(doc) {
  const r = doc.routing;
  document.getElementById("routing-window").textContent = "(last " + Math.round(r.window_s) + " s)";
  document.getElementById("pinned").textContent = r.pinned_sessions === null ? fmt.none : fmt.int(r.pinned_sessions);
  bars("decisions", r.decisions);
  const failures = {};
  for (const [k, v] of Object.entries(r.retries)) failures["retry: " + k] = v;
  for (const [k, v] of Object.entries(r.ejections)) failures["ejected " + k] = v;
  bars("failures", failures);
}

// ---- the loop
function token() { return window.localStorage.getItem(TOKEN_KEY) || ""; }

async function refresh() {
  const headers = {};
  if (token()) headers.Authorization = "Bearer " + token();
  const errorBox = document.getElementById("error");
  try {
    const resp = await fetch("/admin/fleet", { headers, cache: "no-store" });
    if (resp.status === 401 || resp.status === 403) {
      document.getElementById("auth").hidden = false;
      document.getElementById("auth-error").textContent = token() ? "That token was refused." : "";
      return;
    }
    if (!resp.ok) throw new Error("/admin/fleet answered " + resp.status);
    const doc = await resp.json();
    document.getElementById("auth").hidden = true;
    renderFleet(doc);
    renderWorkers(doc);
    renderCharts(doc);
    renderRouting(doc);
    window.turbofleetFleet = doc; // what the page shows now (the browser test compares against it)
    errorBox.hidden = true;
    const when = new Date(doc.time * 1000);
    document.getElementById("updated").textContent = "updated " + when.toLocaleTimeString();
    document.body.dataset.updated = String(doc.time);
  } catch (e) {
    errorBox.hidden = false;
    errorBox.textContent = "Cannot read the fleet: " + e.message;
  }
}

document.getElementById("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  window.localStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
  refresh();
});

refresh();
setInterval(refresh, REFRESH_MS);
