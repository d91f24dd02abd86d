// The last hour, per minute, as inline SVG: connections, refusals and
// blocks from GET /api/v1/stats. Built with createElementNS; the numbers
// are the only data and they go in as attributes and text nodes.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 180;
const PAD = { left: 36, right: 8, top: 10, bottom: 22 };
export const SERIES = ["connections", "refusals", "blocks"];

function node(tag, attrs = {}, label) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, String(value));
  if (label !== undefined) element.textContent = String(label);
  return element;
}

function clock(epochMinute) {
  const date = new Date(epochMinute * 1000);
  return `${String(date.getHours()).padStart(2, "0")}:${String(date.getMinutes()).padStart(2, "0")}`;
}

// A round step for the y axis so the top line reads as a plain number.
function ceiling(most) {
  if (most <= 4) return 4;
  const magnitude = 10 ** Math.floor(Math.log10(most));
  for (const step of [1, 2, 5, 10]) if (step * magnitude >= most) return step * magnitude;
  return 10 * magnitude;
}

export function drawChart(box, stats) {
  const series = (stats && stats.series) || {};
  const length = Math.max(1, ...SERIES.map((name) => (series[name] || []).length));
  const top = ceiling(Math.max(0, ...SERIES.flatMap((name) => series[name] || [])));
  const innerW = WIDTH - PAD.left - PAD.right;
  const innerH = HEIGHT - PAD.top - PAD.bottom;
  const x = (i) => PAD.left + (length === 1 ? innerW : (i * innerW) / (length - 1));
  const y = (v) => PAD.top + innerH - (v * innerH) / top;

  const svg = node("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", class: "chart-svg",
    "aria-label": "connections, refusals and blocks per minute over the last hour" });
  for (const fraction of [0, 0.5, 1]) {
    const value = Math.round(top * fraction);
    svg.append(node("line", { class: "grid-line", x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value) }));
    svg.append(node("text", { class: "axis", x: PAD.left - 4, y: y(value) + 4, "text-anchor": "end" }, value));
  }
  if (stats && typeof stats.minute === "number") {
    const first = stats.minute - (length - 1) * 60;
    for (const [i, anchor] of [[0, "start"], [Math.floor((length - 1) / 2), "middle"], [length - 1, "end"]]) {
      svg.append(node("text", { class: "axis", x: x(i), y: HEIGHT - 6, "text-anchor": anchor }, clock(first + i * 60)));
    }
  }
  for (const name of SERIES) {
    const values = series[name] || [];
    const points = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const line = node("polyline", { class: `series series-${name}`, points, fill: "none" });
    line.append(node("title", {}, `${name}: ${values.reduce((a, b) => a + b, 0)} in the last hour`));
    svg.append(line);
  }
  const legend = document.createElement("ul");
  legend.className = "legend";
  for (const name of SERIES) {
    const values = series[name] || [];
    const item = document.createElement("li");
    item.className = `legend-${name}`;
    item.textContent = `${name}: ${values.reduce((a, b) => a + b, 0)} (last minute ${values.at(-1) ?? 0})`;
    legend.append(item);
  }
  box.replaceChildren(svg, legend);
}
