// The page's entry point: the panels, and the live stream that keeps them
// current without a reload. Nothing polls the message list: a change shows
// because the server said so on GET /api/v1/events.

import { $ } from "./dom.js";
import { guarded, showError, sameOrigin } from "./api.js";
import * as messages from "./messages.js";
import * as screening from "./screening.js";
import * as queue from "./queue.js";

const panels = {
  messages: messages.refreshList,
  screening: async () => { await Promise.all([screening.refreshScreening(), screening.refreshChart()]); },
  queue: queue.refreshQueue,
};
let visible = "messages";
const stale = new Set();

// Several events in a burst (a purge, a flood of refusals) cost one reload
// of what they changed; a hidden panel is reloaded when it is shown.
const pending = new Map();
function soon(name, key = name, reload = panels[name]) {
  if (name !== visible) {
    stale.add(name);
    return;
  }
  if (pending.has(key)) return;
  pending.set(key, setTimeout(() => {
    pending.delete(key);
    reload().catch(showError);
  }, 150));
}

function show(name) {
  visible = name;
  for (const button of $("nav").querySelectorAll("[data-panel]")) {
    button.setAttribute("aria-pressed", String(button.dataset.panel === name));
  }
  for (const panel of Object.keys(panels)) $(`panel-${panel}`).hidden = panel !== name;
  stale.delete(name);
  history.replaceState(null, "", name === "messages" ? location.pathname : `#${name}`);
  return panels[name]();
}

const ROUTES = [
  ["message.", "messages"],
  ["screening.", "screening"],
  ["queue.", "queue"],
];

function listen() {
  const live = $("live");
  const stream = new EventSource(sameOrigin("/api/v1/events"));
  const state = (value, label) => {
    live.dataset.state = value;
    live.textContent = label;
  };
  stream.addEventListener("open", () => {
    state("live", "live");
    // Whatever happened while the stream was down: load it now.
    for (const name of Object.keys(panels)) soon(name);
  });
  stream.addEventListener("error", () => state("down", "reconnecting…"));
  const kinds = ["message.new", "message.deleted", "message.read", "message.unread",
    "screening.block", "screening.unblock", "screening.freeze", "screening.thaw", "screening.decision",
    "queue.added", "queue.delivered", "queue.held", "queue.released", "queue.deleted",
    "queue.bounced", "queue.deferred"];
  for (const kind of kinds) {
    stream.addEventListener(kind, (event) => {
      let data = null;
      try { data = JSON.parse(event.data); } catch { /* a kind is enough to reload */ }
      if (kind.startsWith("message.")) messages.onEvent(kind, data);
      const [, panel] = ROUTES.find(([prefix]) => kind.startsWith(prefix));
      if (panel === "screening") {
        for (const part of screening.PARTS[kind]) soon(panel, part, () => screening.refreshPart(part));
      } else {
        soon(panel);
      }
    });
  }
}

function start() {
  messages.setup();
  screening.setup();
  queue.setup();
  for (const button of $("nav").querySelectorAll("[data-panel]")) {
    button.addEventListener("click", guarded(() => show(button.dataset.panel)));
  }
  // The chart's newest minute moves on by itself.
  setInterval(() => { if (visible === "screening") screening.refreshChart(); }, 60000);
  show(location.hash === "#screening" || location.hash === "#queue" ? location.hash.slice(1) : "messages")
    .catch(showError);
  listen();
}

start();
