// Talking to the server: the API key (asked once, kept in sessionStorage, sent as a bearer token),
// errors in OpenAI's shape, Server-Sent Events and the model list.

const KEY = "localai-aio.api-key";

export class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "APIError";
    this.status = status;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
  document.getElementById("key-forget").hidden = true;
}

function authHeaders(key, headers) {
  const out = new Headers(headers || {});
  if (key) out.set("Authorization", `Bearer ${key}`);
  return out;
}

/** The message of an error answer: OpenAI's, Anthropic's or ElevenLabs' shape, else the status. */
export async function errorMessage(resp) {
  let text = "";
  try {
    text = await resp.text();
    const body = JSON.parse(text);
    const message = body?.error?.message ?? body?.detail?.message ?? body?.message;
    if (message) return String(message);
  } catch {
    // not JSON: the text or the status below
  }
  return text.trim().slice(0, 300) || `${resp.status} ${resp.statusText}`;
}

let pendingKey = null;

/** Open the key dialog (once, however many requests are waiting) and resolve when a key the server
 *  accepts has been entered. The dialog checks the key itself, so a wrong one is said at once. */
export function askForKey(reason) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  const error = document.getElementById("key-error");
  const why = document.getElementById("key-why");
  if (apiKey()) why.textContent = `The server refused the key of this tab (${reason}). Enter another one.`;
  error.textContent = "";
  pendingKey = new Promise((resolve) => {
    const submit = async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      error.textContent = "";
      const resp = await fetch("/ui/api/models", { headers: authHeaders(key) });
      if (resp.status === 401) {
        error.textContent = `That key was refused: ${await errorMessage(resp)}`;
        input.select();
        return;
      }
      sessionStorage.setItem(KEY, key);
      document.getElementById("key-forget").hidden = false;
      form.removeEventListener("submit", submit);
      dialog.removeEventListener("cancel", keepOpen);
      input.value = "";
      dialog.close();
      pendingKey = null;
      resolve(key);
    };
    const keepOpen = (event) => event.preventDefault(); // nothing works without a key
    form.addEventListener("submit", submit);
    dialog.addEventListener("cancel", keepOpen);
  });
  dialog.showModal();
  input.focus();
  return pendingKey;
}

/** fetch() with the key; a 401 asks for a key and tries again; other errors throw an APIError. */
export async function request(path, { method = "GET", json, body, headers, signal } = {}) {
  for (;;) {
    const sent = authHeaders(apiKey(), headers);
    let payload = body;
    if (json !== undefined) {
      sent.set("Content-Type", "application/json");
      payload = JSON.stringify(json);
    }
    const resp = await fetch(path, { method, headers: sent, body: payload, signal });
    if (resp.status === 401) {
      await askForKey(await errorMessage(resp));
      continue;
    }
    if (!resp.ok) throw new APIError(resp.status, await errorMessage(resp));
    return resp;
  }
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

/** The events of a Server-Sent Events answer, parsed as JSON, until `[DONE]`. An error event (the
 *  server's failure after the stream began) is thrown. */
export async function* events(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new APIError(500, event.error.message || "The server failed");
        yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

let modelList = null;

/** The configured models (name, backend, use cases, aliases, loaded), from /ui/api/models. */
export async function models(refresh = false) {
  if (!modelList || refresh) {
    modelList = getJSON("/ui/api/models").catch((err) => {
      modelList = null;
      throw err;
    });
  }
  return modelList;
}

export function modelsFor(list, usecase) {
  return list.data.filter((m) => m.usecases.includes(usecase));
}

/** Fill a <select> with models, keeping the choice remembered under `remember`. */
export function fillSelect(select, names, remember, labels = {}) {
  const previous = select.value || localStorage.getItem(remember) || "";
  select.replaceChildren(...names.map((name) => new Option(labels[name] || name, name)));
  if (names.includes(previous)) select.value = previous;
  select.disabled = names.length === 0;
  if (!select.dataset.remembers) {
    select.dataset.remembers = "1";
    select.addEventListener("change", () => localStorage.setItem(remember, select.value));
  }
}

export function formatSeconds(seconds) {
  if (!Number.isFinite(seconds)) return "";
  const m = Math.floor(seconds / 60);
  const s = (seconds - m * 60).toFixed(2).padStart(5, "0");
  return `${m}:${s}`;
}

/** Put `message` in a status line (role=status announces it). */
export function say(element, message, kind = "") {
  element.textContent = message;
  element.dataset.kind = kind;
}
