// The status page: polls /api/status every two seconds and, while a log view is open,
// /api/logs. Everything that came from plugins is set with textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
let openInstance = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function num(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function uptime(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24;
  const m = Math.floor(seconds / 60) % 60, s = seconds % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function cell(label, value, cls) {
  return el("td", { "data-label": label, class: cls || "" }, value);
}

function renderPlugin(plugin, metricsOn) {
  const calls = plugin.calls || {};
  const healthy = plugin.ready >= plugin.desired;
  const head = el("div", { class: "plugin-head" },
    el("h2", {}, plugin.name),
    el("span", { class: "service" }, plugin.service),
    el("span", { class: healthy ? "badge ok" : "badge bad" }, `${plugin.ready}/${plugin.desired} ready`),
    el("span", { class: "muted" }, metricsOn
      ? `${num(calls.calls_per_s, 1)} calls/s · p50 ${num(calls.p50_ms, 2)} ms · p99 ${num(calls.p99_ms, 2)} ms`
      : "call metrics off ([telemetry] metrics = true)"));
  const rows = plugin.instances.map((i) => {
    const stats = i.calls || {};
    const button = el("button", { type: "button", class: "logs-button", "data-instance": i.id }, "logs");
    button.addEventListener("click", () => openLogs(i.id));
    return el("tr", { "data-instance-row": i.id },
      cell("instance", i.id, "id"),
      cell("state", el("span", { class: `state state-${i.state}`, title: i.detail }, i.state)),
      cell("pid", i.pid ?? "–"),
      cell("uptime", uptime(i.uptime_s)),
      cell("restarts", i.restarts),
      cell("last exit", i.last_exit ?? "–", "exit"),
      cell("calls/s", num(stats.calls_per_s, 1)),
      cell("p50 ms", num(stats.p50_ms, 2)),
      cell("p99 ms", num(stats.p99_ms, 2)),
      el("td", { class: "actions" }, button));
  });
  const header = el("tr", {}, ...["instance", "state", "pid", "uptime", "restarts", "last exit",
    "calls/s", "p50 ms", "p99 ms", ""].map((h) => el("th", {}, h)));
  return el("section", { class: "plugin", "data-plugin": plugin.name }, head,
    el("table", {}, el("thead", {}, header), el("tbody", {}, ...rows)));
}

async function refresh() {
  try {
    const response = await fetch("/api/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`status ${response.status}`);
    const status = await response.json();
    const plugins = document.getElementById("plugins");
    plugins.replaceChildren(...status.plugins.map((p) => renderPlugin(p, status.metrics)));
    const instances = status.plugins.reduce((n, p) => n + p.instances.length, 0);
    const ready = status.plugins.reduce((n, p) => n + p.ready, 0);
    document.getElementById("summary").textContent =
      `${status.plugins.length} plugin(s), ${ready}/${instances} instance(s) ready`;
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.getElementById("error").hidden = true;
  } catch (error) {
    const box = document.getElementById("error");
    box.textContent = `cannot reach mesh up: ${error.message}`;
    box.hidden = false;
  }
  if (openInstance) await refreshLogs();
}

async function refreshLogs() {
  const instance = openInstance;
  const response = await fetch(`/api/logs?instance=${encodeURIComponent(instance)}`, { cache: "no-store" });
  if (instance !== openInstance) return;
  const pre = document.getElementById("logs-lines");
  if (!response.ok) {
    pre.textContent = `no logs: ${response.status}`;
    return;
  }
  const logs = await response.json();
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.replaceChildren(...logs.lines.map((line) =>
    el("div", { class: `line ${line.stream}` },
      el("span", { class: "at" }, new Date(line.at_ms).toLocaleTimeString()), " ",
      el("span", { class: "stream" }, line.stream === "stderr" ? "err" : "out"), " ",
      el("span", { class: "text" }, line.text))));
  if (logs.lines.length === 0) pre.textContent = "(no lines yet)";
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

async function openLogs(instance) {
  openInstance = instance;
  document.getElementById("logs-instance").textContent = instance;
  document.getElementById("logs").hidden = false;
  await refreshLogs();
  document.getElementById("logs").scrollIntoView({ block: "nearest" });
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("logs-close").addEventListener("click", () => {
    openInstance = null;
    document.getElementById("logs").hidden = true;
  });
  refresh();
  setInterval(refresh, POLL_MS);
});
