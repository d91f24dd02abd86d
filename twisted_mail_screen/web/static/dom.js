// Building the page's elements. Every text that came from a message, a
// header or the server goes in as a text node (textContent): nothing here
// ever parses a string as markup, so a Subject like "<img onerror=...>"
// shows as those characters.

export const $ = (id) => document.getElementById(id);

// el("td", {class: "x", dataset: {address: a}}, "text", child, ...)
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

// An empty table says so in a row of its own.
export function noneRow(body, columns, message) {
  if (!body.rows.length) body.append(el("tr", { class: "none" }, el("td", { colspan: columns }, message)));
}

export function text(node, value) {
  node.textContent = value === undefined || value === null ? "" : String(value);
  return node;
}

export function address(person) {
  if (!person) return "";
  const name = person.Name || "";
  const addr = person.Address || "";
  return name && addr ? `${name} <${addr}>` : name || addr;
}

export function addresses(list) {
  return (list || []).map(address).join(", ");
}

export function size(bytes) {
  if (bytes === undefined || bytes === null) return "";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} kB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

export function when(value) {
  if (value === undefined || value === null || value === "") return "";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

export function duration(seconds) {
  if (seconds === undefined || seconds === null) return "for good";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = s % 60;
  return h ? `${h}h ${String(m).padStart(2, "0")}m` : m ? `${m}m ${String(r).padStart(2, "0")}s` : `${r}s`;
}
