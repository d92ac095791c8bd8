// Images: a plain URL without a key; with one, fetched with the header and shown as a blob: URL
// (an <img> cannot send headers). Thumbnails are cached as blobs, least recently used first out.
import { ApiError, errorMessage, getKey, request } from "./api.js";

const blobCache = new Map(); // url -> Promise<object URL>, least recently used first
const BLOB_CACHE_SIZE = 400;

export const NO_FILE_NOTE = "Imported: the file is on another host";

function cachedBlob(url) {
  let promise = blobCache.get(url);
  if (promise) {
    blobCache.delete(url);
    blobCache.set(url, promise);
    return promise;
  }
  promise = fetchBlob(url);
  promise.catch(() => blobCache.delete(url));
  blobCache.set(url, promise);
  while (blobCache.size > BLOB_CACHE_SIZE) {
    const [oldest, old] = blobCache.entries().next().value;
    blobCache.delete(oldest);
    old.then((objectUrl) => URL.revokeObjectURL(objectUrl), () => {});
  }
  return promise;
}

export function forgetBlobs() {
  for (const promise of blobCache.values()) promise.then((u) => URL.revokeObjectURL(u), () => {});
  blobCache.clear();
}

export async function fetchBlob(url) {
  const response = await request(url);
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return URL.createObjectURL(await response.blob());
}

// A thumbnail that cannot be shown (an imported row whose file lives on another host, a file
// deleted since indexing) leaves a labelled tile instead of a blank square.
export function markBroken(img, note = "No preview") {
  img.classList.add("broken");
  if (img.parentElement) {
    img.parentElement.classList.add("no-preview");
    img.parentElement.dataset.note = note;
  }
}

// Search results say which rows have no file here; asking for their thumbnails would only 404.
export function setThumbnail(img, result) {
  if (result.has_file === false) {
    img.dataset.src = "";
    img.removeAttribute("src");
    queueMicrotask(() => markBroken(img, NO_FILE_NOTE)); // once the card holds it
  } else {
    setImage(img, thumbnailUrl(result.id));
  }
}

export const thumbnailUrl = (id) => `/images/${id}/thumbnail`;

// cache=false: large originals, one at a time; the previous blob of that <img> is released.
export function setImage(img, url, { cache = true } = {}) {
  img.dataset.src = url;
  img.classList.remove("broken");
  img.parentElement?.classList.remove("no-preview");
  releaseImage(img, { keepSrc: true });
  const viaBlob = () => {
    const promise = cache ? cachedBlob(url) : fetchBlob(url);
    promise.then(
      (objectUrl) => {
        if (img.dataset.src !== url) {
          if (!cache) URL.revokeObjectURL(objectUrl);
          return;
        }
        if (!cache) img.dataset.ownBlob = objectUrl;
        img.src = objectUrl;
      },
      () => markBroken(img),
    );
  };
  if (getKey()) {
    img.onerror = () => markBroken(img);
    viaBlob();
  } else {
    // Without a key a refused image is retried through request(), which asks for one.
    img.onerror = () => {
      img.onerror = () => markBroken(img);
      if (img.dataset.src === url) viaBlob();
    };
    img.src = url;
  }
}

// Lets go of the blob an <img> owns (an original shown with cache=false).
export function releaseImage(img, { keepSrc = false } = {}) {
  if (img.dataset.ownBlob) {
    URL.revokeObjectURL(img.dataset.ownBlob);
    delete img.dataset.ownBlob;
  }
  if (!keepSrc) {
    img.dataset.src = "";
    img.removeAttribute("src");
  }
}
