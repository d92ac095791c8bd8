// The head open in the editor: its type, labels and stored examples, and the one way to change
// them (PUT /heads/{name}/examples, DELETE for an image that keeps no label). Writes go out one
// at a time, in the order they were made; listeners re-render after each.
import { api, headUrl, json } from "./api.js";
import { unique } from "./dom.js";

export const head = {
  name: "",
  type: null, // binary | multiclass | multilabel
  positive: null, // a binary head's positive label
  negative: null, // and its other one
  extraLabels: [], // labels named in the page that no example carries yet
  examples: new Map(), // image id (string) -> labels
  report: null, // GET /heads/{name}: the current version's report, or null before any training
  stored: false, // whether the server holds an example set (or a trained head) under this name
};

const listeners = new Set();
let writes = Promise.resolve();

export function onExamplesChanged(listener) {
  listeners.add(listener);
}

export function resetHead(name) {
  Object.assign(head, { name, type: null, positive: null, negative: null, extraLabels: [], examples: new Map(), report: null, stored: false });
}

export function counts() {
  const out = {};
  for (const labels of head.examples.values()) for (const label of labels) out[label] = (out[label] || 0) + 1;
  return out;
}

// The labels in key order: a binary head's positive label first (key 1), then its other one;
// the others sorted, then those added in the page.
export function labelsInOrder() {
  if (head.type === "binary") return [head.positive, head.negative].filter(Boolean);
  const fromReport = head.report?.labels || [];
  return unique([...unique([...Object.keys(counts()), ...fromReport]).sort((a, b) => a.localeCompare(b)), ...head.extraLabels]);
}

export function addLabel(label) {
  if (!labelsInOrder().includes(label)) head.extraLabels.push(label);
}

// The server's answer to GET or PUT /heads/{name}/examples.
export function takeExamples(answer) {
  head.type = answer.type;
  head.stored = true;
  if (answer.type === "binary") {
    head.positive = answer.positive;
    const other = Object.keys(answer.counts).find((l) => l !== answer.positive);
    const trainedOther = head.report?.labels?.find((l) => l !== answer.positive);
    head.negative = other || trainedOther || head.negative || "other";
  }
  head.examples = new Map(answer.examples.map((e) => [String(e.image_id), e.labels]));
  head.extraLabels = head.extraLabels.filter((l) => !(l in answer.counts));
}

function notify(change) {
  for (const listener of listeners) listener(change);
}

// Give image `id` exactly these labels (none: it is no longer an example).
export function setLabels(id, labels) {
  id = String(id);
  const run = async () => {
    if (!labels.length) {
      if (!head.examples.has(id)) return;
      await api(headUrl(head.name, `/examples/${id}`), { method: "DELETE" });
      head.examples.delete(id);
    } else {
      const body = { type: head.type, examples: [{ image_id: Number(id), labels }] };
      if (head.type === "binary") body.positive = head.positive;
      takeExamples(await api(headUrl(head.name, "/examples"), json("PUT", body)));
    }
    notify({ id, labels });
  };
  const result = writes.then(run);
  writes = result.catch(() => {});
  return result;
}

// The labels a click on `label` gives image `id`: a multi-label image adds or drops it.
export function labelsAfterClick(id, label) {
  if (head.type !== "multilabel") return [label];
  const now = head.examples.get(String(id)) || [];
  return now.includes(label) ? now.filter((l) => l !== label) : [...now, label].sort();
}
