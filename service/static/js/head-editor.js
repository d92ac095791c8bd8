// The head editor (/?view=head&name=NAME): a head's labels with their example thumbnails,
// suggestions of what to label next, Train, the cross-validated evaluation and what it rests on,
// the examples the current version gets wrong, and its versions ("Make current").
// A head that exists nowhere yet (from "New head…") carries its type and labels in the URL:
// /?view=head&name=pets&type=binary&positive=dog&label=other.
import { api, apiOr404, headUrl } from "./api.js";
import { $, el, fmtDate, fmtNumber, plural } from "./dom.js";
import { openDetail } from "./detail.js";
import { refreshTags } from "./facets.js";
import { headNameProblem, rememberHead } from "./head-form.js";
import { addLabel, counts, head, labelsInOrder, labelsAfterClick, onExamplesChanged, resetHead, setLabels, takeExamples } from "./head-state.js";
import { setImage, thumbnailUrl } from "./images.js";
import { headline, metricsSections, warningsSection } from "./metrics.js";
import { navigate, registerView } from "./router.js";
import { clearSuggestions, initSuggestions, labelButtons, loadSuggestions, refreshLabelButtons } from "./suggestions.js";
import { activate, clearProgress, train } from "./training.js";

const SHOWN_PER_LABEL = 60;
let loadSeq = 0;
const expanded = new Set(); // labels whose every example is shown
let currentVersion = null; // from GET /heads/{name}/versions

function setError(text) {
  $("#head-error").textContent = text;
}

async function enter(params) {
  const name = params.get("name") || "";
  const seq = ++loadSeq;
  resetHead(name);
  expanded.clear();
  clearProgress();
  clearSuggestions();
  setError("");
  $("#head-heading").textContent = name ? `Teach ${name}` : "Teach a head";
  document.title = `${name || "Head"} · Teach · lookalike`;
  for (const id of ["#head-labels", "#head-eval", "#head-mistakes", "#head-versions"]) $(id).replaceChildren();
  $("#head-summary").textContent = "Loading…";
  const problem = headNameProblem(name);
  if (problem) return showMissing(problem);
  rememberHead(name);
  try {
    // GET /heads first: an unknown or untrained head's other routes would only answer 404.
    const summary = (await api("/heads")).find((h) => h.name === name);
    if (seq !== loadSeq) return;
    if (summary?.builtin) return showMissing(`${name} is a built-in head: it cannot be taught.`);
    if (!summary && !fromUrl(params)) {
      return showMissing(`No head named ${name}. Create it with “New head…” on the heads page, or with “Save as tag…” on the search page.`);
    }
    if (summary) {
      const [examples, report] = await Promise.all([api(headUrl(name, "/examples")), summary.trained ? api(headUrl(name)) : null]);
      if (seq !== loadSeq) return;
      head.report = report;
      takeExamples(examples);
    }
    renderAll();
    if (summary?.trained) await loadVersions();
    else renderVersions([]);
    if (seq !== loadSeq) return;
    if (head.examples.size || head.report) loadSuggestions({ fresh: true });
    else clearSuggestions("Suggestions start from the examples. On the search page, mark images “Like” and “Unlike”, then choose “Save as tag…” with this head's name.");
  } catch (error) {
    if (seq === loadSeq) setError(error.message);
  }
}

// A head not stored yet: its type and labels from the URL ("New head…").
function fromUrl(params) {
  const type = params.get("type");
  if (!["binary", "multiclass", "multilabel"].includes(type)) return false;
  head.type = type;
  const labels = params.getAll("label").filter(Boolean);
  if (type === "binary") {
    head.positive = params.get("positive") || "yes";
    head.negative = labels[0] || "other";
  } else head.extraLabels = labels;
  return true;
}

function showMissing(text) {
  $("#head-summary").textContent = "";
  $("#head-train").disabled = true;
  $("#head-delete").hidden = true;
  $("#add-label-form").hidden = true;
  setError(text);
}

function renderAll() {
  renderSummary();
  renderLabels();
  renderEvaluation();
  renderMistakes();
  $("#add-label-form").hidden = head.type === "binary";
  $("#head-delete").hidden = !head.stored && !head.report;
}

function renderSummary() {
  const parts = [`${head.type} head`];
  if (head.type === "binary") parts.push(`positive label “${head.positive}”`);
  parts.push(plural(head.examples.size, "example"));
  const version = head.report?.metrics ? currentVersion : null;
  parts.push(head.report ? (version ? `version ${version} is current` : "trained") : "not trained yet");
  const source = head.report?.metrics?.source;
  if (head.report && source !== "stored examples") {
    // Trained by `lookalike heads train` from a label file: Train here learns from the examples stored here only.
    parts.push(`trained from ${source || "a label file"}; Train here uses only the examples stored here`);
  }
  $("#head-summary").textContent = parts.join(" · ");
  $("#head-train").disabled = head.examples.size === 0;
}


function renderLabels() {
  const root = $("#head-labels");
  const tally = counts();
  const groups = labelsInOrder().map((label, i) => {
    const ids = [...head.examples].filter(([, labels]) => labels.includes(label)).map(([id]) => id);
    const shown = expanded.has(label) ? ids : ids.slice(0, SHOWN_PER_LABEL);
    const list = el(
      "ul",
      { className: "example-list", "aria-label": `Examples of ${label}` },
      shown.map((id) => exampleTile(id, label)),
    );
    const role = head.type === "binary" ? (label === head.positive ? " (positive)" : " (negative)") : "";
    return el("section", { className: "label-group", dataset: { label } }, [
      el("h3", {}, [
        i < 9 ? el("kbd", { title: `Key ${i + 1} gives a suggestion this label`, text: String(i + 1) }) : null,
        ` ${label}${role} `,
        el("span", { className: "count", text: plural(tally[label] || 0, "example") }),
      ]),
      ids.length ? list : el("p", { className: "muted", text: "No examples yet." }),
      ids.length > shown.length
        ? el("button", {
            type: "button",
            className: "link-button",
            text: `Show all ${ids.length}`,
            onclick: () => {
              expanded.add(label);
              renderLabels();
            },
          })
        : null,
    ]);
  });
  root.replaceChildren(...(groups.length ? groups : [el("p", { className: "muted", text: "No labels yet: add one below." })]));
}

function exampleTile(id, label) {
  const img = el("img", { alt: `Image ${id}`, loading: "lazy", width: 96, height: 96 });
  setImage(img, thumbnailUrl(id));
  return el("li", { className: "example", dataset: { id } }, [
    el("button", { type: "button", className: "card-open", "aria-label": `Image ${id}: open details`, onclick: () => openDetail(id, null) }, img),
    el("button", {
      type: "button",
      className: "icon-button small remove-example",
      "aria-label": `Remove image ${id} from ${label}`,
      title: `Remove from ${label}`,
      text: "×",
      onclick: (event) => {
        const tile = event.currentTarget.closest(".label-group");
        const labels = (head.examples.get(id) || []).filter((l) => l !== label);
        setLabels(id, labels).then(
          () => tile?.querySelector(".remove-example, h3")?.focus?.(),
          (error) => setError(`Image ${id} could not be removed: ${error.message}`),
        );
      },
    }),
  ]);
}

function renderEvaluation() {
  const root = $("#head-eval");
  const report = head.report?.metrics;
  if (!report?.metrics) {
    root.replaceChildren(el("p", { className: "muted", text: "Not trained yet. Label at least two examples of each label, then choose Train." }));
    return;
  }
  const m = report.metrics;
  const restsOn = el("p", { className: "rests-on" }, [
    el("strong", { text: `Rests on ${plural(m.n ?? report.examples ?? 0, "example")}` }),
    `: ${m.evaluated_on || "held-out predictions"}${m.split ? ` (${m.split})` : ""}.`,
  ]);
  root.replaceChildren(restsOn, warningsSection(report.warnings) || "", ...metricsSections(head.report, m));
}

function renderMistakes() {
  const root = $("#head-mistakes");
  const mistakes = head.report?.metrics?.mistakes;
  if (!Array.isArray(mistakes)) {
    root.replaceChildren(el("li", { className: "muted", text: head.report ? "This version's report lists no mistakes." : "Train first." }));
    return;
  }
  if (!mistakes.length) {
    root.replaceChildren(el("li", { className: "muted", text: "None: every held-out example got its own labels." }));
    return;
  }
  root.replaceChildren(...mistakes.map((m) => mistakeCard(m)));
}

function mistakeCard(mistake) {
  const id = String(mistake.image_id);
  const img = el("img", { alt: `Image ${id}`, loading: "lazy", width: 128, height: 128 });
  setImage(img, thumbnailUrl(id));
  const shown = (labels) => (labels.length ? labels.join(", ") : "none");
  const scores = Object.entries(mistake.scores || {}).map(([l, s]) => `${l} ${Number(s).toFixed(2)}`).join(", ");
  const card = el("li", { className: "card card-small mistake", dataset: { id } });
  const relabel = (label) =>
    setLabels(id, labelsAfterClick(id, label)).then(
      () => card.replaceWith(mistakeCard(mistake)),
      (error) => setError(`Image ${id} could not be relabelled: ${error.message}`),
    );
  card.append(
    el("button", { type: "button", className: "card-open", "aria-label": `Image ${id}: open details`, onclick: () => openDetail(id, null) }, img),
    el("div", { className: "card-body" }, [
      el("p", { className: "mistake-text" }, [`Labelled `, el("strong", { text: shown(mistake.labels) }), `, predicted `, el("strong", { text: shown(mistake.predicted) })]),
      scores ? el("p", { className: "muted small", text: `Scores: ${scores}` }) : null,
      head.examples.has(id)
        ? el("div", { className: "label-buttons", role: "group", "aria-label": `Relabel image ${id}` }, labelButtons(id, { onLabelled: relabel }))
        : el("p", { className: "muted small", text: "No longer an example." }),
    ]),
  );
  return card;
}

async function loadVersions() {
  renderVersions(await apiOr404(headUrl(head.name, "/versions"), []));
}

function renderVersions(versions) {
  const root = $("#head-versions");
  currentVersion = versions.find((v) => v.current)?.number ?? null;
  renderSummary();
  if (!versions.length) {
    root.replaceChildren(el("p", { className: "muted", text: "No versions yet: each training stores one." }));
    return;
  }
  const rows = versions
    .slice()
    .sort((a, b) => b.number - a.number)
    .map((v) => {
      const figure = headline(v.metrics);
      return el("tr", { dataset: { version: v.number, current: String(v.current) } }, [
        el("th", { scope: "row" }, [`${v.number} `, v.current ? el("span", { className: "badge badge-type", text: "current" }) : null]),
        el("td", { text: fmtDate(v.created_at, { dateStyle: "short", timeStyle: "short" }) }),
        el("td", { className: "num", text: v.examples === null ? "–" : fmtNumber(v.examples) }),
        el("td", { className: "num", text: figure ? `${figure[0]} ${figure[1]}` : "–" }),
        el(
          "td",
          {},
          v.current
            ? el("span", { className: "muted", text: "in use" })
            : el("button", { type: "button", className: "button small", "aria-label": `Make version ${v.number} current`, text: "Make current", onclick: () => makeCurrent(v.number) }),
        ),
      ]);
    });
  root.replaceChildren(
    el("div", { className: "table-scroll" }, el("table", { className: "table versions" }, [
      el("thead", {}, el("tr", {}, ["Version", "Created", "Examples", "Evaluation", ""].map((t) => el("th", { scope: "col", text: t })))),
      el("tbody", {}, rows),
    ])),
  );
}

// After a training or a change of version: the new report, versions, suggestions and tags.
async function afterTraining() {
  const name = head.name;
  const [report, examples] = await Promise.all([apiOr404(headUrl(name)), apiOr404(headUrl(name, "/examples"))]);
  if (name !== head.name) return;
  head.report = report;
  if (examples) takeExamples(examples);
  renderAll();
  await loadVersions();
  loadSuggestions({ fresh: true });
}

async function startTraining() {
  setError("");
  $("#head-train").disabled = true;
  try {
    const report = await train(head.name, head.examples.size);
    if (report) await afterTraining();
  } catch {
    /* the progress line says why */
  } finally {
    $("#head-train").disabled = head.examples.size === 0;
  }
}

async function makeCurrent(number) {
  setError("");
  try {
    const report = await activate(head.name, number);
    if (report) await afterTraining();
  } catch {
    /* the progress line says why */
  }
}

async function deleteHead() {
  const dialog = $("#delete-dialog");
  $("#delete-text").textContent = `Delete ${head.name}: its ${plural(head.examples.size, "example")}, every version, and the tags it wrote? This cannot be undone.`;
  dialog.returnValue = "";
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  if (dialog.returnValue !== "delete") return;
  try {
    await api(headUrl(head.name), { method: "DELETE" });
  } catch (error) {
    if (error.status !== 404) return setError(error.message);
  }
  refreshTags();
  navigate("/?view=heads");
}

export function initHeadEditor() {
  initSuggestions();
  onExamplesChanged(() => {
    renderSummary();
    renderLabels();
    refreshLabelButtons();
    $("#head-delete").hidden = false;
  });
  $("#head-train").addEventListener("click", startTraining);
  $("#head-delete").addEventListener("click", deleteHead);
  $("#delete-cancel").addEventListener("click", () => $("#delete-dialog").close());
  $("#add-label-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("#add-label");
    const label = input.value.trim();
    if (!label) return;
    addLabel(label);
    input.value = "";
    renderLabels();
    refreshLabelButtons();
  });
  registerView("head", { nav: "heads", title: (params) => `${params.get("name") || "Head"} · Teach · lookalike`, enter, leave: () => { loadSeq += 1; clearProgress(); } });
}
