// Model output as Markdown: marked parses it, highlight.js colours code blocks, and DOMPurify sanitises
// the HTML before it reaches the page (model output is untrusted: no script, no event handlers, no
// forms, no styles; links open in a new tab without a referrer; the page's CSP blocks remote images).

import { Marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";
import hljs from "../vendor/highlight.js/core.min.js";
import bash from "../vendor/highlight.js/languages/bash.min.js";
import c from "../vendor/highlight.js/languages/c.min.js";
import cpp from "../vendor/highlight.js/languages/cpp.min.js";
import css from "../vendor/highlight.js/languages/css.min.js";
import diff from "../vendor/highlight.js/languages/diff.min.js";
import go from "../vendor/highlight.js/languages/go.min.js";
import java from "../vendor/highlight.js/languages/java.min.js";
import javascript from "../vendor/highlight.js/languages/javascript.min.js";
import json from "../vendor/highlight.js/languages/json.min.js";
import markdown from "../vendor/highlight.js/languages/markdown.min.js";
import python from "../vendor/highlight.js/languages/python.min.js";
import rust from "../vendor/highlight.js/languages/rust.min.js";
import shell from "../vendor/highlight.js/languages/shell.min.js";
import sql from "../vendor/highlight.js/languages/sql.min.js";
import typescript from "../vendor/highlight.js/languages/typescript.min.js";
import xml from "../vendor/highlight.js/languages/xml.min.js";
import yaml from "../vendor/highlight.js/languages/yaml.min.js";

const LANGUAGES = { bash, c, cpp, css, diff, go, java, javascript, json, markdown, python, rust, shell, sql,
  typescript, xml, yaml };
for (const [name, grammar] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, grammar);

function escapeHTML(text) {
  return text.replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[ch]);
}

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    code({ text, lang }) {
      const language = (lang || "").trim().split(/\s+/)[0].toLowerCase();
      const known = language && hljs.getLanguage(language);
      const body = known ? hljs.highlight(text, { language, ignoreIllegals: true }).value : escapeHTML(text);
      const label = known ? ` language-${escapeHTML(language)}` : "";
      return `<pre><code class="hljs${label}">${body}</code></pre>\n`;
    },
  },
});

const purify = DOMPurify(window);
purify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
  if (node.tagName === "IMG") {
    const src = node.getAttribute("src") || "";
    if (!src.startsWith("data:image/")) { // a remote image would be a request to another host
      node.removeAttribute("src");
      node.setAttribute("data-blocked", "remote image");
    }
  }
});
const POLICY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "iframe", "object",
    "embed", "video", "audio", "source", "link", "meta", "base"],
  FORBID_ATTR: ["style", "id", "name", "srcset"],
};

/** Sanitised HTML for `text` (Markdown). */
export function renderMarkdown(text) {
  return purify.sanitize(marked.parse(text || ""), POLICY);
}

/** Render `text` into `element`, replacing what it held. */
export function renderInto(element, text) {
  element.innerHTML = renderMarkdown(text);
}
