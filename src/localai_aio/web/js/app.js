// The single page: hash routes (#/chat, #/speech, #/transcribe, #/images, #/models), each page's module
// loaded the first time it is shown, so the first load fetches only what the first page needs.

import { APIError, apiKey, forgetKey, models } from "./api.js";

const PAGES = {
  chat: () => import("./chat.js"),
  speech: () => import("./speech.js"),
  transcribe: () => import("./transcribe.js"),
  images: () => import("./images.js"),
  models: () => import("./models.js"),
};
const started = {};
let first = true;

function pageName() {
  const name = location.hash.replace(/^#\/?/, "").split(/[/?]/)[0];
  return name in PAGES ? name : "chat";
}

async function route() {
  const name = pageName();
  for (const section of document.querySelectorAll("[data-page]")) section.hidden = section.dataset.page !== name;
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const title = document.getElementById(`${name}-title`);
  document.title = `${title.textContent} · localai_aio`;
  if (!first) title.focus(); // a screen reader hears where it is; the first load keeps the page's focus
  first = false;
  const section = document.getElementById(`page-${name}`);
  try {
    const module = await PAGES[name]();
    if (!started[name]) {
      started[name] = true;
      await module.init();
    } else if (module.show) {
      await module.show();
    }
    section.dataset.ready = "true";
  } catch (err) {
    const status = section.querySelector("[role=status]");
    if (status) {
      status.textContent = err instanceof APIError ? err.message : `The page failed to start: ${err.message}`;
      status.dataset.kind = "error";
    }
    started[name] = false;
    console.error(err);
  }
}

document.getElementById("key-forget").hidden = !apiKey();
document.getElementById("key-forget").addEventListener("click", () => {
  forgetKey();
  location.reload();
});
window.addEventListener("hashchange", route);
models().catch(() => {}); // asks for a key at once when the server needs one
route();
