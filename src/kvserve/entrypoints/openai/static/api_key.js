// The API key, asked for once (when the server answers 401) and kept in this browser's local storage.
// Both pages call `authorizedFetch` for everything that carries data.
"use strict";

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
