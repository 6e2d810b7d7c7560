// BumbleCore chat page: talks to this server's OpenAI-compatible API and keeps the conversation in
// this browser's localStorage, so every browser has its own chat and the server stores nothing.
"use strict";

const STORE = "bumblecore.chat.v1";
const KEY_STORE = "bumblecore.apiKey";
const $ = (id) => document.getElementById(id);

let state = loadState();
let modelName = null;
let abortController = null;

function loadState() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE));
    if (saved && Array.isArray(saved.messages)) return saved;
  } catch (err) { /* a damaged entry starts a new chat */ }
  return { messages: [], settings: {} };
}

function saveState() {
  state.settings = {
    system: $("system-prompt").value, temperature: $("temperature").value,
    top_p: $("top-p").value, max_tokens: $("max-tokens").value,
  };
  localStorage.setItem(STORE, JSON.stringify(state));
}

// ---------------------------------------------------------------- safe markdown
// Everything the model wrote is escaped first; only then are a few formats turned into our own tags,
// so no markup from the model ever reaches innerHTML.

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function renderInline(escaped) {
  // Code spans are kept as they are; bold and italics apply to the text between them.
  return escaped.split(/(`[^`\n]+`)/g).map((part, index) => {
    if (index % 2 === 1) return "<code>" + part.slice(1, -1) + "</code>";
    return part.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[\s(])\*([^*\s][^*\n]*)\*/g, "$1<em>$2</em>");
  }).join("");
}

function renderMarkdown(text) {
  const lines = escapeHtml(text).split("\n");
  const html = [];
  let paragraph = [], list = null;
  const closeParagraph = () => {
    if (paragraph.length) html.push("<p>" + paragraph.map(renderInline).join("<br>") + "</p>");
    paragraph = [];
  };
  const closeList = () => {
    if (list) html.push(`<${list.tag}>` + list.items.map((i) => "<li>" + renderInline(i) + "</li>").join("") + `</${list.tag}>`);
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (/^\s*```/.test(line)) { // a fenced block runs to its closing fence, or to the end while streaming
      closeParagraph(); closeList();
      const code = [];
      for (i++; i < lines.length && !/^\s*```/.test(lines[i]); i++) code.push(lines[i]);
      html.push("<pre><code>" + code.join("\n") + "</code></pre>");
      continue;
    }
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/), numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    const item = bullet || numbered;
    if (item) {
      closeParagraph();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) closeList();
      if (!list) list = { tag, items: [] };
      list.items.push(item[1]);
      continue;
    }
    closeList();
    const heading = line.match(/^#{1,6}\s+(.*)$/);
    if (heading) { closeParagraph(); html.push("<p><strong>" + renderInline(heading[1]) + "</strong></p>"); continue; }
    if (!line.trim()) { closeParagraph(); continue; }
    paragraph.push(line);
  }
  closeParagraph(); closeList();
  return html.join("");
}

// ---------------------------------------------------------------- the page

function messageElement(message) {
  const element = document.createElement("div");
  element.className = "message " + message.role;
  const role = document.createElement("span");
  role.className = "role";
  role.textContent = message.role === "user" ? "You" : message.role === "assistant" ? "Assistant" : "Error";
  const body = document.createElement("div");
  body.className = "body";
  element.append(role, body);
  fillMessage(element, message.content, message.role);
  return element;
}

function fillMessage(element, content, role) {
  const body = element.querySelector(".body");
  if (role === "assistant") body.innerHTML = renderMarkdown(content); // escaped inside renderMarkdown
  else body.textContent = content;
}

function showConversation() {
  const box = $("messages");
  box.replaceChildren(...state.messages.map(messageElement));
  box.scrollTop = box.scrollHeight;
}

function setStatus(text) { $("status").textContent = text; }

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return body.error.message;
  } catch (err) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

async function loadModelName() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) { setStatus("This server needs an API key: enter it on the left."); return; }
    const body = await response.json();
    modelName = body.data[0].id;
    $("model-name").textContent = "model: " + modelName;
    setStatus("");
  } catch (err) { setStatus("Could not reach the server: " + err.message); }
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of state.messages) if (m.role === "user" || m.role === "assistant") messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true };
  if (modelName) body.model = modelName;
  const temperature = parseFloat($("temperature").value), topP = parseFloat($("top-p").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(topP)) body.top_p = topP;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

// Reads OpenAI's server-sent events: "data: {json}" blocks separated by a blank line, then "data: [DONE]".
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finishReason = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finishReason;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finishReason;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
  }
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "" };
  const body = requestBody();
  state.messages.push(reply);
  saveState();
  showConversation();
  const box = $("messages");
  const element = box.lastElementChild;
  element.classList.add("streaming");
  $("send").disabled = true;
  $("stop").hidden = false;
  setStatus("Generating…");
  abortController = new AbortController();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: abortController.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const finishReason = await readStream(response, (delta) => {
      reply.content += delta;
      fillMessage(element, reply.content, "assistant");
      box.scrollTop = box.scrollHeight;
    });
    setStatus(finishReason === "length" ? "Stopped at the token limit." : "");
  } catch (err) {
    if (err.name === "AbortError") setStatus("Stopped.");
    else {
      if (!reply.content) state.messages.pop(); // keep the question, drop the empty reply
      state.messages.push({ role: "error", content: err.message });
      setStatus("");
    }
  } finally {
    abortController = null;
    element.classList.remove("streaming");
    $("send").disabled = false;
    $("stop").hidden = true;
    saveState();
    showConversation();
  }
}

function newChat() {
  if (abortController) abortController.abort();
  state.messages = [];
  saveState();
  showConversation();
  setStatus("");
  $("input").focus();
}

function init() {
  const s = state.settings || {};
  if (s.system !== undefined) $("system-prompt").value = s.system;
  if (s.temperature !== undefined) $("temperature").value = s.temperature;
  if (s.top_p !== undefined) $("top-p").value = s.top_p;
  if (s.max_tokens !== undefined) $("max-tokens").value = s.max_tokens;
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem(KEY_STORE, $("api-key").value.trim()); loadModelName(); });
  for (const id of ["system-prompt", "temperature", "top-p", "max-tokens"]) $(id).addEventListener("change", saveState);
  $("new-chat").addEventListener("click", newChat);
  $("stop").addEventListener("click", () => abortController && abortController.abort());
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || abortController) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    // Enter sends, but not while an input method (Chinese, Japanese ...) is composing.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  window.addEventListener("pagehide", saveState); // a reload mid-reply keeps what has arrived
  showConversation();
  loadModelName();
}

init();
