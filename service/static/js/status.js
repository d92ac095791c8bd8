// The index status view: images by status, failures with their reasons, backbone, index type and size.
import { api } from "./api.js";
import { $, el, fmtBytes, fmtNumber } from "./dom.js";
import { keyValues } from "./metrics.js";
import { registerView } from "./router.js";

let statusSeq = 0;

function indexFacts(stats) {
  const index = stats.index || {};
  const approximate =
    index.exact === false
      ? [
          ["Lists probed", `${fmtNumber(index.nprobe)} of ${fmtNumber(index.nlist)}`],
          ["Measured recall@10", `${Number(index.recall_at_10).toFixed(3)} (target ${index.recall_target}, ${index.recall_queries} sampled queries)`],
          [
            "Waiting for compaction",
            `${fmtNumber(index.growing_segment ?? 0)} added, ${fmtNumber(index.tombstones ?? 0)} removed` +
              (index.compacting ? " (compacting in the background now)" : ""),
          ],
        ]
      : index.switch_at
        ? [["Approximate from", `${fmtNumber(index.switch_at)} vectors`]]
        : [];
  return keyValues([
    ["Backbone", stats.backbone || "–"],
    ["Embedding dimension", stats.dimension ? String(stats.dimension) : "–"],
    ["Index type", index.type || "–"],
    ["Search", index.exact === false ? "approximate, re-ranked exactly" : "exact"],
    ...approximate,
    ["Index memory", fmtBytes(index.memory_bytes)],
    ["Metric", index.metric || "–"],
    ["Vectors", fmtNumber(index.vectors ?? 0)],
    ["Generation", String(index.generation ?? 0)],
    ["Index size", fmtBytes(index.bytes)],
    ["Database size", stats.database_bytes === null || stats.database_bytes === undefined ? "–" : fmtBytes(stats.database_bytes)],
    ["Database", stats.database],
    ["Home folder", stats.home],
  ]);
}

function failuresSection(stats) {
  const images = stats.images || {};
  const failures = stats.failures || [];
  return el("section", { className: "panel", "aria-labelledby": "failures-heading" }, [
    el("h2", { id: "failures-heading", text: `Failures (${fmtNumber(images.failed ?? failures.length)})` }),
    failures.length
      ? el(
          "div",
          { className: "table-scroll" },
          el("table", { className: "table failures" }, [
            el("thead", {}, el("tr", {}, [el("th", { scope: "col", text: "File" }), el("th", { scope: "col", text: "Reason" })])),
            el("tbody", {}, failures.map((f) => el("tr", {}, [el("td", { className: "path", text: f.path }), el("td", { text: f.reason })]))),
          ]),
        )
      : el("p", { className: "muted", text: "No file failed." }),
    failures.length && images.failed > failures.length
      ? el("p", { className: "muted", text: `Showing the first ${failures.length}; \`lookalike stats\` lists them all.` })
      : null,
  ]);
}

async function renderStatus() {
  const seq = ++statusSeq;
  const root = $("#status-content");
  root.setAttribute("aria-busy", "true");
  try {
    const stats = await api("/stats");
    if (seq !== statusSeq) return;
    const images = stats.images || {};
    const counts = el(
      "ul",
      { className: "counts", "aria-label": "Images by status" },
      [["indexed", "Indexed"], ...(images.imported ? [["imported", "Imported"]] : []), ["failed", "Failed"], ["total", "Total"]].map(([key, label]) =>
        el("li", { className: `count-card count-${key}`, dataset: { status: key } }, [
          el("span", { className: "count-value", text: fmtNumber(images[key] ?? 0) }),
          el("span", { className: "count-label", text: label }),
        ]),
      ),
    );
    root.replaceChildren(counts, el("section", { className: "panel" }, [el("h2", { text: "Index" }), indexFacts(stats)]), failuresSection(stats));
  } catch (error) {
    if (seq === statusSeq) root.replaceChildren(el("p", { className: "error", text: error.message }));
  } finally {
    if (seq === statusSeq) root.removeAttribute("aria-busy");
  }
}

export function initStatus() {
  $("#status-refresh").addEventListener("click", renderStatus);
  registerView("status", { title: () => "Index status · lookalike", enter: renderStatus });
}
