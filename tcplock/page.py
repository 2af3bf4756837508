"""The status page: ``GET /`` on the status port, one self-contained HTML document.

What it owns: the page and the headers it is served with. The rules it keeps: the page is the
same bytes whatever the lock's state and whether a token is set, so it holds no data and
needs no token; everything it shows it fetches itself from ``status`` and ``history``
(relative to where it was loaded), every two seconds, sending the token, if the server asks
for one, as ``Authorization: Bearer`` (asked for once, kept in the tab's ``sessionStorage``).
It loads nothing from anywhere else: its style and script are inline, and its
Content-Security-Policy allows only those two (by hash) and requests to its own origin.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["HTML", "serve"]

_STYLE = """
:root { --ink: #1d2330; --dim: #667085; --line: #d9dee7; --bg: #f5f7fa; --card: #fff;
  --up: #1f8a4c; --down: #c4322b; --wait: #c07a00; --off: #5b6b86; --queue: #d9480f;
  --rate: #1c64b4; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--ink); background: var(--bg); }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .4em 1.2em;
  padding: .7em 1.2em; background: #1d2330; color: #fff; }
header h1 { margin: 0; font-size: 1.25em; }
header .meta { color: #b8c2d6; font-size: .9em; }
header #state { font-weight: 600; padding: .05em .6em; border-radius: 1em; background: var(--off); }
header #state.ok { background: var(--up); }
header #state.bad { background: var(--down); }
header #state.warn { background: var(--wait); }
main { padding: 1em 1.2em; max-width: 1100px; }
.error { background: #fdecea; color: #8a1c17; border: 1px solid #f3b8b3; padding: .5em .8em;
  border-radius: 4px; margin: 0 0 1em; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr));
  gap: .7em; margin-bottom: 1em; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  padding: .5em .8em; }
.card .label { color: var(--dim); font-size: .85em; }
.card .value { font-size: 1.6em; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .sub { color: var(--dim); font-size: .85em; }
h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
table { width: 100%; border-collapse: collapse; background: var(--card);
  border: 1px solid var(--line); font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .35em .7em; border-bottom: 1px solid var(--line); }
th { background: #eef1f6; font-weight: 600; font-size: .9em; }
td.num, th.num { text-align: right; }
td.none { color: var(--dim); font-style: italic; }
.state { display: inline-block; padding: 0 .55em; border-radius: 1em; color: #fff;
  font-size: .9em; background: var(--off); }
.state.up { background: var(--up); }
.state.down { background: var(--down); }
.state.starting, .state.restarting { background: var(--wait); }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: .7em; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  padding: .5em .8em; }
figcaption { font-size: .9em; color: var(--dim); }
figcaption b { color: var(--ink); }
svg { display: block; width: 100%; height: auto; }
svg text { font-size: 10px; fill: var(--dim); }
svg .grid { stroke: var(--line); }
.key { display: inline-block; width: .8em; height: .8em; border-radius: 2px;
  vertical-align: middle; }
.key.queue { background: var(--queue); } .key.off { background: var(--off); }
.key.rate { background: var(--rate); }
form { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  padding: 1em 1.2em; max-width: 30em; }
form h2 { margin-top: 0; }
form input { font: inherit; padding: .3em .5em; width: 100%; margin: .3em 0 .6em; }
form button { font: inherit; padding: .3em 1em; }
footer { color: var(--dim); font-size: .85em; margin-top: 1.5em; }
[hidden] { display: none !important; }
"""

_SCRIPT = r"""
"use strict";
const KEY = "tcplock-status-token";
const EVERY = 2000;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(KEY);
let timer = null;

class Refused extends Error {}

async function get(path) {
  const headers = token ? {Authorization: "Bearer " + token} : {};
  const answer = await fetch(path, {headers: headers, cache: "no-store"});
  if (answer.status === 401) throw new Refused();
  if (!answer.ok) throw new Error(path + " answered HTTP " + answer.status);
  return answer.json();
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(refresh, EVERY);
}

async function refresh() {
  let status, history;
  try {
    [status, history] = await Promise.all([get("status"), get("history")]);
  } catch (e) {
    if (e instanceof Refused) {
      askToken(token ? "That token was refused. Enter the status token again." : "");
      return;
    }
    showError("Cannot reach tcplock: " + e.message + " (trying again)");
    text("state", "no answer");
    $("state").className = "bad";
    schedule();
    return;
  }
  showError("");
  $("login").hidden = true;
  $("view").hidden = false;
  show(status);
  plot(history);
  document.body.dataset.loaded = "yes";
  schedule();
}

function askToken(message) {
  clearTimeout(timer);
  token = null;
  sessionStorage.removeItem(KEY);
  $("view").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("login-error").hidden = !message;
  document.body.dataset.loaded = "token";
  text("state", "token needed");
  $("state").className = "warn";
  $("token").value = "";
  $("token").focus();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function seconds(s) {
  if (s == null) return "\u2013";
  if (s < 10) return s.toFixed(1) + " s";
  if (s < 120) return Math.round(s) + " s";
  if (s < 7200) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  if (s < 172800) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

function bytes(n) {
  if (n == null) return "\u2013";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + units[i];
}

function text(id, value) { $(id).textContent = value; }

function cell(row, value, cls) {
  const td = row.insertCell();
  td.textContent = value;
  if (cls) td.className = cls;
  return td;
}

function fill(id, items, columns, empty) {
  const body = $(id);
  body.replaceChildren();
  if (!items.length) {
    const td = body.insertRow().insertCell();
    td.colSpan = columns;
    td.className = "none";
    td.textContent = empty;
  }
  return body;
}

function show(st) {
  const state = st.draining ? "stopping" : st.listen === null ? "stopped"
    : st.paused ? "paused" : "running";
  text("state", state);
  $("state").className = state === "running" ? "ok" : state === "paused" ? "warn" : "bad";
  text("version", "tcplock " + st.version);
  text("listen", st.listen ? "on " + st.listen : "not listening");
  text("uptime", "up " + seconds(st.uptime_seconds));
  text("queued", st.queued);
  text("oldest", st.queued ? "oldest waits " + seconds(st.oldest_wait_seconds) : "nobody waits");
  const slots = st.backends.reduce((n, b) => n + b.slots, 0);
  const used = st.backends.reduce((n, b) => n + b.active, 0);
  text("in-use", used + " / " + slots);
  text("backends-up", st.backends.filter((b) => b.state === "up").length + " of "
    + st.backends.length + (st.backends.length === 1 ? " backend" : " backends")
    + " taking clients");
  text("served", st.served);
  text("activations", st.activations + " let through");
  text("restarts", st.restarts);
  text("failures", st.restart_failures + " failed, " + st.hook_failures + " hook failures");
  text("refreshed", new Date().toLocaleTimeString());

  const backends = fill("backends", st.backends, 8, "no backend");
  for (const b of st.backends) {
    const row = backends.insertRow();
    cell(row, b.address);
    const badge = document.createElement("span");
    badge.className = "state " + b.state;
    badge.textContent = b.state;
    badge.title = b.cause ? "last change: " + b.cause : "";
    row.insertCell().append(badge);
    cell(row, b.active + " / " + b.slots, "num");
    cell(row, b.activations, "num");
    cell(row, b.restarts + (b.restart_failures ? " (" + b.restart_failures + " failed)" : ""),
      "num");
    cell(row, bytes(b.rss_bytes), "num");
    cell(row, b.pid == null ? "\u2013" : b.pid, "num");
    cell(row, b.last_end || "\u2013");
  }

  const active = fill("active", st.active, 7, "no connection holds a slot");
  for (const c of st.active) {
    const row = active.insertRow();
    cell(row, c.client);
    cell(row, c.backend);
    cell(row, c.end ? c.state + " (" + c.end + ")" : c.state);
    cell(row, seconds(c.queued_seconds), "num");
    cell(row, seconds(c.active_seconds), "num");
    cell(row, bytes(c.bytes_up), "num");
    cell(row, bytes(c.bytes_down), "num");
  }
}

const SVG = "http://www.w3.org/2000/svg";
const W = 480, H = 150, LEFT = 34, RIGHT = 8, TOP = 8, BOTTOM = 20;

function node(parent, name, attrs, content) {
  const el = document.createElementNS(SVG, name);
  for (const k in attrs) el.setAttribute(k, attrs[k]);
  if (content != null) el.textContent = content;
  parent.append(el);
  return el;
}

function roundUp(v) {
  if (v <= 1) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * step) return m * step;
  return 10 * step;
}

// One chart: the series share a y scale from 0; x is the last `span` seconds, now at the right.
function chart(id, ages, series, span) {
  const svg = $(id);
  svg.replaceChildren();
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const top = roundUp(Math.max(0, ...series.flatMap((s) => s.values)));
  const x = (age) => LEFT + (W - LEFT - RIGHT) * (1 - Math.min(age, span) / span);
  const y = (v) => TOP + (H - TOP - BOTTOM) * (1 - v / top);
  for (const f of [0, 0.5, 1]) {
    node(svg, "line", {class: "grid", x1: LEFT, x2: W - RIGHT, y1: y(top * f), y2: y(top * f)});
    node(svg, "text", {x: LEFT - 4, y: y(top * f) + 3, "text-anchor": "end"},
      +(top * f).toFixed(2));
  }
  for (let m = 0; m <= span / 60; m++) {
    const label = m === 0 ? "now" : "\u2212" + m + " min";
    node(svg, "text", {x: x(m * 60), y: H - 5, "text-anchor": m === 0 ? "end" : "middle"}, label);
  }
  for (const s of series) {
    const points = ages.map((a, i) => x(a).toFixed(1) + "," + y(s.values[i]).toFixed(1));
    if (!points.length) continue;
    if (s.area) {
      const base = y(0).toFixed(1);
      node(svg, "polygon", {
        points: x(ages[0]).toFixed(1) + "," + base + " " + points.join(" ") + " "
          + x(ages[ages.length - 1]).toFixed(1) + "," + base,
        fill: s.color, "fill-opacity": 0.18, stroke: "none"});
    }
    node(svg, "polyline", {points: points.join(" "), fill: "none", stroke: s.color,
      "stroke-width": 1.6, "stroke-linejoin": "round"});
  }
  svg.setAttribute("aria-label", series.map((s) => s.name + " up to " + top).join(", "));
}

function plot(h) {
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const span = 300;
  const last = (values) => values.length ? values[values.length - 1] : 0;
  chart("plot-queue", h.age_seconds, [
    {name: "waiting", values: h.queued, color: color("--queue"), area: true},
    {name: "holding a slot", values: h.active, color: color("--off")},
  ], span);
  chart("plot-rate", h.age_seconds, [
    {name: "connections per second", values: h.connections_per_second, color: color("--rate"),
      area: true},
  ], span);
  text("now-queued", last(h.queued));
  text("now-rate", last(h.connections_per_second));
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const given = $("token").value.trim();
  if (!/^[\x21-\x7e]+$/.test(given)) {
    $("login-error").textContent = "A status token is one word of printable ASCII characters.";
    $("login-error").hidden = false;
    $("token").select();
    return;
  }
  token = given;
  sessionStorage.setItem(KEY, token);
  $("login").hidden = true;
  refresh();
});

refresh();
"""

_BODY = """
<header>
  <h1>tcplock</h1><span id="state">&hellip;</span>
  <span class="meta" id="version"></span><span class="meta" id="listen"></span>
  <span class="meta" id="uptime"></span>
  <span class="meta">refreshed <span id="refreshed">never</span></span>
</header>
<main>
  <p class="error" id="error" role="alert" hidden></p>
  <form id="login" hidden>
    <h2>This status port needs its token</h2>
    <label for="token">Status token (the content of --status-token-file)</label>
    <input id="token" type="password" autocomplete="current-password" spellcheck="false">
    <p class="error" id="login-error" role="alert" hidden></p>
    <button type="submit">Show the status</button>
  </form>
  <div id="view" hidden>
    <div class="cards">
      <div class="card"><div class="label">Waiting in the queue</div>
        <div class="value" id="queued"></div><div class="sub" id="oldest"></div></div>
      <div class="card"><div class="label">Slots in use</div>
        <div class="value" id="in-use"></div><div class="sub" id="backends-up"></div></div>
      <div class="card"><div class="label">Served</div>
        <div class="value" id="served"></div><div class="sub" id="activations"></div></div>
      <div class="card"><div class="label">Restarts</div>
        <div class="value" id="restarts"></div><div class="sub" id="failures"></div></div>
    </div>
    <h2>Backends</h2>
    <table>
      <thead><tr><th>Address</th><th>State</th><th class="num">Slots in use</th>
        <th class="num">Activations</th><th class="num">Restarts</th>
        <th class="num">Memory</th><th class="num">PID</th><th>Last end</th></tr></thead>
      <tbody id="backends"></tbody>
    </table>
    <h2>The last five minutes</h2>
    <div class="plots">
      <figure><svg id="plot-queue" role="img"></svg>
        <figcaption><span class="key queue"></span> waiting
          (now <b id="now-queued"></b>) &nbsp;
          <span class="key off"></span> holding a slot</figcaption>
      </figure>
      <figure><svg id="plot-rate" role="img"></svg>
        <figcaption><span class="key rate"></span> connections per
          second (now <b id="now-rate"></b>)</figcaption>
      </figure>
    </div>
    <h2>Connections holding a slot</h2>
    <table>
      <thead><tr><th>Client</th><th>Backend</th><th>State</th><th class="num">Waited</th>
        <th class="num">Active</th><th class="num">Up</th><th class="num">Down</th></tr></thead>
      <tbody id="active"></tbody>
    </table>
    <footer>Refreshed every 2 s from <code>status</code> and <code>history</code>
      (JSON) on this port.</footer>
  </div>
</main>
"""


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


# Its own icon, so that the browser asks the status port for no /favicon.ico.
_ICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E"
    "%3Crect width='16' height='16' rx='3' fill='%231d2330'/%3E"
    "%3Crect x='4' y='7' width='8' height='6' rx='1' fill='%23fff'/%3E"
    "%3Cpath d='M5.5 7V5a2.5 2.5 0 0 1 5 0v2' stroke='%23fff' fill='none' stroke-width='1.5'/%3E"
    "%3C/svg%3E"
)

#: The whole page.
HTML = (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    "<title>tcplock status</title>\n"
    f'<link rel="icon" href="{_ICON}">\n'
    f"<style>{_STYLE}</style>\n</head>\n<body>{_BODY}<script>{_SCRIPT}</script>\n"
    "</body>\n</html>\n"
).encode()

# Nothing runs or loads but the page's own style and script; it talks only to its origin.
_POLICY = (
    f"default-src 'none'; style-src {_hash(_STYLE)}; script-src {_hash(_SCRIPT)}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Content-Length", str(len(HTML))),
    ("Content-Security-Policy", _POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
]


def serve(start_response):
    """Answer ``GET /`` with the page."""
    start_response("200 OK", list(_HEADERS))
    return [HTML]
