// A head's report as HTML: labels and thresholds, the evaluation (every figure with its 95%
// interval and what it rests on), the confusion matrix. Used by the heads list and the editor.
import { el, fmtNumber } from "./dom.js";

const METRIC_NAMES = {
  n: "Examples evaluated",
  split: "Split",
  positive: "Positive label",
  threshold: "Threshold",
  accuracy: "Accuracy",
  balanced_accuracy: "Balanced accuracy",
  chance_accuracy: "Chance accuracy",
  precision: "Precision",
  recall: "Recall",
  f1: "F1",
  macro_f1: "Macro F1",
  micro_f1: "Micro F1",
  roc_auc: "ROC AUC",
  map: "mAP",
  chance_map: "Chance mAP",
  folds: "Folds",
};

function humanise(key) {
  if (METRIC_NAMES[key]) return METRIC_NAMES[key];
  const words = String(key).replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

export function keyValues(pairs, className = "meta") {
  return el(
    "dl",
    { className },
    pairs.filter(([, v]) => v !== undefined && v !== null && v !== "").flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]),
  );
}

function fmtMetric(key, value) {
  if (typeof value !== "number") return fmtNumber(value);
  return ["n", "folds", "examples", "positives", "smallest_class"].includes(key) ? fmtNumber(value) : value.toFixed(3);
}

// The headline figure of a version or a head: F1 for binary heads, macro F1 or mAP otherwise.
export function headline(metrics) {
  for (const key of ["f1", "macro_f1", "map", "micro_f1", "accuracy"]) {
    if (typeof metrics?.[key] === "number") return [humanise(key), metrics[key].toFixed(3)];
  }
  return null;
}

export function labelsSection(head) {
  const section = el("section", { className: "head-section head-labels" }, el("h3", { text: "Labels and thresholds" }));
  const thresholds = head.thresholds || [];
  if (head.labels.length > 40) {
    section.append(
      el("details", {}, [el("summary", { text: `${head.labels.length} labels` }), el("p", { className: "label-cloud", text: head.labels.join(", ") })]),
    );
    if (thresholds.length) section.append(el("p", { className: "muted", text: `Thresholds: ${thresholds.map(fmtNumber).join(", ")}` }));
    return section;
  }
  const rows = head.labels.map((label, i) => {
    let role = "";
    let threshold = "–";
    if (head.type === "binary") {
      role = i === head.labels.length - 1 ? "positive" : "negative";
      if (thresholds.length) threshold = i === head.labels.length - 1 ? fmtNumber(thresholds[0]) : `< ${fmtNumber(thresholds[0])}`;
    } else if (thresholds.length === head.labels.length) {
      threshold = fmtNumber(thresholds[i]);
    }
    return el("tr", {}, [
      el("th", { scope: "row", text: label }),
      head.type === "binary" ? el("td", { text: role }) : null,
      el("td", { className: "num", text: threshold }),
    ]);
  });
  section.append(
    el("table", { className: "table" }, [
      el(
        "thead",
        {},
        el("tr", {}, [
          el("th", { scope: "col", text: "Label" }),
          head.type === "binary" ? el("th", { scope: "col", text: "Role" }) : null,
          el("th", { scope: "col", text: head.type === "binary" ? "Score threshold (positive)" : "Threshold" }),
        ]),
      ),
      el("tbody", {}, rows),
    ]),
  );
  return section;
}

// The evaluation as sections: scalar metrics, then the confusion matrix or per-label tables.
export function metricsSections(head, metrics) {
  const scalars = [];
  const extra = [];
  const intervals = metrics.ci95 || {};
  for (const [key, value] of Object.entries(metrics)) {
    if (key === "curves" || key === "ci95") continue;
    if (key === "confusion_matrix" && Array.isArray(value)) {
      extra.push(el("section", { className: "head-section" }, [el("h3", { text: "Confusion matrix" }), confusionTable(head, value)]));
    } else if (value && typeof value === "object" && !Array.isArray(value)) {
      const rows = Object.entries(value).map(([k, v]) =>
        el("tr", {}, [
          el("th", { scope: "row", text: k }),
          el("td", { className: "num", text: typeof v === "object" && v !== null ? JSON.stringify(v) : fmtMetric(key, v) }),
        ]),
      );
      extra.push(el("section", { className: "head-section" }, [el("h3", { text: humanise(key) }), el("table", { className: "table" }, el("tbody", {}, rows))]));
    } else {
      let text = Array.isArray(value) ? value.map((v) => fmtMetric(key, v)).join(", ") : fmtMetric(key, value);
      const ci = intervals[key];
      if (Array.isArray(ci) && ci.length === 2) text += ` (95% CI ${ci[0].toFixed(3)}–${ci[1].toFixed(3)})`;
      scalars.push([key, text]);
    }
  }
  const table = el("table", { className: "table metrics" }, [
    el(
      "tbody",
      {},
      scalars.map(([key, text]) => el("tr", { dataset: { metric: key } }, [el("th", { scope: "row", text: humanise(key) }), el("td", { className: "num", text })])),
    ),
  ]);
  return [el("section", { className: "head-section head-metrics" }, [el("h3", { text: "Evaluation" }), table]), ...extra];
}

function confusionTable(head, matrix) {
  const labels = matrix.length === head.labels.length ? head.labels : matrix.map((_, i) => String(i));
  return el("table", { className: "table confusion" }, [
    el("caption", { text: "Rows: true label; columns: predicted." }),
    el("thead", {}, el("tr", {}, [el("td"), ...labels.map((label) => el("th", { scope: "col", text: label }))])),
    el(
      "tbody",
      {},
      matrix.map((row, i) =>
        el("tr", {}, [
          el("th", { scope: "row", text: labels[i] }),
          ...row.map((n, j) => el("td", { className: `num${i === j ? " diagonal" : ""}`, text: fmtNumber(n) })),
        ]),
      ),
    ),
  ]);
}

export function warningsSection(warnings) {
  if (!Array.isArray(warnings) || !warnings.length) return null;
  // Few examples, unreachable precision targets: what the figures rest on.
  return el("section", { className: "head-section head-warnings" }, [el("h3", { text: "Warnings" }), el("ul", {}, warnings.map((text) => el("li", { text })))]);
}
