// Small DOM and formatting helpers shared by every view. No state.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

// el("button", { type: "button", className: "x", text: "Go", onclick }, [children]): a new element.
// false, null and undefined props are left out; true sets an empty attribute.
export function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "className") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  for (const child of [].concat(children)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const basename = (path) => String(path).split(/[\\/]/).pop() || String(path);
export const unique = (items) => Array.from(new Set(items));
export const clamp = (value, lo, hi) => Math.min(hi, Math.max(lo, value));
export const fmtScore = (score) => (typeof score === "number" ? score.toFixed(3) : "–");
export const plural = (n, one, many = `${one}s`) => `${n.toLocaleString("en")} ${n === 1 ? one : many}`;

export function fmtNumber(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return value === null || value === undefined ? "–" : String(value);
  return Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(3);
}

export function fmtBytes(bytes) {
  if (typeof bytes !== "number") return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

export function fmtDate(text, options = undefined) {
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? String(text) : date.toLocaleString(undefined, options);
}

// Is this key press meant for the page (not typed into a field, not a shortcut of the browser)?
export function isPlainKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey || event.defaultPrevented) return false;
  const target = event.target;
  if (!(target instanceof Element)) return true;
  return !target.closest("input, textarea, select, [contenteditable=''], [contenteditable='true']");
}
