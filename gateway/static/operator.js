// The operator page: plain JS, no build step. Data from /ui/api/* (admin cookie).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { project: "", stream: null, selected: null };

async function api(path, options) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    showLogin();
    throw new Error("unauthorized");
  }
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.status === 204 ? null : response.json();
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "—" : String(text);
  if (className) td.className = className;
  return td;
}

function rate(value) {
  return value === null || value === undefined ? null : value.toFixed(1);
}

function showLogin() {
  $("login").hidden = false;
  $("main").hidden = true;
  $("logout").hidden = true;
}

function showMain() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
}

async function refreshQueues() {
  const data = await api("/ui/api/queues");
  showMain();
  const body = $("queues").tBodies[0];
  body.replaceChildren();
  for (const q of data.queues) {
    const row = body.insertRow();
    row.dataset.queue = `${q.project_id}/${q.queue_name}`;
    cell(row, q.project_id);
    cell(row, q.queue_name);
    const perKey = q.strategy === "partition";
    const limit = q.limit === null ? "∞" : q.limit;
    cell(row, perKey ? `${limit} per key` : limit, "num");
    const holding = cell(row, q.holding, "num");
    if (q.holding && q.limit && !perKey) {
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.min(100, (100 * q.holding) / q.limit) / 2}px`;
      holding.append(bar);
    }
    cell(row, q.queued, "num");
    cell(row, q.owner);
    cell(row, rate(q.admitted_per_s), "num");
    cell(row, rate(q.finished_per_s), "num");
  }
  const ready = data.dispatchers.filter((d) => d.ready).length;
  $("dispatchers").textContent = `${data.dispatchers.length} dispatcher(s), ${ready} ready`;
}

async function refreshProjects() {
  const data = await api("/ui/api/projects");
  const select = $("project");
  const current = select.value;
  select.replaceChildren(...data.projects.map((p) => new Option(p.project_id, p.project_id)));
  if (current) select.value = current;
  state.project = select.value;
  const project = data.projects.find((p) => p.project_id === state.project);
  const workflow = $("workflow");
  const chosen = workflow.value;
  workflow.replaceChildren(new Option("all", ""), ...(project ? project.workflows : []).map((w) => new Option(w, w)));
  workflow.value = chosen;
}

async function refreshExecutions() {
  if (!state.project) return;
  const params = new URLSearchParams({ project: state.project, limit: "50" });
  if ($("workflow").value) params.set("workflow", $("workflow").value);
  if ($("status").value) params.set("status", $("status").value);
  const data = await api(`/ui/api/executions?${params}`);
  const body = $("executions").tBodies[0];
  body.replaceChildren();
  for (const e of data.executions) {
    const row = body.insertRow();
    row.className = "clickable" + (e.id === state.selected ? " selected" : "");
    row.dataset.execution = e.id;
    cell(row, e.id);
    cell(row, e.workflow_id);
    cell(row, e.queue_name);
    const badge = document.createElement("span");
    badge.className = `status ${e.status}`;
    badge.textContent = e.status;
    cell(row, "").replaceChildren(badge);
    cell(row, e.created_at);
    row.addEventListener("click", () => openTimeline(e.project_id, e.id));
  }
}

function setStatus(status) {
  const badge = $("timeline-status");
  badge.textContent = status;
  badge.className = `status ${status}`;
  badge.dataset.status = status;
}

function addEvent(status, at, detail) {
  const item = document.createElement("li");
  item.dataset.status = status;
  item.textContent = `${at || ""}  ${status}${detail ? "  " + detail : ""}`;
  $("timeline-events").append(item);
}

function openTimeline(projectId, executionId) {
  if (state.stream) state.stream.close();
  state.selected = executionId;
  $("timeline").hidden = false;
  $("timeline-id").textContent = executionId;
  $("timeline-events").replaceChildren();
  $("timeline-detail").textContent = "";
  const base = `/ui/api/projects/${encodeURIComponent(projectId)}/executions/${encodeURIComponent(executionId)}`;
  const stream = new EventSource(`${base}/events`);
  state.stream = stream;
  const seen = new Set();
  stream.addEventListener("record", (message) => {
    const record = JSON.parse(message.data);
    const steps = [
      ["queued", record.created_at],
      ["admitted", record.admitted_at],
      ["running", record.started_at],
    ];
    for (const [status, at] of steps) {
      if (at && !seen.has(status)) { seen.add(status); addEvent(status, at); }
    }
    if (!seen.has(record.status)) { seen.add(record.status); addEvent(record.status, record.completed_at); }
    setStatus(record.status);
    $("timeline-detail").textContent = JSON.stringify(record, null, 2);
  });
  stream.addEventListener("lifecycle", (message) => {
    const event = JSON.parse(message.data);
    if (!seen.has(event.status)) {
      seen.add(event.status);
      addEvent(event.status, event.at, event.worker_id ? `on ${event.worker_id}` : "");
    }
    setStatus(event.status);
    if (["completed", "failed", "timed_out", "cancelled", "deduplicated"].includes(event.status)) {
      // The result (or error) is in the record, once the recorder has it.
      setTimeout(() => api(base).then((record) => {
        $("timeline-detail").textContent = JSON.stringify(record, null, 2);
      }).catch(() => {}), 300);
    }
  });
  // A terminal execution's stream ends; do not reconnect to it forever.
  stream.onerror = () => stream.close();
}

async function tick() {
  try {
    await refreshQueues();
    await refreshProjects();
    await refreshExecutions();
  } catch (error) {
    if (error.message !== "unauthorized") console.warn(error);
  }
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    await fetch("/ui/api/session", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key: $("key").value }),
    }).then((r) => { if (!r.ok) throw new Error("That is not an admin key."); });
    $("key").value = "";
    await tick();
  } catch (error) {
    $("login-error").textContent = error.message;
  }
});
$("logout").addEventListener("click", async () => {
  await fetch("/ui/api/session", { method: "DELETE", credentials: "same-origin" });
  showLogin();
});
for (const id of ["project", "workflow", "status"]) {
  $(id).addEventListener("change", () => { state.project = $("project").value; refreshExecutions(); });
}

tick();
setInterval(tick, 2000);
