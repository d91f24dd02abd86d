// The message list (every mailbox on a test host; one's own in site mode),
// search in Mailpit's syntax, and the message view with its tabs.

import { $, el, clear, text, address, addresses, size, when } from "./dom.js";
import { call, get, segment, guarded, sameOrigin, ApiError } from "./api.js";

const PAGE = 50;
const MOST = 1000; // the server's default web.max_page

const state = { query: "", shown: 0, total: 0, open: null, opening: 0, loaded: {} };

function listPath(start, limit) {
  const paging = `start=${start}&limit=${limit}`;
  return state.query
    ? `/api/v1/search?query=${encodeURIComponent(state.query)}&${paging}`
    : `/api/v1/messages?${paging}`;
}

function row(message) {
  const id = String(message.ID);
  const item = el("li", {
    class: message.Read ? "message" : "message unread",
    tabindex: 0, role: "button", dataset: { id },
    "aria-current": state.open === id ? "true" : false,
  },
  el("span", { class: "from" }, address(message.From) || "(no sender)"),
  el("span", { class: "created" }, when(message.Created)),
  el("span", { class: "subject" }, message.Subject || "(no subject)"),
  el("span", { class: "size" }, message.Attachments
    ? `${message.Attachments} file${message.Attachments === 1 ? "" : "s"} · ${size(message.Size)}` : size(message.Size)),
  el("span", { class: "snippet" }, message.Snippet || ""),
  el("span", { class: "to" }, `to ${addresses(message.To)}`));
  item.addEventListener("click", () => openReported(id));
  item.addEventListener("keydown", (event) => { if (event.key === "Enter") openReported(id); });
  return item;
}

function status(page) {
  const what = state.query ? `matching “${state.query}”` : "";
  const unread = page.unread ? `, ${page.unread} unread` : "";
  const of = page.messages_count ?? page.total;
  return `${of} message${of === 1 ? "" : "s"} ${what}${unread}`.replace(/\s+,/, ",");
}

// Reloads the first `shown` messages (at least a page): the live updates and
// the search call it, so what is on screen is what the server has now.
export async function refreshList() {
  const limit = Math.min(MOST, Math.max(PAGE, state.shown));
  const page = await get(listPath(0, limit));
  const list = clear($("message-list"));
  for (const message of page.messages || []) list.append(row(message));
  state.shown = (page.messages || []).length;
  state.total = page.messages_count ?? page.total ?? state.shown;
  text($("list-status"), status(page));
  $("more").hidden = state.shown >= state.total;
}

async function more() {
  const page = await get(listPath(state.shown, PAGE));
  for (const message of page.messages || []) $("message-list").append(row(message));
  state.shown += (page.messages || []).length;
  $("more").hidden = state.shown >= state.total || !(page.messages || []).length;
}

function meta(message) {
  const list = clear($("mv-meta"));
  const field = (name, value) => value && list.append(el("dt", {}, name), el("dd", {}, value));
  field("From", address(message.From));
  field("To", addresses(message.To));
  field("Cc", addresses(message.Cc));
  field("Reply-To", addresses(message.ReplyTo));
  field("Date", when(message.Date || message.Created));
  field("Size", size(message.Size));
}

function attachments(message) {
  const parts = message.Attachments || [];
  const list = clear($("mv-attachments"));
  for (const part of parts) {
    const href = sameOrigin(`/api/v1/message/${segment(message.ID)}/part/${segment(part.PartID)}`);
    list.append(el("li", {},
      el("a", { href, download: part.FileName || `part-${part.PartID}` }, part.FileName || `part ${part.PartID}`),
      ` ${part.ContentType || ""} ${size(part.Size)}`));
  }
  $("mv-attachments-box").hidden = parts.length === 0;
}

// A fresh copy of the page's own sandboxed frame for each message: the
// sandbox attribute comes from the page's markup, never from app code, and
// a new frame leaves no history entries behind.
function preview(message) {
  const old = $("mv-frame");
  const frame = old.cloneNode(false);
  const hasHtml = Boolean(message.HTML);
  if (hasHtml) frame.setAttribute("src", sameOrigin(`/view/${segment(message.ID)}.html`));
  frame.hidden = !hasHtml;
  old.replaceWith(frame);
  $("mv-no-html").hidden = hasHtml;
  return hasHtml;
}

const openReported = guarded((id) => openMessage(id));

export async function openMessage(id) {
  const ticket = ++state.opening;
  const message = await get(`/api/v1/message/${segment(id)}`);
  if (ticket !== state.opening) return; // another message was opened meanwhile
  state.open = String(message.ID);
  state.loaded = {};
  for (const item of $("message-list").children) {
    if (item.dataset.id === state.open) item.setAttribute("aria-current", "true");
    else item.removeAttribute("aria-current");
  }
  text($("mv-subject"), message.Subject || "(no subject)");
  meta(message);
  attachments(message);
  text($("tab-text"), message.Text || "");
  clear($("mv-headers"));
  text($("tab-raw"), "");
  const hasHtml = preview(message);
  $("message-view").hidden = false;
  await showTab(hasHtml ? "html" : "text");
}

async function showTab(name) {
  for (const button of document.querySelectorAll("[data-tab]")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const tab of ["html", "text", "headers", "raw"]) $(`tab-${tab}`).hidden = tab !== name;
  const id = state.open;
  if (!id || state.loaded[name]) return;
  state.loaded[name] = true;
  if (name === "headers") {
    const headers = await get(`/api/v1/message/${segment(id)}/headers`);
    if (id !== state.open) return;
    const body = clear($("mv-headers"));
    for (const [header, values] of Object.entries(headers || {})) {
      for (const value of [].concat(values)) body.append(el("tr", {}, el("th", {}, header), el("td", {}, value)));
    }
  } else if (name === "raw") {
    const raw = await call("GET", `/api/v1/message/${segment(id)}/raw`);
    if (id === state.open) text($("tab-raw"), raw);
  }
}

function closeMessage() {
  state.open = null;
  state.opening++;
  $("message-view").hidden = true;
  const frame = $("mv-frame");
  const blank = frame.cloneNode(false);
  blank.removeAttribute("src");
  frame.replaceWith(blank);
}

async function deleteOpen() {
  if (!state.open) return;
  await call("DELETE", "/api/v1/messages", { IDs: [state.open] });
  closeMessage();
  await refreshList();
}

async function purge() {
  const what = state.query ? "every message (not only the ones found)" : "every message";
  if (!window.confirm(`Delete ${what}?`)) return;
  await call("DELETE", "/api/v1/messages");
  closeMessage();
  await refreshList();
}

// What a live event means for this panel.
export function onEvent(kind, data) {
  if (kind === "message.deleted" && state.open) {
    const ids = (data && data.IDs) || [];
    if (ids.length === 0 || ids.map(String).includes(state.open)) {
      // Deleted elsewhere (or a purge): the view would show a ghost.
      get(`/api/v1/message/${segment(state.open)}`).catch((error) => {
        if (error instanceof ApiError && error.status === 404) closeMessage();
      });
    }
  }
}

export function setup() {
  $("search-form").addEventListener("submit", guarded(async (event) => {
    event.preventDefault();
    state.query = $("search").value.trim();
    state.shown = 0;
    await refreshList();
  }));
  $("search-clear").addEventListener("click", guarded(async () => {
    $("search").value = "";
    state.query = "";
    state.shown = 0;
    await refreshList();
  }));
  $("more").addEventListener("click", guarded(more));
  $("purge").addEventListener("click", guarded(purge));
  $("mark-read").addEventListener("click", guarded(async () => {
    await call("PUT", "/api/v1/messages", { Read: true });
    await refreshList();
  }));
  $("mv-delete").addEventListener("click", guarded(deleteOpen));
  $("mv-close").addEventListener("click", closeMessage);
  for (const button of document.querySelectorAll("[data-tab]")) {
    button.addEventListener("click", guarded(() => showTab(button.dataset.tab)));
  }
}
