// Images: /v1/images/generations with the images in the answer (b64_json), shown in a gallery for this
// visit. Cancel aborts the request; the server stops between denoising steps.

import { fillSelect, getJSON, models, modelsFor, request, say } from "./api.js";

const $ = (id) => document.getElementById(id);
let controller = null;

async function fillModels() {
  const names = modelsFor(await models(), "image").map((m) => m.name);
  fillSelect($("images-model"), names, "localai-aio.image-model");
  $("images-none").hidden = names.length > 0;
  $("images-form").hidden = names.length === 0;
  if (!names.length) {
    try {
      const entries = (await getJSON("/models/available")).filter((e) => e.usecases.includes("image"));
      $("images-candidates").textContent = entries.length
        ? `Gallery entries that generate images: ${entries.map((e) => e.name).join(", ")}.`
        : "This server's gallery has no image entry yet.";
    } catch {
      $("images-candidates").textContent = "";
    }
  }
}

function addImage(src, prompt, caption) {
  const item = document.createElement("li");
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = prompt;
  img.loading = "lazy";
  const text = document.createElement("figcaption");
  text.textContent = caption;
  const link = document.createElement("a");
  link.href = src;
  link.download = "image.png";
  link.textContent = "Download";
  text.append(" ", link);
  figure.append(img, text);
  item.append(figure);
  $("images-gallery").prepend(item);
}

async function generate(event) {
  event.preventDefault();
  if (controller) return;
  const prompt = $("images-prompt").value.trim();
  if (!prompt) return;
  const body = { model: $("images-model").value, prompt, size: $("images-size").value, response_format: "b64_json" };
  const steps = parseInt($("images-steps").value, 10);
  if (Number.isFinite(steps) && steps > 0) body.step = steps;
  controller = new AbortController();
  $("images-go").hidden = true;
  $("images-stop").hidden = false;
  say($("images-status"), "Generating… (minutes on a CPU)");
  const started = performance.now();
  try {
    const answer = await (await request("/v1/images/generations", { method: "POST", json: body,
      signal: controller.signal })).json();
    const took = ((performance.now() - started) / 1000).toFixed(1);
    for (const image of answer.data) {
      addImage(`data:image/png;base64,${image.b64_json}`, prompt,
        `${prompt} · ${body.size}${body.step ? ` · ${body.step} steps` : ""} · ${took} s`);
    }
    say($("images-status"), `Done in ${took} s.`);
  } catch (err) {
    say($("images-status"), err.name === "AbortError" ? "Cancelled." : `Generation failed: ${err.message}`,
      err.name === "AbortError" ? "" : "error");
  } finally {
    controller = null;
    $("images-go").hidden = false;
    $("images-stop").hidden = true;
  }
}

export async function init() {
  $("images-form").addEventListener("submit", generate);
  $("images-stop").addEventListener("click", () => controller?.abort());
  await fillModels();
}

export async function show() {
  await fillModels();
}
