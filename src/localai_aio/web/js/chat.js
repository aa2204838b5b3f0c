// Chat: streamed answers from /v1/chat/completions, rendered as sanitised Markdown as they arrive.
// Conversations are kept in localStorage; Stop aborts the request, which the server takes as the client
// leaving: it stops generating and frees the model's slot at once.

import { events, fillSelect, models, modelsFor, request, say } from "./api.js";
import { renderInto } from "./markdown.js";

const STORE = "localai-aio.conversations";
const CURRENT = "localai-aio.conversation";
const DEFAULTS = "localai-aio.chat-settings";
const RENDER_EVERY_MS = 16; // about a frame: each token shows as it comes, without re-parsing more often

const $ = (id) => document.getElementById(id);
let conversations = [];
let current = null;
let controller = null;

function load() {
  try {
    conversations = JSON.parse(localStorage.getItem(STORE) || "[]");
  } catch {
    conversations = [];
  }
  if (!Array.isArray(conversations)) conversations = [];
}

function save() {
  if (current) current.updated = Date.now();
  conversations.sort((a, b) => b.updated - a.updated);
  try {
    localStorage.setItem(STORE, JSON.stringify(conversations));
    if (current) localStorage.setItem(CURRENT, current.id);
  } catch (err) {
    say($("chat-status"), `The conversation could not be saved in this browser: ${err.message}`, "error");
  }
}

function defaults() {
  try {
    return JSON.parse(localStorage.getItem(DEFAULTS) || "{}");
  } catch {
    return {};
  }
}

function newConversation() {
  const d = defaults();
  return { id: crypto.randomUUID(), title: "New chat", messages: [], updated: Date.now(), model: d.model || "",
    system: d.system || "", temperature: d.temperature ?? 0.7, maxTokens: d.maxTokens ?? "" };
}

function readSettings() {
  if (!current) return;
  current.model = $("chat-model").value;
  current.system = $("chat-system").value;
  const t = parseFloat($("chat-temperature").value);
  current.temperature = Number.isFinite(t) ? t : 0.7;
  const n = parseInt($("chat-max-tokens").value, 10);
  current.maxTokens = Number.isFinite(n) && n > 0 ? n : "";
  localStorage.setItem(DEFAULTS, JSON.stringify({ model: current.model, system: current.system,
    temperature: current.temperature, maxTokens: current.maxTokens }));
}

function showSettings() {
  if (current.model && [...$("chat-model").options].some((o) => o.value === current.model)) {
    $("chat-model").value = current.model;
  }
  $("chat-system").value = current.system || "";
  $("chat-temperature").value = current.temperature ?? 0.7;
  $("chat-max-tokens").value = current.maxTokens || "";
}

function renderList() {
  const list = $("chat-list");
  list.replaceChildren(...conversations.map((conv) => {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "conversation";
    open.textContent = conv.title || "New chat";
    if (conv === current) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => select(conv.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "quiet icon";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Delete conversation “${conv.title || "New chat"}”`);
    remove.addEventListener("click", () => removeConversation(conv.id));
    item.append(open, remove);
    return item;
  }));
}

function select(id) {
  if (controller) return; // finish or stop the answer first
  current = conversations.find((c) => c.id === id) || current;
  localStorage.setItem(CURRENT, current.id);
  showSettings();
  renderMessages();
  renderList();
  $("chat-input").focus();
}

function removeConversation(id) {
  if (controller && current?.id === id) return;
  conversations = conversations.filter((c) => c.id !== id);
  if (current?.id === id) {
    current = conversations[0] || newConversation();
    if (!conversations.includes(current)) conversations.unshift(current);
    showSettings();
    renderMessages();
  }
  save();
  renderList();
  say($("chat-status"), "Conversation deleted.");
}

function formatStats(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.tps) parts.push(`${stats.tps.toFixed(1)} tokens/s`);
  if (stats.ttft != null) parts.push(`first token ${stats.ttft.toFixed(2)} s`);
  if (stats.tokens != null) parts.push(`${stats.estimated ? "≈" : ""}${stats.tokens} tokens`);
  if (stats.stopped) parts.push("stopped");
  return parts.join(" · ");
}

/** The element of one message; `update` re-renders it (throttled while streaming). */
function messageView(message, index) {
  const item = document.createElement("li");
  item.className = `message ${message.role}`;
  item.dataset.index = String(index);
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = message.role === "user" ? "You" : `Assistant${message.model ? ` · ${message.model}` : ""}`;
  item.append(who);
  if (message.role === "user") {
    const text = document.createElement("div");
    text.className = "content plain";
    text.textContent = message.content;
    item.append(text);
    return { item, update() {} };
  }
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  reasoning.hidden = !message.reasoning;
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const thoughts = document.createElement("div");
  thoughts.className = "reasoning-text markdown";
  reasoning.append(summary, thoughts);
  const content = document.createElement("div");
  content.className = "content markdown";
  content.setAttribute("aria-live", "polite");
  const error = document.createElement("p");
  error.className = "error";
  error.setAttribute("role", "alert");
  error.hidden = true;
  const meta = document.createElement("div");
  meta.className = "meta";
  const stats = document.createElement("span");
  stats.className = "stats";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "quiet copy";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => copyText(message.content));
  const again = document.createElement("button");
  again.type = "button";
  again.className = "quiet regenerate";
  again.textContent = "Regenerate";
  again.addEventListener("click", () => regenerate(item));
  meta.append(stats, copy, again);
  item.append(reasoning, content, error, meta);

  let timer = null;
  let shown = { content: null, reasoning: null };
  const draw = () => {
    timer = null;
    if (shown.reasoning !== message.reasoning) {
      renderInto(thoughts, message.reasoning || "");
      reasoning.hidden = !message.reasoning;
    }
    if (shown.content !== message.content) renderInto(content, message.content || "");
    shown = { content: message.content, reasoning: message.reasoning };
    stats.textContent = formatStats(message.stats);
    error.hidden = !message.error;
    error.textContent = message.error || "";
    item.dataset.state = message.state || "done";
    content.setAttribute("aria-busy", message.state === "streaming" ? "true" : "false");
    meta.hidden = message.state === "streaming";
  };
  return {
    item,
    update(now = false) {
      if (now) {
        clearTimeout(timer);
        draw();
      } else if (timer === null) {
        timer = setTimeout(draw, RENDER_EVERY_MS);
      }
    },
  };
}

function renderMessages() {
  const list = $("chat-messages");
  const views = current.messages.map((m, i) => messageView(m, i));
  list.replaceChildren(...views.map((v) => v.item));
  views.forEach((v) => v.update(true));
  $("chat-empty").hidden = current.messages.length > 0;
  markLast();
}

function markLast() {
  const items = [...$("chat-messages").children];
  items.forEach((item, i) => {
    const again = item.querySelector(".regenerate");
    if (again) again.hidden = i !== items.length - 1 || Boolean(controller);
  });
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea"); // http:// pages on another host have no clipboard API
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  say($("chat-status"), "Copied to the clipboard.");
}

function busy(on) {
  $("chat-send").hidden = on;
  $("chat-stop").hidden = !on;
  $("chat-model").disabled = on;
  $("chat-new").disabled = on;
  if (!on) $("chat-input").focus();
  markLast();
}

function scrollToEnd() {
  const list = $("chat-messages");
  const last = list.lastElementChild;
  if (last) last.scrollIntoView({ block: "end" });
}

async function generate() {
  readSettings();
  const model = current.model;
  if (!model) {
    say($("chat-status"), "No chat model is installed: see the Models page.", "error");
    return;
  }
  const history = current.messages.map((m) => ({ role: m.role, content: m.content }));
  if (current.system.trim()) history.unshift({ role: "system", content: current.system });
  const body = { model, messages: history, stream: true, stream_options: { include_usage: true },
    temperature: current.temperature };
  if (current.maxTokens) body.max_tokens = current.maxTokens;

  const message = { role: "assistant", content: "", reasoning: "", model, state: "streaming" };
  const view = messageView(message, current.messages.length);
  $("chat-messages").append(view.item);
  $("chat-empty").hidden = true;
  view.update(true);
  scrollToEnd();
  controller = new AbortController();
  busy(true);
  say($("chat-status"), `${model} is answering…`);
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  try {
    const resp = await request("/v1/chat/completions", { method: "POST", json: body, signal: controller.signal });
    for await (const event of events(resp)) {
      if (event.usage) usage = event.usage;
      const delta = event.choices?.[0]?.delta;
      if (!delta) continue;
      if (delta.reasoning_content) message.reasoning += delta.reasoning_content;
      if (delta.content) message.content += delta.content;
      if (delta.content || delta.reasoning_content) {
        chunks += 1;
        first ??= performance.now();
        view.update();
      }
    }
    message.state = "done";
    say($("chat-status"), "Answer complete.");
  } catch (err) {
    if (err.name === "AbortError") {
      message.state = "stopped";
      say($("chat-status"), "Stopped: the server stopped generating.");
    } else {
      message.state = "error";
      message.error = err.message;
      say($("chat-status"), `The answer failed: ${err.message}`, "error");
    }
  }
  const ended = performance.now();
  const tokens = usage?.completion_tokens ?? chunks;
  const generating = first !== null ? (ended - first) / 1000 : 0;
  message.stats = { ttft: first !== null ? (first - started) / 1000 : null, tokens,
    tps: generating > 0 && tokens > 1 ? (tokens - 1) / generating : null, estimated: !usage,
    stopped: message.state === "stopped" };
  controller = null;
  if (message.content || message.reasoning) { // kept (a failed answer's error is shown, not kept)
    current.messages.push({ role: "assistant", content: message.content, reasoning: message.reasoning, model,
      stats: message.stats, state: message.state === "stopped" ? "stopped" : "done" });
  }
  view.update(true);
  save();
  renderList();
  busy(false);
}

async function send(text) {
  if (current.messages.length === 0) current.title = text.replace(/\s+/g, " ").trim().slice(0, 48) || "New chat";
  if (!conversations.includes(current)) conversations.unshift(current);
  const message = { role: "user", content: text };
  current.messages.push(message);
  const view = messageView(message, current.messages.length - 1);
  $("chat-messages").append(view.item);
  save();
  renderList();
  await generate();
}

async function regenerate(item) {
  if (controller) return;
  const index = Number(item.dataset.index);
  if (current.messages[index]?.role === "assistant") current.messages.splice(index, 1);
  item.remove();
  save();
  await generate();
}

function stop() {
  if (controller) controller.abort();
}

async function fillModels() {
  const list = await models();
  const chat = modelsFor(list, "chat").map((m) => m.name);
  fillSelect($("chat-model"), chat, "localai-aio.chat-model");
  if (current?.model && chat.includes(current.model)) $("chat-model").value = current.model;
  if (!chat.length) say($("chat-status"), "No chat model is installed: see the Models page.", "error");
}

export async function init() {
  load();
  const wanted = localStorage.getItem(CURRENT);
  current = conversations.find((c) => c.id === wanted) || conversations[0] || newConversation();
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    send(text);
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    } else if (event.key === "Escape" && controller) {
      stop();
    }
  });
  $("chat-stop").addEventListener("click", stop);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && controller && !document.querySelector("dialog[open]")) stop();
  });
  $("chat-new").addEventListener("click", () => {
    if (controller) return;
    readSettings();
    current = newConversation();
    showSettings();
    renderMessages();
    renderList();
    $("chat-input").focus();
  });
  for (const id of ["chat-model", "chat-system", "chat-temperature", "chat-max-tokens"]) {
    $(id).addEventListener("change", () => {
      readSettings();
      if (conversations.includes(current)) save();
    });
  }
  if (window.matchMedia("(max-width: 720px)").matches) $("chat-history").open = false;
  await fillModels();
  showSettings();
  renderMessages();
  renderList();
}

export async function show() {
  await fillModels();
}
