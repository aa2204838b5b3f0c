// Models: what is installed (backend, use cases, aliases, loaded or not) and the gallery, whose entries
// install through POST /models/apply; the job is followed at GET /models/jobs/{uuid} until done.

import { APIError, getJSON, models, request, say } from "./api.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function size(bytes) {
  if (!bytes) return "";
  return bytes >= 1e9 ? `${(bytes / 1e9).toFixed(1)} GB` : `${Math.round(bytes / 1e6)} MB`;
}

async function showInstalled() {
  const list = await models(true);
  const rows = list.data.map((m) => {
    const row = document.createElement("tr");
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = m.name;
    const state = m.error ? `error: ${m.error}` : m.loaded ? "loaded" : "not loaded";
    row.append(name, cell(m.backend || "?"), cell(m.usecases.join(", ")), cell(m.aliases.join(", ")), cell(state));
    if (m.error) row.className = "error";
    return row;
  });
  $("models-installed").tBodies[0].replaceChildren(...rows);
  return list;
}

async function follow(job, entry, parts) {
  const { progress, message } = parts;
  for (;;) {
    const status = await getJSON(`/models/jobs/${encodeURIComponent(job.uuid)}`);
    progress.value = status.progress;
    progress.textContent = `${status.progress}%`;
    message.textContent = status.error || status.message;
    if (status.processed) {
      message.dataset.kind = status.error ? "error" : "";
      return status;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function install(entry, parts) {
  const { button, progress, message } = parts;
  button.disabled = true;
  progress.hidden = false;
  progress.value = 0;
  message.dataset.kind = "";
  message.textContent = "Asking the server to install it…";
  try {
    const job = await (await request("/models/apply", { method: "POST", json: { id: entry.name } })).json();
    const status = await follow(job, entry, parts);
    if (!status.error) {
      button.textContent = "Installed";
      await showInstalled();
      return;
    }
  } catch (err) {
    message.textContent = err instanceof APIError ? err.message : `The install failed: ${err.message}`;
    message.dataset.kind = "error";
  }
  button.disabled = false;
}

async function showGallery(galleryOn) {
  const note = $("models-gallery-note");
  const list = $("models-gallery");
  if (!galleryOn) {
    note.textContent = "The gallery API is turned off on this server (--disable-gallery-api): install models "
      + "with `localai-aio models install <name>` where the server runs.";
    list.replaceChildren();
    return;
  }
  let entries;
  try {
    entries = await getJSON("/models/available");
  } catch (err) {
    note.textContent = `The gallery cannot be shown: ${err.message}`;
    return;
  }
  note.textContent = "Installing downloads the model on the server (the same as `localai-aio models install "
    + "<name>`); it is served as soon as it is installed.";
  list.replaceChildren(...entries.map((entry) => {
    const item = document.createElement("li");
    item.className = "card";
    item.dataset.entry = entry.name;
    const title = document.createElement("h3");
    title.textContent = entry.name;
    const about = document.createElement("p");
    about.textContent = entry.description;
    const facts = document.createElement("p");
    facts.className = "hint";
    facts.textContent = [entry.usecases.join(", "), entry.backend, size(entry.size), entry.license,
      entry.default ? "a default model" : ""].filter(Boolean).join(" · ");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "primary";
    button.textContent = entry.installed ? "Installed" : "Install";
    button.disabled = entry.installed;
    button.setAttribute("aria-label", `${entry.installed ? "Installed" : "Install"} ${entry.name}`);
    const progress = document.createElement("progress");
    progress.max = 100;
    progress.hidden = true;
    progress.setAttribute("aria-label", `Install of ${entry.name}`);
    const message = document.createElement("p");
    message.className = "status";
    message.setAttribute("role", "status");
    const parts = { button, progress, message };
    button.addEventListener("click", () => install(entry, parts));
    item.append(title, about, facts, button, progress, message);
    return item;
  }));
}

async function refresh() {
  const list = await showInstalled();
  await showGallery(list.gallery_api);
}

export async function init() {
  $("models-refresh").addEventListener("click", () => refresh().catch((err) => console.error(err)));
  await refresh();
}

export async function show() {
  await refresh();
}
