// Speech: /v1/audio/speech, played as it streams. The server sends a sentence's audio as soon as it is
// made; MP3 is appended to a MediaSource where the browser can (playback starts with the first
// sentence), other formats play from a blob once complete. Either way the audio can be downloaded.

import { getJSON, request, say } from "./api.js";

const $ = (id) => document.getElementById(id);
const TYPES = { mp3: "audio/mpeg", wav: "audio/wav", opus: "audio/ogg", aac: "audio/aac", flac: "audio/flac" };
let controller = null;
let objectURL = null;
let downloadURL = null;

async function fillVoices() {
  const { voices } = await getJSON("/v1/voices");
  const select = $("speech-voice");
  const previous = select.value || localStorage.getItem("localai-aio.voice");
  select.replaceChildren(...voices.map((v) => {
    const label = v.labels?.voice ? `${v.name} (${v.labels.model})` : `${v.name} (default voice)`;
    const option = new Option(label, v.voice_id);
    option.dataset.model = v.labels?.model || "";
    return option;
  }));
  if (voices.some((v) => v.voice_id === previous)) select.value = previous;
  select.disabled = voices.length === 0;
  $("speech-go").disabled = voices.length === 0;
  if (!voices.length) say($("speech-status"), "No voice is installed: see the Models page.", "error");
}

function appendTo(buffer, chunk) {
  return new Promise((resolve, reject) => {
    buffer.addEventListener("updateend", resolve, { once: true });
    buffer.addEventListener("error", () => reject(new Error("the browser could not decode the audio")),
      { once: true });
    buffer.appendBuffer(chunk);
  });
}

function reset(audio) {
  audio.pause();
  audio.removeAttribute("src");
  audio.load();
  for (const url of [objectURL, downloadURL]) if (url) URL.revokeObjectURL(url);
  objectURL = downloadURL = null;
  $("speech-download").hidden = true;
}

async function speak(event) {
  event.preventDefault();
  if (controller) return;
  const audio = $("speech-audio");
  const section = $("page-speech");
  const format = $("speech-format").value;
  const voice = $("speech-voice").selectedOptions[0];
  const text = $("speech-text").value.trim();
  if (!voice || !text) return;
  localStorage.setItem("localai-aio.voice", voice.value);
  reset(audio);
  controller = new AbortController();
  $("speech-go").hidden = true;
  $("speech-stop").hidden = false;
  section.dataset.state = "streaming";
  say($("speech-status"), "Synthesizing…");
  const chunks = [];
  const started = performance.now();
  try {
    const resp = await request("/v1/audio/speech", { method: "POST", signal: controller.signal,
      json: { model: voice.dataset.model || undefined, voice: voice.value, input: text, response_format: format } });
    const reader = resp.body.getReader();
    const streamed = format === "mp3" && window.MediaSource?.isTypeSupported("audio/mpeg");
    let buffer = null;
    let source = null;
    if (streamed) {
      source = new MediaSource();
      objectURL = URL.createObjectURL(source);
      audio.src = objectURL;
      await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
      buffer = source.addSourceBuffer("audio/mpeg");
    }
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      chunks.push(value);
      if (buffer) {
        await appendTo(buffer, value);
        if (audio.paused && chunks.length === 1) {
          audio.play().catch(() => {}); // a browser that blocks autoplay leaves the play button to the user
          say($("speech-status"), `Playing as it streams (first audio after ${((performance.now() - started) / 1000).toFixed(2)} s)…`);
        }
      }
    }
    const blob = new Blob(chunks, { type: TYPES[format] || "application/octet-stream" });
    if (source) {
      source.endOfStream();
    } else {
      objectURL = URL.createObjectURL(blob);
      audio.src = objectURL;
      audio.play().catch(() => {});
    }
    downloadURL = URL.createObjectURL(blob);
    const link = $("speech-download");
    link.href = downloadURL;
    link.download = `speech.${format === "opus" ? "ogg" : format}`;
    link.textContent = `Download (${format.toUpperCase()}, ${(blob.size / 1024).toFixed(0)} KB)`;
    link.hidden = false;
    section.dataset.state = "done";
    say($("speech-status"), `Done in ${((performance.now() - started) / 1000).toFixed(2)} s.`);
  } catch (err) {
    section.dataset.state = err.name === "AbortError" ? "stopped" : "error";
    say($("speech-status"), err.name === "AbortError" ? "Stopped." : `Speech failed: ${err.message}`,
      err.name === "AbortError" ? "" : "error");
  } finally {
    controller = null;
    $("speech-go").hidden = false;
    $("speech-stop").hidden = true;
  }
}

export async function init() {
  $("speech-form").addEventListener("submit", speak);
  $("speech-stop").addEventListener("click", () => controller?.abort());
  await fillVoices();
}

export async function show() {
  await fillVoices();
}
