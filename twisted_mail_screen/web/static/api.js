// The server's JSON API, same origin only. A changing request with a body
// says it is JSON: the server's CSRF guard refuses any other body.

import { $ } from "./dom.js";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// An absolute URL on this origin. A page opened with user:password@ in its
// address has them in its base URL too, and fetch() refuses a URL made from
// it; location.origin never carries them (the browser keeps sending the
// Basic credentials it was given).
export const sameOrigin = (path) => new URL(path, location.origin).href;

export async function call(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(sameOrigin(path), init);
  const type = response.headers.get("Content-Type") || "";
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    if (type.startsWith("application/json")) {
      try { message = (await response.json()).Error || message; } catch { /* keep the status */ }
    }
    throw new ApiError(response.status, message);
  }
  if (response.status === 204) return null;
  if (type.startsWith("application/json")) return response.json();
  return response.text();
}

export const get = (path) => call("GET", path);

// A path segment: "/" in a network address becomes %2F.
export const segment = (value) => encodeURIComponent(String(value));

export function showError(error) {
  const box = $("error");
  box.textContent = error instanceof Error ? error.message : String(error);
  box.hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

// Runs an action from a button, reporting its failure instead of losing it.
export function guarded(action) {
  return async (...args) => {
    try {
      await action(...args);
    } catch (error) {
      showError(error);
    }
  };
}
