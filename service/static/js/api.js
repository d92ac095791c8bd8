// Requests to this server. When it wants an API key (401), or an admin key for a write (403), the
// page asks for one, keeps it in sessionStorage (this tab only) and sends it as
// `Authorization: Bearer ...` on every request from then on.
import { $ } from "./dom.js";

const KEY_STORAGE = "lookalike.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key lives as long as this page */
  }
  $("#forget-key").hidden = !key;
}

const PROMPTS = {
  key: {
    title: "API key required",
    text: "This server needs an API key. It is kept for this tab only (session storage) and sent with every request.",
    label: "API key",
  },
  admin: {
    title: "Admin key required",
    text: "This change needs an admin key (the server sets LOOKALIKE_ADMIN_KEYS). It replaces the key this tab uses, for this tab only.",
    label: "API key",
  },
};

let keyPrompt = null;

// The key dialog; resolves once a key is entered, rejects when the person cancels.
function askForKey(message, kind = "key") {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve, reject) => {
    const dialog = $("#key-dialog");
    const form = $("#key-form");
    const input = $("#key-input");
    $("#key-title").textContent = PROMPTS[kind].title;
    $("#key-text").textContent = PROMPTS[kind].text;
    $("#key-error").textContent = message || "";
    input.value = "";
    const finish = (accepted) => {
      form.removeEventListener("submit", onSubmit);
      $("#key-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      keyPrompt = null;
      if (accepted) resolve();
      else if (kind === "admin") reject(new ApiError(403, "This change needs an admin key."));
      else reject(new ApiError(401, "This server needs an API key."));
    };
    const onSubmit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) {
        $("#key-error").textContent = "Enter a key.";
        return;
      }
      setKey(key);
      finish(true);
    };
    const onCancel = (event) => {
      event.preventDefault();
      finish(false);
    };
    form.addEventListener("submit", onSubmit);
    $("#key-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    input.focus();
  });
  return keyPrompt;
}

const WRITE_METHODS = new Set(["POST", "PUT", "PATCH", "DELETE"]);

// fetch() with the stored key; on 401 ask for a key, on a write's 403 for an admin key, and try again.
export async function request(url, options = {}) {
  for (;;) {
    const key = getKey();
    const headers = new Headers(options.headers || {});
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(url, { ...options, headers });
    } catch {
      throw new ApiError(0, "The server cannot be reached.");
    }
    const method = (options.method || "GET").toUpperCase();
    if (response.status === 403 && WRITE_METHODS.has(method) && key && (await needsAdmin(response))) {
      // An ordinary key on a write route: ask for an admin key; the ordinary one stays until then.
      if (getKey() === key) await askForKey("", "admin");
      else if (keyPrompt) await keyPrompt;
      continue;
    }
    if (response.status !== 401) return response;
    if (getKey() === key) {
      // This key (or none) was refused: a refused key is not kept, even while the prompt is open.
      if (key) setKey("");
      await askForKey(key ? "That key was not accepted; enter another one." : "");
    } else if (keyPrompt) {
      // Another request found the same key refused and is already asking for a new one.
      await keyPrompt;
    }
    // Otherwise another request has already replaced the key this one was refused with.
  }
}

async function needsAdmin(response) {
  try {
    const body = await response.clone().json();
    return typeof body.detail === "string" && body.detail.includes("admin key");
  } catch {
    return false;
  }
}

export async function errorMessage(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  } catch {
    /* not JSON */
  }
  return `${response.status} ${response.statusText}`.trim();
}

// The JSON answer of a request, or an ApiError with the server's message.
export async function api(url, options) {
  const response = await request(url, options);
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  if (response.status === 204) return null;
  return response.json();
}

// A JSON body: api("/heads/x/examples", json("PUT", {...})).
export function json(method, body) {
  return { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

// The answer, or `fallback` when the server says 404 (a head without examples, not trained yet...).
export async function apiOr404(url, fallback = null) {
  try {
    return await api(url);
  } catch (error) {
    if (error.status === 404) return fallback;
    throw error;
  }
}

export const headUrl = (name, rest = "") => `/heads/${encodeURIComponent(name)}${rest}`;
