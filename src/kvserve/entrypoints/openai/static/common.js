// What both pages share: their header, the API key (asked for once, when the server answers 401, and
// kept in this browser's local storage; `authorizedFetch` sends it with everything that carries data),
// and reading a server-sent-event stream from a fetch() response.
"use strict";

// The header (title, links to both pages, a `#model` line) and the hidden key dialog, built before the page's script runs.
(function buildChrome() {
  const make = (tag, props, children) => {
    const el = Object.assign(document.createElement(tag), props || {});
    el.append(...(children || []));
    return el;
  };
  const header = make("header", {}, [
    make("h1", {textContent: "kvserve"}),
    make("nav", {}, [make("a", {href: "/", textContent: "Chat"}), make("a", {href: "/dashboard", textContent: "Dashboard"})]),
    make("span", {className: "model", id: "model", textContent: "connecting…"}),
  ]);
  const dialog = make("div", {id: "key-dialog", className: "hidden"}, [
    make("form", {id: "key-form"}, [
      make("b", {textContent: "API key"}),
      make("span", {id: "key-message", className: "muted"}),
      make("input", {id: "key-input", type: "password", autocomplete: "off", placeholder: "the server's --api-key"}),
      make("button", {className: "primary", type: "submit", textContent: "Save"}),
    ]),
  ]);
  document.body.prepend(header);
  document.body.append(dialog);
})();

const KEY_STORAGE = "kvserve.apiKey";

function apiHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

// Ask for the key in the page's dialog; resolves once it is saved.
function askForKey(message) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-message").textContent = message;
  dialog.classList.remove("hidden");
  input.value = "";
  input.focus();
  return new Promise((resolve) => {
    document.getElementById("key-form").onsubmit = (event) => {
      event.preventDefault();
      localStorage.setItem(KEY_STORAGE, input.value.trim());
      dialog.classList.add("hidden");
      resolve();
    };
  });
}

// fetch() with the key; on 401 asks for it (again) and retries, until the server accepts it.
async function authorizedFetch(url, options) {
  for (;;) {
    const opts = Object.assign({}, options || {});
    opts.headers = apiHeaders(opts.headers);
    const response = await fetch(url, opts);
    if (response.status !== 401) return response;
    const had = localStorage.getItem(KEY_STORAGE);
    await askForKey(had ? "The server refused this API key; enter it again." : "This server needs an API key (--api-key).");
  }
}

// Server-sent events from a fetch() response: calls onData(parsed JSON) for each `data:` line, until the
// stream ends or sends [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      onData(JSON.parse(data));
    }
  }
}
