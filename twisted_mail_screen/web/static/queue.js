// The outbound queue: each message with its recipients' states, hold,
// release, delete, and flush (retry everything now).

import { $, el, clear, text, size, when } from "./dom.js";
import { call, get, segment, guarded, ApiError } from "./api.js";

function action(label, method, path, extra = {}) {
  const button = el("button", { type: "button", ...extra }, label);
  button.addEventListener("click", guarded(async () => {
    if (method === "DELETE" && !window.confirm("Delete this message from the queue, unsent?")) return;
    await call(method, path);
    await refreshQueue();
  }));
  return button;
}

export async function refreshQueue() {
  let listing;
  try {
    listing = await get("/api/v1/queue");
  } catch (error) {
    clear($("queue"));
    text($("queue-status"), error instanceof ApiError && error.status === 403
      ? "The queue is for administrators." : error.message);
    return;
  }
  const body = clear($("queue"));
  for (const message of listing.messages || []) {
    const id = String(message.id);
    const base = `/api/v1/queue/${segment(id)}`;
    const recipients = el("ul", { class: "recipients" },
      (message.recipients || []).map((r) => el("li", {}, `${r.address} — ${r.state}`, r.reply ? ` (${r.reply})` : "")));
    body.append(el("tr", { dataset: { id }, class: message.held ? "held" : "" },
      el("td", { class: "mono" }, id, message.held ? " (held)" : ""), el("td", {}, message.sender || "<>"),
      el("td", {}, recipients), el("td", {}, size(message.size)), el("td", {}, when(message.created)),
      el("td", {}, message.attempts ?? ""), el("td", {}, message.held ? "held" : when(message.next_attempt)),
      el("td", { class: "actions" },
        message.held ? action("Release", "POST", `${base}/release`) : action("Hold", "POST", `${base}/hold`),
        action("Delete", "DELETE", base, { class: "danger" }))));
  }
  $("queue-flush").disabled = listing.relaying === false;
  const count = (listing.messages || []).length;
  text($("queue-status"), listing.relaying === false ? "Relaying is off: nothing is queued."
    : `${count} message${count === 1 ? "" : "s"} queued.`);
}

export function setup() {
  $("queue-flush").addEventListener("click", guarded(async () => {
    await call("POST", "/api/v1/queue/flush");
    await refreshQueue();
  }));
  $("queue-refresh").addEventListener("click", guarded(refreshQueue));
}
