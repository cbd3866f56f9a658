"""The dashboard's page (engine/cluster/dashboard.py serves it): HTML, CSS and a small script.

No front-end build and no JavaScript library: the page is one HTML document. The server
renders the first view (every process by name with its state, the writer and the VDL),
so the page says what matters before any script runs; the inline script then renders
the same snapshot in full (PG heat grid, quorums, charts as inline SVG, timeline) and
keeps it live from the server-sent events of ``/events``. Fault buttons POST to
``/api/action`` with the cluster's token after a ``confirm()``; they are disabled when
the dashboard is read-only. Element ids and ``data-`` attributes are what the browser
tests (tests/test_dashboard_browser.py) look at: ``#vdl``, ``#node-NAME[data-status]``,
``#write-quorum[data-ok]``, ``#read-quorum[data-ok]``, buttons
``[data-verb][data-target]``.
"""

from __future__ import annotations

import html
import json

NOT_YET = ("Not in aurora-lite yet: regions (step 14), segment repair by replacement on a "
           "spare node (step 12; in-place repair of a wiped node works), serverless capacity "
           "(step 15).")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _script_json(value) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(value).replace("</", "<\\/").replace("<!--", "<\\!--")


def _node_card(n: dict, read_only: bool) -> str:
    dis = " disabled" if read_only else ""
    extra = f" VDL {_e(n['vdl'])}" if n.get("vdl") is not None else ""
    return (f'<div class="node st-{_e(n["status"])}" id="node-{_e(n["name"])}" '
            f'data-status="{_e(n["status"])}" data-role="{_e(n["role"])}">'
            f'<b>{_e(n["name"])}</b> <span class="role">{_e(n["role"])}</span> '
            f'<span class="badge">{_e(n["status"])}</span><span class="sub">{extra}</span>'
            f'<div class="btns"><button data-verb="node-kill" data-target="{_e(n["name"])}"{dis}>kill</button>'
            f'<button data-verb="node-start" data-target="{_e(n["name"])}"{dis}>start</button></div></div>')


def render_az_grid(snap: dict, read_only: bool) -> str:
    """The AZ x node grid as HTML (the script renders the same markup)."""
    dis = " disabled" if read_only else ""
    cols = []
    for az in snap.get("azs", []):
        nodes = [n for n in snap.get("nodes", []) if n["az"] == az]
        cards = "".join(_node_card(n, read_only) for n in nodes)
        cols.append(f'<div class="az"><h3>{_e(az)} '
                    f'<button data-verb="az-down" data-target="{_e(az)}"{dis}>AZ down</button>'
                    f'<button data-verb="az-up" data-target="{_e(az)}"{dis}>AZ up</button></h3>{cards}</div>')
    return "".join(cols)


def render_page(snap: dict, *, token: str, read_only: bool, history: list) -> str:
    """The whole page for the first GET /."""
    wq, rq = snap.get("write_quorum"), snap.get("read_quorum")
    dis = " disabled" if read_only else ""
    return (PAGE
            .replace("@@VOLUME@@", _e(snap.get("volume", "")))
            .replace("@@DATADIR@@", _e(snap.get("data_dir", "")))
            .replace("@@VDL@@", _e(snap.get("vdl", 0)))
            .replace("@@WRITER@@", _e(snap.get("writer", "")))
            .replace("@@EPOCH@@", _e(snap.get("epoch", 0)))
            .replace("@@WQ@@", "true" if wq else "false")
            .replace("@@WQTEXT@@", "met" if wq else "LOST")
            .replace("@@RQ@@", "true" if rq else "false")
            .replace("@@RQTEXT@@", "met" if rq else "LOST")
            .replace("@@AZGRID@@", render_az_grid(snap, read_only))
            .replace("@@DIS@@", dis)
            .replace("@@READONLY_NOTE@@", "read-only: fault buttons are off" if read_only else "")
            .replace("@@NOTYET@@", _e(NOT_YET))
            .replace("@@INITIAL@@", _script_json(snap))
            .replace("@@HISTORY@@", _script_json(history))
            .replace("@@TOKEN@@", _script_json(token))
            .replace("@@RO@@", "true" if read_only else "false"))


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>aurora-lite dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.35 system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:8px 16px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
main{padding:10px 16px;display:grid;grid-template-columns:1fr 1fr;gap:12px}
section{background:#fff;border:1px solid #d8dbe2;border-radius:6px;padding:8px 12px}
section.wide{grid-column:1/3}
h2{font-size:15px;margin:2px 0 8px}
h3{font-size:13px;margin:2px 0 6px}
.stats{display:flex;gap:14px;flex-wrap:wrap}
.stat{min-width:80px}.stat .v{font-size:18px;font-weight:600}.stat .k{color:#667;font-size:12px}
.ok{color:#137333}.bad{color:#c5221f}
.azs{display:grid;grid-template-columns:repeat(3,1fr);gap:8px}
.az{border:1px dashed #b8bcc8;border-radius:6px;padding:6px}
.node{border-radius:5px;padding:4px 6px;margin:4px 0;border:1px solid #ccd}
.node .role{color:#556;font-size:12px}.node .sub{color:#445;font-size:12px;margin-left:6px}
.badge{font-size:11px;padding:1px 6px;border-radius:8px;background:#ddd;margin-left:4px}
.st-up{background:#e6f4ea}.st-up .badge{background:#34a853;color:#fff}
.st-down{background:#fce8e6}.st-down .badge{background:#c5221f;color:#fff}
.st-paused{background:#fef7e0}.st-paused .badge{background:#f9ab00}
.st-partitioned{background:#f3e8fd}.st-partitioned .badge{background:#8430ce;color:#fff}
.st-slowed{background:#fef7e0}.st-slowed .badge{background:#e37400;color:#fff}
.st-starting,.st-stopping{background:#e8f0fe}.st-starting .badge{background:#1a73e8;color:#fff}
button{font-size:11px;margin:1px;padding:1px 6px;cursor:pointer}
button:disabled{cursor:not-allowed;opacity:.45}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #dde;padding:2px 6px;text-align:right}
th{background:#f0f1f4}
.h0{background:#b7e1c1}.h1{background:#d6efc7}.h2{background:#fff2b3}.h3{background:#ffd199}.h4{background:#f6a5a0}.hx{background:#ccc;color:#666}
svg{background:#fbfbfd;border:1px solid #e3e5ea}
#timeline{max-height:300px;overflow:auto;font-size:12px;margin:0;padding-left:0;list-style:none}
#timeline li{border-bottom:1px solid #eee;padding:2px 0}
.kind{display:inline-block;min-width:70px;font-weight:600}
.note{color:#667;font-size:12px}
#msg{font-size:12px;color:#1a73e8;min-height:1em}
</style></head>
<body>
<header><h1>aurora-lite</h1><span>volume <b>@@VOLUME@@</b></span><span class="note" style="color:#aab">@@DATADIR@@</span>
<span id="conn" class="note" style="color:#aab">live: connecting</span><span class="note" style="color:#fbbc04">@@READONLY_NOTE@@</span></header>
<main>
<section class="wide"><div class="stats">
<div class="stat"><div class="v" id="vdl">@@VDL@@</div><div class="k">writer VDL</div></div>
<div class="stat"><div class="v" id="writer">@@WRITER@@</div><div class="k">writer</div></div>
<div class="stat"><div class="v" id="epoch">@@EPOCH@@</div><div class="k">volume epoch</div></div>
<div class="stat"><div class="v" id="commits-s">-</div><div class="k">commits/s</div></div>
<div class="stat"><div class="v" id="p50">-</div><div class="k">commit p50 ms</div></div>
<div class="stat"><div class="v" id="p99">-</div><div class="k">commit p99 ms</div></div>
<div class="stat"><div class="v" id="lal">-</div><div class="k">LAL headroom (LSNs)</div></div>
<div class="stat"><div class="v" id="waiting">-</div><div class="k">commits waiting</div></div>
<div class="stat"><div class="v" id="write-quorum" data-ok="@@WQ@@">@@WQTEXT@@</div><div class="k">write quorum 4/6, every PG</div></div>
<div class="stat"><div class="v" id="read-quorum" data-ok="@@RQ@@">@@RQTEXT@@</div><div class="k">read quorum 3/6, every PG</div></div>
</div><div id="msg"></div></section>
<section class="wide"><h2>AZs and processes</h2><div class="azs" id="azs">@@AZGRID@@</div>
<div style="margin-top:6px">network: <select id="net-target"></select> +<input id="net-ms" type="number" value="20" min="0" max="60000" style="width:70px"> ms
<button id="net-delay" data-verb="net-delay"@@DIS@@>delay</button><button data-verb="net-clear" data-target=""@@DIS@@>clear delays</button>
&nbsp; <button data-verb="failover" data-target=""@@DIS@@>failover (best replica)</button>
<span class="note" id="latency"></span></div></section>
<section><h2>Protection groups: each segment's SCL against PGCL and VDL</h2>
<div id="pgs" class="note">(script renders this)</div>
<div class="note">cell: the segment's SCL; colour: how far it is behind the PGCL (green 0, yellow &lt;1000, red &ge;10000 LSNs, grey: node down). W/R: a write (4/6) or read (3/6) quorum of the PG's segments can be reached now.</div></section>
<section><h2>Timeline</h2><ul id="timeline"></ul></section>
<section><h2>Throughput (commits/s)</h2><svg id="chart-tput" width="520" height="140"></svg></section>
<section><h2>Commit latency (ms, p50 and p99)</h2><svg id="chart-lat" width="520" height="140"></svg></section>
<section class="wide"><h2>Replica lag (ms, worst replica)</h2><div style="display:flex;gap:16px;align-items:flex-start"><svg id="chart-lag" width="520" height="140"></svg>
<div id="replicas"></div></div></section>
<section class="wide note">@@NOTYET@@ Metrics of every process: <code>aurora-lite status --json</code> lists each <code>metrics</code> URL; this page's own is <a href="/metrics">/metrics</a>.</section>
</main>
<script>
"use strict";
const TOKEN = @@TOKEN@@, READ_ONLY = @@RO@@;
let snap = @@INITIAL@@;
let hist = @@HISTORY@@;
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c]));
const $ = id => document.getElementById(id);
const dis = READ_ONLY ? " disabled" : "";
function nodeCard(n) {
  const extra = n.vdl !== null && n.vdl !== undefined ? " VDL " + n.vdl : "";
  const lag = n.lag_ms !== null && n.lag_ms !== undefined ? " lag " + n.lag_ms + " ms" : "";
  return `<div class="node st-${esc(n.status)}" id="node-${esc(n.name)}" data-status="${esc(n.status)}" data-role="${esc(n.role)}">` +
    `<b>${esc(n.name)}</b> <span class="role">${esc(n.role)}</span> <span class="badge">${esc(n.status)}</span>` +
    `<span class="sub">${esc(extra + lag)}${n.exit_reason ? " (" + esc(n.exit_reason) + ")" : ""}</span>` +
    `<div class="btns"><button data-verb="node-kill" data-target="${esc(n.name)}"${dis}>kill</button>` +
    `<button data-verb="node-start" data-target="${esc(n.name)}"${dis}>start</button></div></div>`;
}
function heat(behind) {
  if (behind === undefined || behind === null) return "hx";
  return behind === 0 ? "h0" : behind < 100 ? "h1" : behind < 1000 ? "h2" : behind < 10000 ? "h3" : "h4";
}
function render() {
  $("vdl").textContent = snap.vdl; $("writer").textContent = snap.writer; $("epoch").textContent = snap.epoch;
  $("commits-s").textContent = snap.commits_s; $("p50").textContent = snap.commit_p50_ms;
  $("p99").textContent = snap.commit_p99_ms; $("lal").textContent = snap.lal_headroom;
  $("waiting").textContent = snap.waiting_commits;
  for (const [id, ok] of [["write-quorum", snap.write_quorum], ["read-quorum", snap.read_quorum]]) {
    const el = $(id); el.textContent = ok ? "met" : "LOST"; el.dataset.ok = ok ? "true" : "false";
    el.className = "v " + (ok ? "ok" : "bad");
  }
  $("azs").innerHTML = snap.azs.map(az => `<div class="az"><h3>${esc(az)} ` +
    `<button data-verb="az-down" data-target="${esc(az)}"${dis}>AZ down</button>` +
    `<button data-verb="az-up" data-target="${esc(az)}"${dis}>AZ up</button></h3>` +
    snap.nodes.filter(n => n.az === az).map(nodeCard).join("") + `</div>`).join("");
  const sns = snap.nodes.filter(n => n.role === "storage").map(n => n.name);
  let t = `<table><tr><th>PG</th>${sns.map(s => `<th>${esc(s)}</th>`).join("")}<th>PGCL</th><th>VDL</th><th>up</th><th>W 4/6</th><th>R 3/6</th></tr>`;
  for (const r of snap.pgs) {
    t += `<tr id="pg-${r.pg}"><td>${r.pg}</td>` + sns.map(s => {
      const scl = r.segments[s];
      return `<td class="${scl === null || scl === undefined ? "hx" : heat(r.behind[s])}" title="behind PGCL by ${r.behind[s] ?? "?"}">${scl ?? "down"}</td>`;
    }).join("") + `<td>${r.pgcl}</td><td>${snap.vdl}</td><td>${r.available}/6</td>` +
      `<td class="${r.write_ok ? "ok" : "bad"}" data-ok="${r.write_ok}">${r.write_ok ? "yes" : "NO"}</td>` +
      `<td class="${r.read_ok ? "ok" : "bad"}" data-ok="${r.read_ok}">${r.read_ok ? "yes" : "NO"}</td></tr>`;
  }
  $("pgs").innerHTML = t + "</table>";
  const reps = snap.nodes.filter(n => n.role === "replica");
  $("replicas").innerHTML = reps.length ? `<table><tr><th>replica</th><th>state</th><th>VDL</th><th>lag ms</th><th>lag LSNs</th></tr>` +
    reps.map(n => `<tr><td>${esc(n.name)}</td><td>${esc(n.status)}</td><td>${n.vdl ?? "-"}</td><td>${n.lag_ms ?? "-"}</td><td>${n.lag_lsn ?? "-"}</td></tr>`).join("") + "</table>" : "no replicas";
  $("timeline").innerHTML = snap.events.slice().reverse().map(e =>
    `<li><span class="note">${new Date(e.t * 1000).toLocaleTimeString()}</span> <span class="kind">${esc(e.kind)}</span>${esc(e.text)}</li>`).join("");
  const sel = $("net-target"), cur = sel.value;
  sel.innerHTML = snap.azs.concat(sns).map(x => `<option${x === cur ? " selected" : ""}>${esc(x)}</option>`).join("");
  const lat = snap.latency, extra = Object.entries(Object.assign({}, lat.extra_az_ms, lat.extra_node_ms)).map(([k, v]) => `${k} +${v} ms`).join(", ");
  $("latency").textContent = ` one-way ${lat.intra_az_ms} ms in an AZ, ${lat.cross_az_ms} ms across` + (extra ? "; extra: " + extra : "");
  chart("chart-tput", [[1, "#1a73e8", "commits/s"]]);
  chart("chart-lat", [[2, "#34a853", "p50"], [3, "#c5221f", "p99"]]);
  chart("chart-lag", [[4, "#8430ce", "lag ms"]]);
}
function chart(id, series) {
  const svg = $(id), W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), L = 44, B = 16;
  if (hist.length < 2) { svg.innerHTML = `<text x="${L}" y="20" font-size="11">collecting...</text>`; return; }
  const t0 = hist[0][0], t1 = hist[hist.length - 1][0];
  let max = 0; for (const row of hist) for (const [col] of series) max = Math.max(max, row[col] || 0);
  max = max > 0 ? max * 1.1 : 1;
  const x = t => L + (W - L - 4) * (t - t0) / Math.max(1, t1 - t0), y = v => (H - B) - (H - B - 6) * v / max;
  let s = `<line x1="${L}" y1="${H - B}" x2="${W}" y2="${H - B}" stroke="#aaa"/><line x1="${L}" y1="0" x2="${L}" y2="${H - B}" stroke="#aaa"/>` +
    `<text x="2" y="12" font-size="10">${max.toFixed(max < 10 ? 2 : 0)}</text><text x="2" y="${H - B}" font-size="10">0</text>` +
    `<text x="${L}" y="${H - 3}" font-size="10">-${Math.round(t1 - t0)} s</text><text x="${W - 24}" y="${H - 3}" font-size="10">now</text>`;
  series.forEach(([col, color, name], i) => {
    const pts = hist.map(r => `${x(r[0]).toFixed(1)},${y(r[col] || 0).toFixed(1)}`).join(" ");
    s += `<polyline fill="none" stroke="${color}" stroke-width="1.5" points="${pts}"/>` +
      `<text x="${W - 90 - i * 60}" y="12" font-size="10" fill="${color}">${esc(name)}</text>`;
  });
  svg.innerHTML = s;
}
document.addEventListener("click", async ev => {
  const b = ev.target.closest("button[data-verb]");
  if (!b || b.disabled) return;
  const verb = b.dataset.verb;
  let target = b.dataset.target || "", ms = 0;
  if (verb === "net-delay") { target = $("net-target").value; ms = +$("net-ms").value; }
  const what = verb === "net-delay" ? `add ${ms} ms of delay into ${target}` : `${verb.replace("-", " ")} ${target}`;
  if (!confirm(`Really ${what}?`)) return;
  $("msg").textContent = `${what}: sent...`;
  try {
    const r = await fetch("/api/action", {method: "POST", headers: {"Content-Type": "application/json", "X-Aurora-Token": TOKEN},
                                          body: JSON.stringify({verb, target, ms})});
    const j = await r.json();
    $("msg").textContent = (j.ok ? "" : "refused: ") + j.message;
  } catch (e) { $("msg").textContent = "failed: " + e; }
});
function connect() {
  const es = new EventSource("/events");
  es.onopen = () => { $("conn").textContent = "live"; };
  es.onmessage = m => {
    const s = JSON.parse(m.data);
    if (s.history) { hist = s.history; delete s.history; }
    else if (!hist.length || hist[hist.length - 1][0] !== s.t) {
      hist.push([s.t, s.commits_s, s.commit_p50_ms, s.commit_p99_ms, s.replica_lag_ms, s.vdl]);
      while (hist.length > 300) hist.shift();
    }
    snap = s; render();
  };
  es.onerror = () => { $("conn").textContent = "live: reconnecting"; };
}
render(); connect();
</script></body></html>
"""
