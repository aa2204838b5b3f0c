// Transcribe: a file, or a recording from the microphone (MediaRecorder, webm), sent to
// /v1/audio/transcriptions as verbose_json with segment timestamps.

import { fillSelect, formatSeconds, models, modelsFor, request, say } from "./api.js";

const $ = (id) => document.getElementById(id);
let recorder = null;
let recorded = null;
let previewURL = null;

async function fillModels() {
  const names = modelsFor(await models(), "transcript").map((m) => m.name);
  fillSelect($("transcribe-model"), names, "localai-aio.transcribe-model");
  $("transcribe-go").disabled = names.length === 0;
  if (!names.length) say($("transcribe-status"), "No transcription model is installed: see the Models page.", "error");
}

function preview(blob) {
  if (previewURL) URL.revokeObjectURL(previewURL);
  previewURL = URL.createObjectURL(blob);
  $("transcribe-preview").src = previewURL;
  $("transcribe-preview").hidden = false;
}

async function toggleRecording() {
  const button = $("transcribe-record");
  if (recorder) {
    recorder.stop();
    return;
  }
  if (!navigator.mediaDevices?.getUserMedia || !window.MediaRecorder) {
    say($("transcribe-status"), "This browser cannot record here (a microphone needs https or localhost).", "error");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    say($("transcribe-status"), `No microphone: ${err.message}`, "error");
    return;
  }
  const type = MediaRecorder.isTypeSupported("audio/webm;codecs=opus") ? "audio/webm;codecs=opus" : "audio/webm";
  const parts = [];
  recorder = new MediaRecorder(stream, MediaRecorder.isTypeSupported(type) ? { mimeType: type } : {});
  recorder.addEventListener("dataavailable", (event) => parts.push(event.data));
  recorder.addEventListener("stop", () => {
    stream.getTracks().forEach((track) => track.stop());
    recorded = new Blob(parts, { type: recorder.mimeType || "audio/webm" });
    recorder = null;
    $("transcribe-file").value = "";
    preview(recorded);
    button.textContent = "Record from the microphone";
    button.setAttribute("aria-pressed", "false");
    say($("transcribe-status"), `Recorded ${(recorded.size / 1024).toFixed(0)} KB: press Transcribe.`);
  });
  recorder.start();
  button.textContent = "Stop recording";
  button.setAttribute("aria-pressed", "true");
  say($("transcribe-status"), "Recording… press Stop recording when done.");
}

function showResult(body) {
  $("transcribe-text").textContent = body.text || "";
  const rows = (body.segments || []).map((segment) => {
    const row = document.createElement("tr");
    for (const value of [formatSeconds(segment.start), formatSeconds(segment.end), segment.text.trim()]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    return row;
  });
  $("transcribe-segments").tBodies[0].replaceChildren(...rows);
  $("transcribe-result").hidden = false;
}

async function transcribe(event) {
  event.preventDefault();
  const file = $("transcribe-file").files[0];
  const audio = file || recorded;
  if (!audio) {
    say($("transcribe-status"), "Choose a file or record something first.", "error");
    return;
  }
  const form = new FormData();
  form.append("file", audio, file ? file.name : "recording.webm");
  form.append("model", $("transcribe-model").value);
  form.append("response_format", "verbose_json");
  form.append("timestamp_granularities[]", "segment");
  const language = $("transcribe-language").value.trim();
  if (language) form.append("language", language);
  const section = $("page-transcribe");
  section.dataset.state = "working";
  $("transcribe-go").disabled = true;
  say($("transcribe-status"), "Transcribing…");
  const started = performance.now();
  try {
    const body = await (await request("/v1/audio/transcriptions", { method: "POST", body: form })).json();
    showResult(body);
    section.dataset.state = "done";
    const took = ((performance.now() - started) / 1000).toFixed(2);
    say($("transcribe-status"), `Done in ${took} s${body.duration ? ` for ${body.duration.toFixed(1)} s of audio` : ""}${body.language ? ` (${body.language})` : ""}.`);
  } catch (err) {
    section.dataset.state = "error";
    say($("transcribe-status"), `Transcription failed: ${err.message}`, "error");
  } finally {
    $("transcribe-go").disabled = false;
  }
}

export async function init() {
  $("transcribe-form").addEventListener("submit", transcribe);
  $("transcribe-record").addEventListener("click", toggleRecording);
  $("transcribe-file").addEventListener("change", () => {
    const file = $("transcribe-file").files[0];
    if (file) {
      recorded = null;
      preview(file);
    }
  });
  await fillModels();
}

export async function show() {
  await fillModels();
}
