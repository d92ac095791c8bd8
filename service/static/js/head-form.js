// The dialog that names a head: "Save as tag…" on the search page (the tray's examples become a
// head's examples) and "New head…" on the heads page. For an existing head it fixes the type and,
// for a binary head, its two labels, so what is saved can only add to it.
import { ApiError, api, apiOr404, headUrl, json } from "./api.js";
import { $, $$, el, plural, unique } from "./dom.js";
import { navigate } from "./router.js";

let heads = []; // GET /heads, fetched when the dialog opens
let headsLoaded = Promise.resolve();
let known = null; // the existing head the name matches: { type, positive, negative, labels }
let task = null; // { mode: "save" | "new", likes, unlikes, uploads }
let lastHead = ""; // the head last opened in the editor, offered as the default name

export function rememberHead(name) {
  lastHead = name;
}

const field = (id) => $(`#${id}`);
const chosenType = () => $$('#head-form input[name="head-type"]').find((r) => r.checked)?.value || "binary";

function setError(text) {
  field("head-dialog-error").textContent = text;
}

export function headNameProblem(name) {
  if (!name) return "Give the head a name.";
  if (name.length > 100) return "A head name has at most 100 characters.";
  if (name.includes(":")) return "A head name cannot contain ':' (filters write head:label).";
  return "";
}

async function lookUp(name) {
  const summary = heads.find((h) => h.name === name);
  if (!summary || summary.builtin) return summary ? { builtin: true, type: summary.type } : null;
  const examples = await apiOr404(headUrl(name, "/examples"));
  const type = examples ? examples.type : summary.type;
  const positive = examples?.positive ?? (type === "binary" ? summary.labels[summary.labels.length - 1] : null);
  const labels = unique([...(summary.labels || []), ...Object.keys(examples?.counts || {})]);
  const negative = type === "binary" ? labels.find((l) => l !== positive) || "" : "";
  return { type, positive, negative, labels, examples };
}

// Adapts the form to the name typed: a known head fixes its type (and a binary head's labels).
async function onNameInput() {
  const name = field("head-name").value.trim();
  const found = name ? await lookUp(name).catch(() => null) : null;
  if (field("head-name").value.trim() !== name) return; // typed on meanwhile
  known = found;
  for (const radio of $$('#head-form input[name="head-type"]')) {
    radio.disabled = Boolean(found && radio.value !== found.type);
    if (found && radio.value === found.type) radio.checked = true;
  }
  const binaryKnown = Boolean(found && !found.builtin && found.type === "binary" && found.positive);
  field("head-positive").readOnly = binaryKnown;
  field("head-negative").readOnly = binaryKnown && Boolean(found.negative);
  if (binaryKnown) {
    field("head-positive").value = found.positive;
    if (found.negative) field("head-negative").value = found.negative;
  }
  if (found?.builtin) field("head-known").textContent = `${name} is a built-in head: it cannot be taught. Choose another name.`;
  else if (found) {
    const labels = found.type === "binary" ? `${found.positive} or ${found.negative || "not"}` : found.labels.join(", ") || "no labels yet";
    field("head-known").textContent = `${name} is an existing ${found.type} head (${labels}): ${task.mode === "save" ? "the examples are added to it" : "it opens in the editor"}.`;
  } else field("head-known").textContent = name ? `A new head named ${name}.` : "";
  syncFields();
}

function syncFields() {
  const type = chosenType();
  const binary = type === "binary";
  field("head-negative-field").hidden = !binary;
  field("head-positive-label").textContent =
    task.mode === "save"
      ? binary
        ? "Label of the “Like” images (the positive label)"
        : "Label of the “Like” images"
      : binary
        ? "Positive label"
        : "Labels, separated by commas";
  field("head-negative-label").textContent = task.mode === "save" ? "Label of the “Unlike” images" : "Negative label";
  const notes = [];
  if (task.mode === "save") {
    notes.push(`${plural(task.likes.length, "image")} marked “Like” ${task.likes.length === 1 ? "becomes an example" : "become examples"} of the first label.`);
    if (task.unlikes.length) {
      const images = plural(task.unlikes.length, "image");
      const typeName = type === "multiclass" ? "multi-class" : "multi-label";
      notes.push(
        binary
          ? `${images} marked “Unlike” ${task.unlikes.length === 1 ? "becomes an example" : "become examples"} of the second.`
          : `${task.unlikes.length === 1 ? "The image" : `The ${images}`} marked “Unlike” ${task.unlikes.length === 1 ? "is" : "are"} not stored: a ${typeName} head learns from examples of each of its labels.`,
      );
    }
    if (task.uploads) notes.push(`${plural(task.uploads, "uploaded image")} ${task.uploads === 1 ? "is" : "are"} not indexed, so left out.`);
  }
  field("head-dialog-note").textContent = notes.join(" ");
}

function open(mode, { likes = [], unlikes = [], uploads = 0 } = {}) {
  task = { mode, likes, unlikes, uploads };
  known = null;
  const dialog = field("head-dialog");
  field("head-dialog-title").textContent = mode === "save" ? "Save the examples as a tag" : "New head";
  field("head-dialog-submit").textContent = mode === "save" ? "Save examples" : "Create and open";
  field("head-name").value = mode === "save" ? lastHead : "";
  field("head-positive").value = "";
  field("head-negative").value = "other";
  field("head-known").textContent = "";
  for (const radio of $$('#head-form input[name="head-type"]')) {
    radio.disabled = false;
    radio.checked = radio.value === "binary";
  }
  field("head-positive").readOnly = field("head-negative").readOnly = false;
  setError("");
  syncFields();
  dialog.showModal();
  field("head-name").focus();
  headsLoaded = api("/heads").then(
    (list) => {
      heads = list;
      field("head-names").replaceChildren(...list.filter((h) => !h.builtin).map((h) => el("option", { value: h.name })));
      if (field("head-name").value) onNameInput();
    },
    (error) => setError(`Heads could not be loaded: ${error.message}`),
  );
}

export function openSaveAsTag(likes, unlikes, uploads) {
  open("save", { likes: [...likes], unlikes: [...unlikes], uploads });
}

export function openNewHead() {
  open("new");
}

function readForm() {
  const name = field("head-name").value.trim();
  const type = chosenType();
  const problem = headNameProblem(name);
  if (problem) return { problem, focus: "head-name" };
  if (known?.builtin) return { problem: `${name} is a built-in head: it cannot be taught.`, focus: "head-name" };
  const first = field("head-positive").value.trim();
  const negative = field("head-negative").value.trim();
  const labels = task.mode === "new" && type !== "binary" ? unique(first.split(",").map((s) => s.trim()).filter(Boolean)) : [first];
  if (!labels.length || !labels[0]) return { problem: "Give the label a name.", focus: "head-positive" };
  if (type === "binary" && (task.mode === "new" || task.unlikes.length) && !negative) {
    return { problem: "Give the second label a name.", focus: "head-negative" };
  }
  if (type === "binary" && negative === first) return { problem: "The two labels need different names.", focus: "head-negative" };
  return { name, type, labels, negative };
}

async function save({ name, type, labels, negative }) {
  const [label] = labels;
  const existing = known?.examples?.examples || [];
  const current = new Map(existing.map((e) => [String(e.image_id), e.labels]));
  const examples = task.likes.map((id) => ({
    image_id: Number(id),
    // A multi-label image keeps the labels it has; the others take exactly this one.
    labels: type === "multilabel" ? unique([...(current.get(String(id)) || []), label]) : [label],
  }));
  if (type === "binary") for (const id of task.unlikes) examples.push({ image_id: Number(id), labels: [negative] });
  const body = { type, examples };
  if (type === "binary") body.positive = label;
  await api(headUrl(name, "/examples"), json("PUT", body));
}

async function onSubmit(event) {
  event.preventDefault();
  await headsLoaded;
  await onNameInput(); // the name as typed now, not as the last pause in typing saw it
  const form = readForm();
  if (form.problem) {
    setError(form.problem);
    field(form.focus).focus();
    return;
  }
  const submit = field("head-dialog-submit");
  submit.disabled = true;
  setError("");
  try {
    let url = `/?view=head&name=${encodeURIComponent(form.name)}`;
    if (task.mode === "save") await save(form);
    else if (!known) {
      const params = new URLSearchParams({ view: "head", name: form.name, type: form.type });
      if (form.type === "binary") {
        params.set("positive", form.labels[0]);
        params.append("label", form.negative);
      } else for (const label of form.labels) params.append("label", label);
      url = `/?${params}`;
    }
    field("head-dialog").close();
    navigate(url);
  } catch (error) {
    setError(error instanceof ApiError ? error.message : String(error));
  } finally {
    submit.disabled = false;
  }
}

export function initHeadForm() {
  field("head-form").addEventListener("submit", onSubmit);
  field("head-dialog-cancel").addEventListener("click", () => field("head-dialog").close());
  let timer = null;
  field("head-name").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(onNameInput, 150);
  });
  for (const radio of $$('#head-form input[name="head-type"]')) radio.addEventListener("change", syncFields);
}
