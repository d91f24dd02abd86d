// The screening panel: active blocks with their rule and time left,
// unblock, add a block, the white list, frozen accounts with thaw, the
// recent decisions and the per-minute chart.

import { $, el, clear, text, duration, when, noneRow } from "./dom.js";
import { call, get, segment, guarded, ApiError } from "./api.js";
import { drawChart } from "./chart.js";

// Time left is counted down here between loads, from when each table came.
const countdowns = { blocks: [], frozen: [] };

function left(table, seconds) {
  const cell = el("td", { class: "left" }, duration(seconds));
  if (seconds !== null && seconds !== undefined) {
    countdowns[table].push({ cell, until: performance.now() + seconds * 1000 });
  }
  return cell;
}

function tick() {
  const now = performance.now();
  let lapsed = false;
  for (const entry of [...countdowns.blocks, ...countdowns.frozen]) {
    const seconds = (entry.until - now) / 1000;
    entry.cell.textContent = duration(seconds);
    lapsed ||= seconds <= -2; // the server's once-a-second check has dropped it by now
  }
  if (lapsed) refreshScreening().catch(() => {});
}

function adminOnly(status, error) {
  const message = error instanceof ApiError && error.status === 403
    ? "Screening is for administrators." : error.message;
  text(status, message);
}

async function blocks() {
  const { blocks: list } = await get("/api/v1/screening/blocks");
  const body = clear($("blocks"));
  countdowns.blocks = [];
  for (const block of list || []) {
    const name = block.address;
    const unblock = el("button", { type: "button", class: "unblock", title: `unblock ${name}` }, "Unblock");
    unblock.addEventListener("click", guarded(async () => {
      unblock.disabled = true;
      try {
        await call("DELETE", `/api/v1/screening/blocks/${segment(name)}`);
      } finally {
        await refreshScreening();
      }
    }));
    const count = block.count === null || block.count === undefined ? ""
      : block.limit ? `${block.count}/${block.limit}` : block.count;
    body.append(el("tr", { dataset: { address: name } },
      el("td", { class: "address" }, name, block.network ? " (network)" : ""),
      el("td", {}, block.rule || ""), el("td", {}, count), el("td", {}, block.offence ?? ""),
      left("blocks", block.seconds_left), el("td", { class: "reason" }, block.reason || ""), el("td", {}, unblock)));
  }
  text($("blocks-status"), (list || []).length ? "" : "Nobody is blocked.");
}

async function whitelist() {
  const { whitelist: list } = await get("/api/v1/screening/whitelist");
  const body = clear($("whitelist"));
  for (const entry of list || []) {
    let action = "";
    if (entry.origin === "runtime") {
      action = el("button", { type: "button" }, "Remove");
      action.addEventListener("click", guarded(async () => {
        await call("DELETE", `/api/v1/screening/whitelist/${segment(entry.entry)}`);
        await refreshScreening();
      }));
    }
    body.append(el("tr", { dataset: { entry: entry.entry } },
      el("td", {}, entry.entry, entry.comment ? ` — ${entry.comment}` : ""),
      el("td", {}, entry.origin || ""), el("td", {}, action)));
  }
  noneRow(body, 3, "No entries.");
}

async function frozen() {
  const { frozen: list } = await get("/api/v1/screening/frozen");
  const body = clear($("frozen"));
  countdowns.frozen = [];
  for (const account of list || []) {
    const thaw = el("button", { type: "button" }, "Thaw");
    thaw.addEventListener("click", guarded(async () => {
      await call("DELETE", `/api/v1/screening/frozen/${segment(account.user)}`);
      await refreshScreening();
    }));
    body.append(el("tr", { dataset: { user: account.user } },
      el("td", {}, account.user), left("frozen", account.seconds_left),
      el("td", {}, account.reason || ""), el("td", {}, thaw)));
  }
  noneRow(body, 4, "No account is frozen.");
}

const SHOWN = new Set(["time", "action", "client", "rule"]);

async function decisions() {
  const { decisions: list } = await get("/api/v1/screening/decisions?limit=50");
  const body = clear($("decisions"));
  for (const decision of list || []) {
    const detail = Object.entries(decision).filter(([key]) => !SHOWN.has(key))
      .map(([key, value]) => `${key}=${typeof value === "object" ? JSON.stringify(value) : value}`).join(" ");
    body.append(el("tr", { class: `action-${String(decision.action || "").replace(/\W/g, "")}` },
      el("td", {}, when(decision.time)), el("td", {}, decision.action || ""),
      el("td", {}, decision.client || ""), el("td", {}, decision.rule || ""), el("td", {}, detail)));
  }
  noneRow(body, 5, "No decisions since the server started.");
}

export async function refreshChart() {
  try {
    drawChart($("chart"), await get("/api/v1/stats"));
  } catch (error) {
    text($("chart"), `No statistics: ${error.message}`);
  }
}

// Only the part an event changed is redrawn: a flood of decisions must not
// keep replacing the block table under the administrator's pointer.
export const PARTS = {
  "screening.block": ["blocks", "decisions"],
  "screening.unblock": ["blocks", "decisions"],
  "screening.freeze": ["frozen"],
  "screening.thaw": ["frozen"],
  "screening.decision": ["decisions", "chart"],
};

export async function refreshPart(part) {
  if (part === "chart") return refreshChart();
  if (part === "blocks") return refreshScreening();
  return { decisions, frozen, whitelist }[part]();
}

export async function refreshScreening() {
  try {
    await blocks();
  } catch (error) {
    clear($("blocks"));
    adminOnly($("blocks-status"), error);
    return;
  }
  await Promise.all([whitelist(), frozen(), decisions()]);
}

function form(id, submit) {
  const element = $(id);
  element.addEventListener("submit", guarded(async (event) => {
    event.preventDefault();
    await submit(new FormData(element));
    element.reset();
    await refreshScreening();
  }));
}

export function setup() {
  form("block-form", async (data) => {
    const minutes = String(data.get("minutes") || "").trim();
    await call("POST", "/api/v1/screening/blocks", {
      address: String(data.get("address")).trim(),
      minutes: minutes === "" ? null : Number(minutes),
      reason: String(data.get("reason") || ""),
    });
  });
  form("whitelist-form", async (data) => {
    await call("POST", "/api/v1/screening/whitelist", { entry: String(data.get("address")).trim() });
  });
  setInterval(tick, 1000);
}
