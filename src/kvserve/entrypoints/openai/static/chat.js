// The chat page: streams answers from /v1/chat/completions, keeps the conversation in local storage.
"use strict";

const STORAGE = "kvserve.chat";
const $ = (id) => document.getElementById(id);
const state = loadState();
let model = null;
let running = null;  // {controller, message} while an answer streams

function loadState() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORAGE));
    if (saved && Array.isArray(saved.messages)) return saved;
  } catch (e) { /* a broken entry starts a new conversation */ }
  return {messages: [], settings: {}};
}

function save() {
  state.settings = {system: $("system").value, temperature: $("temperature").value, top_p: $("top-p").value,
                    max_tokens: $("max-tokens").value};
  localStorage.setItem(STORAGE, JSON.stringify(state));
}

function restoreSettings() {
  const s = state.settings || {};
  if (s.system !== undefined) $("system").value = s.system;
  if (s.temperature !== undefined) $("temperature").value = s.temperature;
  if (s.top_p !== undefined) $("top-p").value = s.top_p;
  if (s.max_tokens !== undefined) $("max-tokens").value = s.max_tokens;
}

function metaText(m) {
  if (!m.stats) return "";
  const s = m.stats;
  const parts = [];
  if (s.prompt_tokens !== undefined) parts.push(`${s.prompt_tokens} prompt tokens`);
  parts.push(`${s.completion_tokens} tokens`);
  if (s.tokens_per_s) parts.push(`${s.tokens_per_s.toFixed(1)} tok/s`);
  if (s.ttft_s !== undefined) parts.push(`first token ${(s.ttft_s * 1000).toFixed(0)} ms`);
  if (s.finish_reason) parts.push(s.finish_reason === "abort" ? "stopped" : `finish: ${s.finish_reason}`);
  return parts.join(" · ");
}

function addMessageElement(m) {
  const el = document.createElement("div");
  el.className = `msg ${m.role}` + (m.error ? " error" : "");
  const content = document.createElement("div");
  content.className = "content";
  el.appendChild(content);
  if (m.role === "assistant") {
    const meta = document.createElement("div");
    meta.className = "meta";
    const stats = document.createElement("span");
    stats.className = "stats";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.onclick = () => copyText(m.content, copy);
    meta.append(stats, copy);
    el.appendChild(meta);
  }
  $("messages").appendChild(el);
  updateMessageElement(el, m);
  return el;
}

function updateMessageElement(el, m) {
  const content = el.querySelector(".content");
  if (m.role === "assistant" && !m.error) renderMarkdown(m.content, content); else content.textContent = m.content;
  const stats = el.querySelector(".stats");
  if (stats) stats.textContent = metaText(m);
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard permission (plain http on another host): select-and-copy instead
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1200);
}

function render() {
  $("messages").replaceChildren();
  for (const m of state.messages) addMessageElement(m);
}

async function loadModel() {
  const response = await authorizedFetch("/v1/models");
  const body = await response.json();
  model = body.data[0].id;
  $("model").textContent = `${model} · context ${body.data[0].max_model_len} tokens`;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  for (const m of state.messages) if (!m.error) messages.push({role: m.role, content: m.content});
  return {
    model, messages, stream: true, stream_options: {include_usage: true},
    temperature: Number($("temperature").value), top_p: Number($("top-p").value), max_tokens: Number($("max-tokens").value),
  };
}

async function send(text) {
  if (!model) await loadModel();
  state.messages.push({role: "user", content: text});
  addMessageElement(state.messages[state.messages.length - 1]);
  const answer = {role: "assistant", content: "", stats: {completion_tokens: 0}};
  state.messages.push(answer);
  const el = addMessageElement(answer);
  el.classList.add("streaming");
  const controller = new AbortController();
  running = {controller, answer};
  setRunning(true);
  const started = performance.now();
  let firstToken = null;
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; updateMessageElement(el, answer); });
  };
  try {
    const response = await authorizedFetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `HTTP ${response.status}`);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (firstToken === null) { firstToken = performance.now(); answer.stats.ttft_s = (firstToken - started) / 1000; }
          answer.content += delta;
          answer.stats.completion_tokens += 1;
        }
        if (choice.finish_reason) answer.stats.finish_reason = choice.finish_reason;
      }
      if (chunk.usage) {
        answer.stats.prompt_tokens = chunk.usage.prompt_tokens;
        answer.stats.completion_tokens = chunk.usage.completion_tokens;
      }
      redraw();
    });
  } catch (error) {
    if (controller.signal.aborted) {
      answer.stats.finish_reason = "abort";
    } else {
      answer.error = true;
      answer.content = `Error: ${error.message}`;
      el.classList.add("error");
    }
  }
  if (firstToken !== null && answer.stats.completion_tokens > 1) {
    answer.stats.tokens_per_s = (answer.stats.completion_tokens - 1) / ((performance.now() - firstToken) / 1000);
  }
  el.classList.remove("streaming");
  el.classList.add("done");
  updateMessageElement(el, answer);
  running = null;
  setRunning(false);
  save();
}

function setRunning(on) {
  $("send").classList.toggle("hidden", on);
  $("stop").classList.toggle("hidden", !on);
  $("input").disabled = on;
}

function init() {
  restoreSettings();
  render();
  for (const id of ["system", "temperature", "top-p", "max-tokens"]) $(id).addEventListener("change", save);
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || running) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (running) running.controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (running) running.controller.abort();
    state.messages = [];
    save();
    render();
  });
  loadModel().catch((error) => { $("model").textContent = `cannot reach the server: ${error.message}`; });
}

init();
