// The console's page: polls the JSON API and redraws. No framework, no build step.
"use strict";

const TOKEN_KEY = "outpost-console-token";
const $ = (id) => document.getElementById(id);

// The token comes once in the address (#token=...), then lives in this tab's session storage.
(function takeToken() {
  const p = new URLSearchParams(location.hash.slice(1));
  const token = p.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    p.delete("token");
    const rest = p.toString();
    history.replaceState(null, "", location.pathname + (rest ? "#" + rest : ""));
  }
})();

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function ago(now, t) {
  if (!t) return "-";
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 120) return s + " s ago";
  if (s < 7200) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

const num = (v, digits) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));
const short = (id) => (typeof id === "string" ? id.slice(0, 12) : "-");
const list = (v) => (Array.isArray(v) ? v : []);
const modelText = (models) => list(models).map((m) => m.name + ":" + list(m.versions).join("/")).join(", ") || "-";

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw { login: true };
  const r = await fetch("/api" + path, { headers: { Authorization: "Bearer " + token } });
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw { login: true };
  }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function deviceLink(id) {
  return el("a", { href: "#device=" + encodeURIComponent(id) }, id);
}

function renderSummary(o) {
  const s = o.summary;
  const live = o.rollouts.filter((r) => r.state === "running").length;
  $("summary").replaceChildren(
    el("span", {}, el("b", {}, s.online), " of ", el("b", {}, s.devices), " devices online"),
    el("span", {}, el("b", {}, o.releases.length), " releases"),
    el("span", {}, el("b", {}, live), " rollouts running"),
    el("span", {}, el("b", {}, s.chunks_served), " chunks served"),
  );
}

function waveRow(w) {
  const c = w.counts || {};
  const ok = c.succeeded || 0, bad = (c.failed || 0) + (c.timed_out || 0), busy = inFlight(c);
  const size = Math.max(w.size, ok + bad + busy, 1);
  const pct = (n) => (100 * n) / size + "%";
  return el("div", { class: "wave", "data-wave": w.wave },
    el("div", {}, "Wave " + w.wave + " ", el("span", { class: "muted" }, "(" + w.spec + ")")),
    el("div", { class: "bar", title: ok + " succeeded, " + bad + " failed, " + busy + " in flight of " + w.size },
      el("div", { class: "ok", style: "width:" + pct(ok) }),
      el("div", { class: "bad", style: "width:" + pct(bad) }),
      el("div", { class: "busy", style: "width:" + pct(busy) })),
    el("div", { class: "muted" }, ok + " / " + w.size + " succeeded" + (bad ? ", " + bad + " failed" : "") + (busy ? ", " + busy + " in flight" : "") +
      (c.shadowing ? " (" + c.shadowing + " shadowing)" : "")));
}

// Offered and not answered yet: a gated rollout's devices also while they shadow and promote.
const inFlight = (c) => (c.offered || 0) + (c.shadowing || 0) + (c.promoting || 0);

// A rollout's shadow gate, in words.
const gateText = (g) => (g ? ", gate: " + (100 * g.agreement).toFixed(1) + "% agreement over " + g.rows + " rows" : "");

// A rollout's soak gate (bounds after activation), in words.
function soakText(s) {
  if (!s) return "";
  const bounds = [];
  if (s.drift_max !== null) bounds.push("drift ≤ " + s.drift_max);
  if (s.escalation_rise !== null) bounds.push("escalation +" + (100 * s.escalation_rise).toFixed(1) + " points");
  if (s.p99_ratio !== null) bounds.push("p99 ≤ " + s.p99_ratio + "×");
  return ", soak: " + bounds.join(", ") + (s.rollback ? ", rollback" : "");
}

// The candidate a device stages, with its comparison so far (summed over its models).
function candidateText(d) {
  if (d.candidate === null || d.candidate === undefined) return "-";
  let rows = 0, agreed = 0;
  for (const m of list(d.models)) {
    if (m.shadow && m.shadow.rows) {
      rows += m.shadow.rows;
      agreed += (m.shadow.agreement || 0) * m.shadow.rows;
    }
  }
  return String(d.candidate) + (rows ? " · " + ((100 * agreed) / rows).toFixed(1) + "% of " + rows : "");
}

// The largest drift score of the device's last windows, marked past its threshold.
function driftCell(d) {
  let worst = null, threshold = null, where = "";
  for (const m of list(d.models)) {
    for (const v of list(m.drift)) {
      for (const [signal, psi] of Object.entries(v.psi || {})) {
        if (worst === null || psi > worst) [worst, threshold, where] = [psi, v.threshold, m.name + ":" + v.version + " " + signal];
      }
    }
  }
  if (worst === null) return "-";
  return el("span", { class: worst > threshold ? "badge failed" : "", title: "largest PSI of the last window: " + where }, worst.toFixed(2));
}

function renderRollouts(o) {
  if (!o.rollouts.length) {
    $("rollouts").replaceChildren(el("p", { class: "muted" }, "No rollouts yet: outpostctl rollout start"));
    return;
  }
  $("rollouts").replaceChildren(...o.rollouts.map((r) => {
    const c = r.counts || {};
    return el("div", { class: "rollout", id: "rollout-" + r.id, "data-state": r.state },
      el("div", { class: "head" },
        el("h3", {}, "Rollout " + r.id + ": release " + r.number),
        el("span", { class: "badge " + r.state }, r.state),
        el("span", { class: "muted" }, r.fleet + "/" + r.group + ", " + r.devices + " devices, waves " + r.wave_spec.join(" → ") +
          ", errors ≤ " + r.errors + (r.rate_per_min ? ", " + r.rate_per_min + "/min" : "") + gateText(r.shadow_gate) + soakText(r.soak_gate)),
        r.reason ? el("span", {}, r.reason) : null),
      r.waves.map(waveRow),
      el("div", { class: "muted" }, (c.succeeded || 0) + " succeeded, " + ((c.failed || 0) + (c.timed_out || 0)) + " failed, " +
        (c.degraded || c.rolled_back ? (c.degraded || 0) + " degraded, " + (c.rolled_back || 0) + " rolled back, " : "") +
        inFlight(c) + " in flight, " + (c.pending || 0) + " waiting"),
      r.failures.length
        ? el("ul", { class: "failures" }, r.failures.slice(0, 20).map((f) =>
            el("li", {}, deviceLink(f.device), " " + f.status.replace("_", " ") + " (attempt " + f.attempt + "): " + (f.reason || ""))))
        : null);
  }));
}

// The fleet table's filters and page; the group tables above it set the filters. They live in
// the address (#release=2&drift=>=1), so a filtered view can be linked to and reloaded.
const PAGE = 50;
const FILTERS = ["release", "state", "drift", "online"];
const view = { release: null, state: null, drift: null, online: null, q: "", offset: 0 };

function readView() {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const k of FILTERS) view[k] = p.get(k);
  view.q = p.get("q") || "";
  view.offset = Math.max(0, Number(p.get("offset")) || 0);
  if (document.activeElement !== $("q")) $("q").value = view.q;
  $("online-filter").value = view.online || "";
}

function fleetQuery() {
  const p = new URLSearchParams();
  for (const k of FILTERS) if (view[k] !== null) p.set(k, view[k]);
  if (view.q) p.set("q", view.q);
  p.set("limit", PAGE);
  p.set("offset", view.offset);
  return "/fleet?" + p;
}

function setView(changes) {
  const next = Object.assign({}, view, changes);
  const p = new URLSearchParams();
  for (const k of FILTERS) if (next[k] !== null) p.set(k, next[k]);
  if (next.q) p.set("q", next.q);
  if (next.offset) p.set("offset", next.offset);
  const hash = "#" + p;
  if (location.hash === hash || (location.hash === "" && hash === "#")) refresh();
  else location.hash = hash;
}

// One grouping: its values with their device counts; a click filters the table on a value.
// `extra`, if given, is one more column: [its title, a cell for a group's value].
function groupTable(title, key, rows, label, extra) {
  return el("table", { class: "groups", "data-group": key },
    el("thead", {}, el("tr", {}, el("th", {}, title), el("th", { class: "num" }, "Devices"), el("th", { class: "num" }, "Online"),
      extra ? el("th", {}, extra[0]) : null)),
    el("tbody", {}, rows.map((g) => {
      const raw = g[key === "drift" ? "band" : key];
      const value = raw === null ? "none" : String(raw);
      return el("tr", { class: view[key] === value ? "selected" : "", "data-value": value },
        el("td", {}, el("button", { class: "link", "data-filter": key, "data-value": value }, label(raw))),
        el("td", { class: "num" }, g.devices),
        el("td", { class: "num" }, g.online),
        extra ? el("td", {}, extra[1](raw)) : null);
    })));
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  e.append(...children);
  return e;
}

// A release's drift over time, from the console's samples: the largest score of its online
// devices (line) and their mean (faint), against the devices' 0.25 alert threshold (dashed).
function driftChart(release, history, now) {
  const points = history.filter((s) => s.release === release).flatMap((s) => s.points).filter((p) => p[2] !== null);
  if (!points.length) return el("span", { class: "muted" }, "no scores yet");
  const W = 180, H = 30, first = Math.min(...points.map((p) => p[0]));
  const span = Math.max(now - first, 60000);
  const top = Math.max(0.5, ...points.map((p) => p[2]));
  const x = (t) => (((t - (now - span)) / span) * W).toFixed(1);
  const y = (v) => (H - 1 - (v / top) * (H - 2)).toFixed(1);
  const line = (i) => points.map((p) => x(p[0]) + "," + y(p[i])).join(" ");
  const last = points[points.length - 1];
  const title = "last " + Math.round(span / 60000) + " min: largest now " + last[2].toFixed(2) + ", mean " +
    last[1].toFixed(2) + "; " + last[3] + " of " + last[4] + " scored devices past 0.25 (largest over the span " + top.toFixed(2) + ")";
  return svg("svg", { class: "drift-chart", "data-release": String(release), width: W, height: H, viewBox: "0 0 " + W + " " + H },
    svg("title", {}, title),
    svg("line", { class: "threshold", x1: 0, x2: W, y1: y(0.25), y2: y(0.25) }),
    svg("polyline", { class: "mean", points: line(1) }),
    svg("polyline", { class: "max", points: line(2) }),
    // The latest sample as a dot: also what shows while there is only one.
    svg("circle", { class: "max", cx: x(last[0]), cy: y(last[2]), r: 2 }));
}

function renderFleet(f) {
  const g = f.groups;
  $("groups").replaceChildren(
    groupTable("Release", "release", g.release, (r) => (r === null ? "none" : "release " + r),
      ["Drift over time", (r) => driftChart(r, list(f.drift_history), f.now)]),
    groupTable("Update state", "state", g.state, (s) => s),
    groupTable("Drift (largest PSI)", "drift", g.drift, (b) => b));
  const active = FILTERS.filter((k) => view[k] !== null).map((k) => k + " " + view[k]);
  if (view.q) active.push("id contains " + view.q);
  const last = Math.min(f.offset + f.devices.length, f.total);
  $("pager-text").textContent = (f.total ? f.offset + 1 + "–" + last : "0") + " of " + f.total + " devices" +
    (active.length ? " (" + active.join(", ") + ")" : "");
  $("pager-text").dataset.total = f.total;
  $("clear").hidden = !active.length;
  $("prev").disabled = f.offset === 0;
  $("next").disabled = last >= f.total;
  $("fleet").tBodies[0].replaceChildren(...f.devices.map((d) =>
    el("tr", { "data-device": d.id },
      el("td", {}, deviceLink(d.id)),
      el("td", {}, d.fleet + "/" + d.group),
      el("td", {}, el("span", { class: "dot" + (d.online ? " on" : "") }), d.online ? "online" : "offline"),
      el("td", {}, d.release === null ? "-" : String(d.release)),
      el("td", { class: "mono" }, modelText(d.models)),
      el("td", {}, d.update_state === "refused" || d.update_state === "failed"
        ? el("span", { class: "badge " + d.update_state, title: d.last_error || "" }, d.update_state)
        : d.update_state || "-"),
      el("td", {}, ago(f.now, d.last_seen)),
      el("td", { class: "num" }, num(d.p50_ms, 3)),
      el("td", { class: "num" }, num(d.p99_ms, 3)),
      el("td", { class: "num" }, d.escalation_rate === null || d.escalation_rate === undefined ? "-" : (100 * d.escalation_rate).toFixed(1) + "%"),
      el("td", { class: "candidate" }, candidateText(d)),
      el("td", { class: "num drift" }, driftCell(d)))));
}

function renderReleases(o) {
  $("releases").tBodies[0].replaceChildren(...o.releases.map((r) =>
    el("tr", {},
      el("td", {}, String(r.number)),
      el("td", {}, r.fleet + "/" + r.group),
      el("td", { class: "mono" }, short(r.id)),
      el("td", { class: "mono" }, list(r.models).map((m) => m.name + ":" + m.version).join(", ")),
      el("td", { class: "num" }, r.bytes.toLocaleString()),
      el("td", { class: "num" }, r.devices),
      el("td", {}, ago(o.now, r.uploaded)))));
}

async function renderDevice(id) {
  const d = await api("/devices/" + encodeURIComponent(id));
  const now = Date.now();
  const s = d.state || {};
  $("device-page").replaceChildren(
    el("h2", {}, el("a", { href: "#" }, "Fleet"), " / " + d.id),
    el("dl", {},
      el("dt", {}, "Fleet / group"), el("dd", {}, d.fleet + "/" + d.group),
      el("dt", {}, "Online"), el("dd", {}, d.online ? "online" : "offline", " (seen " + ago(now, d.last_seen) + ")"),
      el("dt", {}, "Release"), el("dd", {}, d.release === null ? "-" : d.release + " (" + short(d.release_id) + ")"),
      el("dt", {}, "Models"), el("dd", { class: "mono" }, modelText(d.models)),
      el("dt", {}, "Update"), el("dd", {}, d.update_state || "-"),
      el("dt", {}, "Last error"), el("dd", {}, d.last_error || "-"),
      el("dt", {}, "Runtime"), el("dd", {}, s.runtime || "-"),
      el("dt", {}, "Latency p50 / p99"), el("dd", {}, num(d.p50_ms, 3) + " / " + num(d.p99_ms, 3) + " ms"),
      el("dt", {}, "Candidate"), el("dd", {}, candidateText(d)),
      el("dt", {}, "Drift (last window)"), el("dd", { class: "mono" }, list(d.models).flatMap((m) => list(m.drift).map((v) =>
        m.name + ":" + v.version + " " + Object.entries(v.psi || {}).map(([k, p]) => k + " " + p.toFixed(3)).join(", ") +
        " (threshold " + v.threshold + ", " + v.alerts + " of " + v.windows + " windows past it)")).join("; ") || "-"),
      el("dt", {}, "Labels"), el("dd", { class: "mono" }, JSON.stringify(d.labels))),
    el("h2", { style: "margin-top:14px" }, "Rollouts"),
    d.rollouts.length
      ? el("ul", {}, d.rollouts.map((r) => el("li", {}, "Rollout " + r.rollout + ": " + r.status + " (attempt " + r.attempt + ")" + (r.reason ? ": " + r.reason : ""))))
      : el("p", { class: "muted" }, "none"),
    el("h2", { style: "margin-top:14px" }, "History"),
    el("table", {}, el("tbody", {}, d.history.map((e) =>
      el("tr", {}, el("td", {}, new Date(e.at).toLocaleString()), el("td", {}, e.kind), el("td", {}, e.detail))))));
}

async function refresh() {
  try {
    const m = location.hash.match(/device=([^&]+)/);
    $("device-page").hidden = !m;
    $("home").hidden = !!m;
    if (m) {
      await renderDevice(decodeURIComponent(m[1]));
    } else {
      readView();
      const [o, f] = await Promise.all([api("/overview"), api(fleetQuery())]);
      renderSummary(o);
      renderRollouts(o);
      renderFleet(f);
      renderReleases(o);
    }
    $("login").hidden = true;
    $("error").hidden = true;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "yes";
  } catch (e) {
    if (e && e.login) {
      $("login").hidden = false;
      $("home").hidden = true;
    } else {
      $("error").hidden = false;
      $("error").textContent = "Cannot reach the console: " + (e && e.message ? e.message : e);
    }
  }
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  refresh();
});
$("groups").addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-filter]");
  if (!b) return;
  const k = b.dataset.filter, v = b.dataset.value;
  setView({ [k]: view[k] === v ? null : v, offset: 0 });
});
$("online-filter").addEventListener("change", (ev) => setView({ online: ev.target.value || null, offset: 0 }));
let typing = null;
$("q").addEventListener("input", (ev) => {
  clearTimeout(typing);
  typing = setTimeout(() => setView({ q: ev.target.value.trim(), offset: 0 }), 250);
});
$("prev").addEventListener("click", () => setView({ offset: Math.max(0, view.offset - PAGE) }));
$("next").addEventListener("click", () => setView({ offset: view.offset + PAGE }));
$("clear").addEventListener("click", () => setView({ release: null, state: null, drift: null, online: null, q: "", offset: 0 }));
window.addEventListener("hashchange", refresh);
refresh();
setInterval(refresh, 2000);
