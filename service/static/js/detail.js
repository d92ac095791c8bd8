// One image in a dialog: the original, its metadata, tags with scores and nearest neighbours.
// Any view may open it; "More like this" searches by the image (the search view says how).
import { api, getKey } from "./api.js";
import { $, basename, el, fmtBytes, fmtDate, fmtScore, unique } from "./dom.js";
import { NO_FILE_NOTE, fetchBlob, markBroken, releaseImage, setImage, setThumbnail } from "./images.js";

const DETAIL_SIMILAR_K = 8;
let detailSeq = 0;
let detailId = null;

export function altText(name, tags) {
  const labels = unique((tags || []).slice().sort((a, b) => b.score - a.score).map((t) => t.label)).slice(0, 3);
  return labels.length ? `${name}, tagged ${labels.join(", ")}` : name;
}

export async function openDetail(id, result) {
  const seq = ++detailSeq;
  detailId = String(id);
  const dialog = $("#detail");
  const name = result ? basename(result.path) : `Image ${id}`;
  $("#detail-title").textContent = name;
  dialog.dataset.id = detailId;
  const img = $("#detail-img");
  img.alt = altText(name, result && result.tags);
  const link = $("#detail-file");
  const figure = img.parentElement;
  const noFile = () => {
    img.dataset.src = "";
    img.removeAttribute("src");
    markBroken(img, NO_FILE_NOTE);
    link.hidden = true;
  };
  figure.classList.remove("no-preview");
  link.hidden = false;
  if (result && result.has_file === false) noFile();
  else setImage(img, `/images/${id}/file`, { cache: false });
  link.href = `/images/${id}/file`;
  $("#detail-meta").replaceChildren(el("dd", { className: "muted", text: "Loading…" }));
  $("#detail-tags").replaceChildren(result ? tagTable(result.tags) : el("p", { className: "muted", text: "Loading…" }));
  $("#detail-similar").replaceChildren();
  if (!dialog.open) dialog.showModal();
  dialog.scrollTop = 0;

  if (getKey() && !link.hidden) {
    // A link cannot carry the header either: point it at the blob once the original is loaded.
    fetchBlob(`/images/${id}/file`).then(
      (objectUrl) => {
        if (seq !== detailSeq) return URL.revokeObjectURL(objectUrl);
        if (link.dataset.blob) URL.revokeObjectURL(link.dataset.blob);
        link.dataset.blob = objectUrl;
        link.href = objectUrl;
      },
      () => {},
    );
  }

  api(`/images/${id}`).then(
    (meta) => {
      if (seq !== detailSeq) return;
      $("#detail-title").textContent = basename(meta.path);
      if (meta.status === "imported" && !link.hidden) noFile();
      if (!result) img.alt = altText(basename(meta.path), meta.tags);
      renderMeta(meta);
      if (!result) {
        $("#detail-tags").replaceChildren(
          Array.isArray(meta.tags) ? tagTable(meta.tags) : el("p", { className: "muted", text: "Tags are shown for search results." }),
        );
      }
    },
    (error) => {
      if (seq === detailSeq) $("#detail-meta").replaceChildren(el("dd", { className: "error", text: error.message }));
    },
  );

  try {
    const data = await api(`/images/${id}/similar?k=${DETAIL_SIMILAR_K}`);
    if (seq !== detailSeq) return;
    $("#detail-similar").replaceChildren(...data.results.map((r) => similarCard(r)));
    if (!data.results.length) $("#detail-similar").append(el("li", { className: "muted", text: "No other image." }));
  } catch (error) {
    if (seq === detailSeq) $("#detail-similar").replaceChildren(el("li", { className: "error", text: error.message }));
  }
}

function renderMeta(meta) {
  const rows = [
    ["Id", meta.id],
    ["Path", meta.path],
    ["File size", fmtBytes(meta.size)],
    ["Dimensions", meta.width && meta.height ? `${meta.width} × ${meta.height} px` : "–"],
    ["Format", meta.format || "–"],
    ["Status", meta.status + (meta.error ? `: ${meta.error}` : "")],
    ["Indexed", fmtDate(meta.indexed_at)],
    ["Content hash", meta.content_hash || "–"],
  ];
  $("#detail-meta").replaceChildren(...rows.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: String(value) })]));
}

function tagTable(tags) {
  if (!tags || !tags.length) return el("p", { className: "muted", text: "No tags." });
  const sorted = tags.slice().sort((a, b) => a.head.localeCompare(b.head) || b.score - a.score);
  return el("table", { className: "table tags-table" }, [
    el("thead", {}, el("tr", {}, [el("th", { scope: "col", text: "Head" }), el("th", { scope: "col", text: "Label" }), el("th", { scope: "col", text: "Score" })])),
    el(
      "tbody",
      {},
      sorted.map((tag) =>
        el("tr", {}, [
          el("td", { text: tag.head }),
          el("td", { text: tag.label }),
          el("td", { className: "num" }, [el("meter", { min: 0, max: 1, value: tag.score, "aria-hidden": "true" }), ` ${fmtScore(tag.score)}`]),
        ]),
      ),
    ),
  ]);
}

function similarCard(result) {
  const name = basename(result.path);
  const img = el("img", { alt: altText(name, result.tags), loading: "lazy", width: 128, height: 128 });
  setThumbnail(img, result);
  return el("li", { className: "card card-small", dataset: { id: result.id } }, [
    el(
      "button",
      {
        type: "button",
        className: "card-open",
        "aria-label": `${name}, similarity ${fmtScore(result.score)}: open details`,
        onclick: () => openDetail(result.id, result),
      },
      [img, el("span", { className: "score", text: fmtScore(result.score) })],
    ),
  ]);
}

export function closeDetail() {
  const dialog = $("#detail");
  if (dialog.open) dialog.close();
}

// `moreLikeThis(id)`: what "More like this" in the dialog does.
export function initDetail(moreLikeThis) {
  const detail = $("#detail");
  $("#detail-close").addEventListener("click", () => detail.close());
  $("#detail-more").addEventListener("click", () => detailId && moreLikeThis(detailId));
  detail.addEventListener("click", (event) => {
    if (event.target === detail) detail.close(); // a click on the backdrop
  });
  detail.addEventListener("close", () => {
    detailSeq += 1;
    detailId = null;
    releaseImage($("#detail-img"));
    const link = $("#detail-file");
    if (link.dataset.blob) {
      URL.revokeObjectURL(link.dataset.blob);
      delete link.dataset.blob;
    }
  });
}
