// The chat page: streams answers from /v1/chat/completions (server-sent events) and keeps the history.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null, busy: false };
const store = window.localStorage;

function setBusy(busy) {
  state.busy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "assistant") body.innerHTML = window.renderMarkdown(text);
  else body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const maxTokens = parseInt($("max-tokens").value, 10);
  const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true },
                 temperature: parseFloat($("temperature").value) };
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let k;
    while ((k = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, k);
      buf = buf.slice(k + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  if (state.busy || !text.trim() || !state.model) return;
  state.history.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  bubble.parentElement.classList.add("streaming");
  setBusy(true);
  state.controller = new AbortController();
  let answer = "", reasoning = "", thinking = null, answerEl = null;
  const started = performance.now();
  let firstAt = null, tokens = 0;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || ("HTTP " + response.status));
    }
    for await (const data of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.reasoning_content) {  // Qwen3 thinking: a collapsible block above the answer
        if (firstAt === null) firstAt = performance.now();
        if (!thinking) {
          thinking = document.createElement("details");
          thinking.className = "thinking";
          thinking.open = true;
          thinking.innerHTML = "<summary>Thinking</summary><div class=\"thought\"></div>";
          bubble.prepend(thinking);
        }
        reasoning += delta.reasoning_content;
        thinking.querySelector(".thought").textContent = reasoning;
      }
      if (delta && delta.content) {
        if (firstAt === null) firstAt = performance.now();
        if (!answerEl) {
          answerEl = document.createElement("div");
          bubble.appendChild(answerEl);
          if (thinking) thinking.open = false;
        }
        answer += delta.content;
        answerEl.innerHTML = window.renderMarkdown(answer);
        bubble.parentElement.scrollIntoView({ block: "end" });
      }
    }
    showStats(started, firstAt, tokens);
  } catch (e) {
    if (e.name !== "AbortError") {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = e.message;
      bubble.appendChild(err);
    }
  } finally {
    bubble.parentElement.classList.remove("streaming");
    if (answer) state.history.push({ role: "assistant", content: answer });
    else if (state.history.length && state.history[state.history.length - 1].role === "user") state.history.pop();
    state.controller = null;
    setBusy(false);
    $("input").focus();
  }
}

function showStats(started, firstAt, tokens) {
  if (firstAt === null) return;
  const total = (performance.now() - started) / 1000;
  const ttft = (firstAt - started) / 1000;
  const rate = tokens && total > ttft ? (tokens / (total - ttft)).toFixed(1) + " tok/s" : "";
  $("stats").textContent = `first token ${ttft.toFixed(2)} s · ${tokens} tokens ${rate}`;
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").innerHTML = "";
  $("stats").textContent = "";
  $("input").focus();
}

function bindSetting(id, key) {
  const el = $(id);
  const saved = store.getItem(key);
  if (saved !== null) el.value = saved;
  el.addEventListener("input", () => store.setItem(key, el.value));
}

async function init() {
  try {
    const cfg = await (await fetch("/web-config.json")).json();
    state.model = cfg.model;
    $("model-name").textContent = cfg.model;
    if (cfg.defaults && cfg.defaults.temperature !== undefined) $("temperature").value = cfg.defaults.temperature;
    if (cfg.max_tokens) $("max-tokens").max = cfg.max_tokens;
    $("key-box").hidden = !cfg.auth;
  } catch (e) {
    $("model-name").textContent = "server unreachable";
  }
  bindSetting("system", "qianwen.system");
  bindSetting("temperature", "qianwen.temperature");
  bindSetting("max-tokens", "qianwen.max_tokens");
  bindSetting("api-key", "qianwen.api_key");
  const showTemp = () => { $("temperature-value").textContent = $("temperature").value; };
  $("temperature").addEventListener("input", showTemp);
  showTemp();

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    // Enter sends, except while an input method is composing (Chinese, Japanese, ...) or with Shift
    if (e.key !== "Enter" || e.shiftKey || e.isComposing || e.keyCode === 229) return;
    e.preventDefault();
    $("composer").requestSubmit();
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  $("input").focus();
}

init();
