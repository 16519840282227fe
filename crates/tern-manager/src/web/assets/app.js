// The manager's page: polls the JSON API with the bearer token and redraws.
"use strict";

const REFRESH_MS = 1500;
const MAX_VM_ROWS = 200;

const $ = (id) => document.getElementById(id);

// Every call the page makes, as "METHOD /path" with {name} for a VM's name; the
// manager's tests check each against its OpenAPI document.
const ROUTES = {
  hosts: "GET /v1/hosts",
  vms: "GET /v1/vms",
  migrations: "GET /v1/migrations",
  history: "GET /v1/history",
  vmActions: "GET /v1/vm-actions",
  start: "POST /v1/vms/{name}/start",
  stop: "POST /v1/vms/{name}/stop",
  reboot: "POST /v1/vms/{name}/reboot",
  pause: "POST /v1/vms/{name}/pause",
  resume: "POST /v1/vms/{name}/resume",
  suspend: "POST /v1/vms/{name}/suspend",
  restore: "POST /v1/vms/{name}/restore",
  delete: "DELETE /v1/vms/{name}",
};

// Actions that ask before they are sent: they end what the guest is doing.
const CONFIRM = {
  stop: (vm) => `Stop VM ${vm}? The guest is asked to power off, then powered off after 30 s.`,
  delete: (vm) => `Delete VM ${vm} and its disks? This cannot be undone.`,
};

// The token comes from ?token= (then leaves the address bar) or the login field, and
// lives in this tab's sessionStorage only.
function takeToken() {
  const url = new URL(location.href);
  const t = url.searchParams.get("token");
  if (t) {
    sessionStorage.setItem("tern-token", t);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem("tern-token");
}

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : String(k));
  return e;
}

function bar(used, total, label) {
  const frac = total > 0 ? used / total : 0;
  const cls = frac > 1 ? "bar over" : frac > 0.8 ? "bar hot" : "bar";
  const fill = el("div", { style: `width:${Math.min(100, frac * 100).toFixed(1)}%` });
  return el("div", { class: cls, title: label }, fill, el("span", {}, label));
}

const bytes = (b) => b == null ? "—" : b >= 1e9 ? (b / 1e9).toFixed(2) + " GB"
  : b >= 1e6 ? (b / 1e6).toFixed(1) + " MB" : (b / 1e3).toFixed(0) + " kB";
const ms = (m) => m == null ? "—" : m >= 1000 ? (m / 1000).toFixed(2) + " s" : m + " ms";

function fill(tbodyParent, rows) {
  const body = $(tbodyParent).tBodies[0];
  body.replaceChildren(...rows.map((cells) =>
    el("tr", {}, ...cells.map((c) => c instanceof Node ? el("td", {}, c) : el("td", {}, c ?? "—")))));
}

// Calls route `key` of ROUTES with `{name}` filled in and `query` appended; the parsed
// JSON answer, or an Error with the server's message and status.
async function api(key, token, { name, query } = {}) {
  const [method, path] = ROUTES[key].split(" ");
  const url = path.replace("{name}", encodeURIComponent(name ?? "")) + (query ? "?" + query : "");
  const r = await fetch(url, { method, headers: { Authorization: "Bearer " + token } });
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    const e = new Error(msg);
    e.status = r.status;
    throw e;
  }
  return r.json();
}

// What each VM state allows (GET /v1/vm-actions), fetched once per page load.
let vmActions = null;

// Runs `action` on `vm` after a confirmation where CONFIRM asks for one; the answer,
// or the server's refusal (a 409 when the state does not allow it), shows in the
// VM table's status line.
async function act(vm, action) {
  const ask = CONFIRM[action];
  if (ask && !confirm(ask(vm))) return;
  const token = sessionStorage.getItem("tern-token");
  const line = $("vm-action");
  line.className = "";
  line.textContent = `${action} ${vm}...`;
  try {
    const v = await api(action, token, { name: vm });
    line.textContent = `${action} ${vm}: ${v.state}`;
  } catch (e) {
    line.className = "error";
    line.textContent = `${action} ${vm} refused: ${e.message}`;
  }
}

function actionButtons(v) {
  const allowed = (vmActions && vmActions[v.state]) || [];
  return el("span", { class: "actions" }, ...allowed.map((a) => {
    const b = el("button", { type: "button", "data-action": a, "data-vm": v.name }, a);
    b.addEventListener("click", () => act(v.name, a));
    return b;
  }));
}

function drawHosts(hosts, vms) {
  const mem = {}, count = {};
  for (const v of vms) {
    const h = v.desired_host;
    if (!h) continue;
    mem[h] = (mem[h] || 0) + v.spec.memory_mib;
    count[h] = (count[h] || 0) + 1;
  }
  $("host-count").textContent = hosts.length;
  fill("hosts", hosts.map((h) => {
    const cpu = h.cpu_smoothed ?? h.cpu_used ?? 0;
    const m = mem[h.name] || 0;
    return [
      h.name,
      el("span", { class: "state-" + h.state }, h.state),
      bar(cpu, h.capacity.cpus, `${cpu.toFixed(1)} / ${h.capacity.cpus} cores`),
      bar(m, h.capacity.memory_mib, `${(m / 1024).toFixed(1)} / ${(h.capacity.memory_mib / 1024).toFixed(0)} GiB`),
      count[h.name] || 0,
    ];
  }));
}

// The guest as its host reports it (`guest.state`, with the reason as a tooltip), or
// `failed` once HA gave up restarting it; a dash when nothing runs it.
function guestCell(v) {
  if (v.restarts && v.restarts.failed) {
    return el("span", { class: "guest-failed", title: v.restarts.failed }, "failed");
  }
  if (!v.guest) return "-";
  return el("span", { class: "guest-" + v.guest.state, title: v.guest.reason || "" },
    v.guest.state);
}

function drawVms(vms) {
  $("vm-count").textContent = vms.length;
  fill("vms", vms.slice(0, MAX_VM_ROWS).map((v) => [
    v.name,
    v.observed_host || v.desired_host,
    el("span", { class: "state-" + v.state }, v.state),
    guestCell(v),
    v.spec.vcpus,
    v.spec.memory_mib + " MiB",
    v.cpu_used.toFixed(2),
    actionButtons(v),
  ]));
  $("vm-more").textContent = vms.length > MAX_VM_ROWS
    ? `showing ${MAX_VM_ROWS} of ${vms.length}` : "";
}

// A running migration's telemetry (`progress`, relayed from its source) appears once
// the source reported; until then those columns show a dash. The remaining column's bar
// fills as the destination's copy of the guest's memory becomes current, inside a round
// too: the round column names the round being sent, or the last done between rounds.
function drawMigrations(running, migrations, vms, now) {
  const memory = {};
  for (const v of vms) memory[v.name] = v.spec.memory_mib * 1048576;
  const done = migrations.filter((m) => m.result.status !== "running")
    .sort((a, b) => b.id - a.id).slice(0, 20);
  $("running-count").textContent = running.length;
  fill("running", running.map((m) => {
    const p = m.progress || {};
    const mem = memory[m.vm] || 0;
    const left = p.bytes_remaining == null ? "—"
      : bar(mem - p.bytes_remaining, mem, bytes(p.bytes_remaining));
    // Rates and the downtime estimate are measured per round: none before the first ends.
    const measured = p.round > 0;
    return [m.id, m.vm, m.from, m.to, m.policy,
      p.phase ? p.phase.replace(/_/g, "-") : "waiting", ms(Math.max(0, now - m.started)),
      p.running_round || p.round, bytes(p.bytes_transferred), left,
      measured ? bytes(p.dirty_rate_bytes_per_s) + "/s" : "—",
      measured ? ms(Math.round(p.predicted_downtime_ms)) : "—"];
  }));
  fill("recent", done.map((m) => [m.id, m.vm, m.from, m.to, m.policy, m.reason,
    el("span", { class: "result-" + m.result.status }, m.result.status === "failed"
      ? "failed: " + m.result.error : m.result.status),
    ms(m.result.total_ms), ms(m.result.downtime_ms)]));
}

function drawScore(scores) {
  const svg = $("score");
  const W = 600, H = 140, pad = 14;
  svg.replaceChildren();
  if (scores.length === 0) return;
  const t0 = scores[0].time, t1 = Math.max(scores[scores.length - 1].time, t0 + 1);
  const top = Math.max(...scores.map((s) => s.score), 1e-6);
  const pts = scores.map((s) => {
    const x = pad + (s.time - t0) / (t1 - t0) * (W - 2 * pad);
    const y = H - pad - s.score / top * (H - 2 * pad);
    return x.toFixed(1) + "," + y.toFixed(1);
  });
  if (pts.length === 1) pts.push((W - pad) + "," + pts[0].split(",")[1]);
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", pts.join(" "));
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", pad);
  label.setAttribute("y", 10);
  label.textContent = "max " + top.toFixed(3);
  svg.append(line, label);
  const last = scores[scores.length - 1];
  $("score-now").textContent =
    `now ${last.score.toFixed(4)} (spread; lower is more even), ${Math.round((t1 - t0) / 1000)} s shown`;
}

function describe(e) {
  const { seq, time, type, ...rest } = e;
  const what = Object.entries(rest).map(([k, v]) =>
    `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  return `#${seq} ${new Date(time).toLocaleTimeString()} ${type} ${what}`;
}

function drawEvents(events) {
  $("events").replaceChildren(...events.slice().reverse().map((e) => el("li", {}, describe(e))));
}

async function refresh(token) {
  if (!vmActions) vmActions = (await api("vmActions", token)).actions;
  const [hosts, vms, running, migrations, hist] = await Promise.all([
    api("hosts", token), api("vms", token),
    api("migrations", token, { query: "running=true&limit=200" }),
    api("migrations", token, { query: "limit=200" }),
    api("history", token, { query: "events=40" }),
  ]);
  drawHosts(hosts, vms);
  drawVms(vms);
  drawMigrations(running, migrations, vms, Date.now());
  drawScore(hist.scores);
  drawEvents(hist.events);
}

function showLogin(message) {
  $("status").textContent = message;
  $("status").className = "error";
  $("login").hidden = false;
}

async function loop() {
  const token = takeToken();
  if (!token) return showLogin("enter the manager's API token");
  try {
    await refresh(token);
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
    $("status").className = "";
    $("login").hidden = true;
  } catch (e) {
    if (e.status === 401) {
      sessionStorage.removeItem("tern-token");
      return showLogin(e.message);
    }
    $("status").textContent = "error: " + e.message;
    $("status").className = "error";
  }
  setTimeout(loop, REFRESH_MS);
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("tern-token", $("token").value);
  $("login").hidden = true;
  loop();
});

loop();
