// The heads view: every head with its type, labels, thresholds, evaluation and training plots,
// a link to teach each one (the head editor) and "New head…".
import { api, headUrl } from "./api.js";
import { $, el, fmtDate, fmtNumber, plural } from "./dom.js";
import { openNewHead } from "./head-form.js";
import { setImage } from "./images.js";
import { keyValues, labelsSection, metricsSections, warningsSection } from "./metrics.js";
import { registerView } from "./router.js";

const PLOTS = {
  "loss.png": "Training and validation loss per epoch",
  "confusion_matrix.png": "Confusion matrix on the validation split",
  "precision_recall.png": "Precision–recall curve",
};

let headsSeq = 0;

const editorUrl = (name) => `/?view=head&name=${encodeURIComponent(name)}`;

async function renderHeads() {
  const seq = ++headsSeq;
  const root = $("#heads-content");
  root.setAttribute("aria-busy", "true");
  try {
    const summaries = await api("/heads");
    const heads = await Promise.all(
      summaries.map((h) =>
        h.trained === false ? h : api(headUrl(h.name)).then((report) => ({ ...h, ...report }), (error) => ({ ...h, error: error.message })),
      ),
    );
    if (seq !== headsSeq) return;
    heads.sort((a, b) => a.builtin - b.builtin || a.name.localeCompare(b.name));
    root.replaceChildren(...(heads.length ? heads.map((head) => headCard(head)) : [el("p", { className: "muted", text: "No heads." })]));
  } catch (error) {
    if (seq === headsSeq) root.replaceChildren(el("p", { className: "error", text: error.message }));
  } finally {
    if (seq === headsSeq) root.removeAttribute("aria-busy");
  }
}

function teachLink(head) {
  return el("a", {
    className: "button teach-link",
    href: editorUrl(head.name),
    "data-nav": "",
    "aria-label": `Teach ${head.name}`,
    text: head.trained === false ? "Teach and train" : "Teach",
  });
}

function headCard(head) {
  const report = head.metrics || {};
  const card = el("article", { className: "panel head-card", id: `head-${head.name}`, dataset: { head: head.name } });
  card.append(
    el("div", { className: "head-card-title" }, [
      el("h2", {}, [
        head.name,
        " ",
        el("span", { className: "badge badge-type", text: head.type }),
        head.builtin ? el("span", { className: "badge", text: "built-in" }) : null,
        head.trained === false ? el("span", { className: "badge", text: "not trained yet" }) : null,
        typeof head.version === "number" ? el("span", { className: "badge", text: `version ${head.version}` }) : null,
      ]),
      head.builtin ? null : teachLink(head),
    ]),
  );
  if (head.error) {
    card.append(el("p", { className: "error", text: head.error }));
    return card;
  }
  if (head.trained === false) {
    card.append(el("p", { className: "muted", text: `${plural(head.examples || 0, "example")} stored (${head.labels.join(", ") || "no labels"}); train it in the editor.` }));
    return card;
  }
  const overview = el("section", { className: "head-section" }, [
    el("h3", { text: "Overview" }),
    keyValues([
      ["Type", head.type],
      ["Labels", String(head.labels.length)],
      ["Created", head.created_at ? fmtDate(head.created_at) : null],
      ["Examples", report.examples !== undefined ? fmtNumber(report.examples) : null],
      ["Minimum confidence", head.type === "multiclass" ? fmtNumber(head.min_confidence) : null],
      ["Dropped labels", report.dropped_labels && report.dropped_labels.length ? report.dropped_labels.join(", ") : null],
    ]),
  ]);
  const sections = [overview, labelsSection(head)];
  const warnings = warningsSection(report.warnings);
  if (warnings) sections.push(warnings);
  if (report.metrics && Object.keys(report.metrics).length) sections.push(...metricsSections(head, report.metrics));
  const training = [
    ["Initial loss", report.initial_loss !== undefined ? fmtNumber(report.initial_loss) : null],
    ["Expected initial loss", report.expected_initial_loss !== undefined ? fmtNumber(report.expected_initial_loss) : null],
    ["Regularisation C", report.regularisation ? `${fmtNumber(report.regularisation.c)} (${report.regularisation.chosen_by})` : null],
    ["Best epoch", typeof report.best_epoch === "number" ? String(report.best_epoch + 1) : null],
    ["Epochs run", report.epochs_run !== undefined ? String(report.epochs_run) : null],
    ["Training time", typeof report.train_seconds === "number" ? `${report.train_seconds.toFixed(2)} s` : null],
  ];
  if (training.some(([, v]) => v !== null)) {
    sections.push(el("section", { className: "head-section" }, [el("h3", { text: "Training" }), keyValues(training)]));
  }
  card.append(el("div", { className: "head-columns" }, sections));
  const plots = (Array.isArray(report.plots) ? report.plots : []).filter((name) => PLOTS[name]);
  if (plots.length) {
    card.append(
      el("h3", { text: "Plots" }),
      el(
        "div",
        { className: "plots" },
        plots.map((file) => {
          const img = el("img", { alt: `${PLOTS[file]} of head ${head.name}`, loading: "lazy" });
          // By its training's plot set: a version made current meanwhile does not change the image.
          const set = report.plot_set ? `?set=${encodeURIComponent(report.plot_set)}` : "";
          setImage(img, `${headUrl(head.name)}/plots/${file}${set}`, { cache: false });
          return el("figure", { className: "plot" }, [img, el("figcaption", { text: PLOTS[file] })]);
        }),
      ),
    );
  }
  return card;
}

export function initHeads() {
  $("#new-head").addEventListener("click", openNewHead);
  registerView("heads", { title: () => "Heads · lookalike", enter: renderHeads });
}
