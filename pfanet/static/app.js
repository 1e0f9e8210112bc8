// PFANet web page: send the chosen image to POST predict/all once, show map, mask and cut-out, offer each for download.
// Everything stays on this server: no other origin is contacted (the page's Content-Security-Policy enforces it).
"use strict";

const KINDS = ["map", "mask", "cutout"];
const SUFFIX = { map: "", mask: "_mask", cutout: "_cutout" };  // the same file names as `pfanet predict`

const $ = (id) => document.getElementById(id);
let lastFile = null;
let urls = [];  // object URLs of the shown results, revoked when replaced

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function pngBlob(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function errorText(body, status) {
  const detail = body && body.detail;
  if (Array.isArray(detail)) return detail.map((d) => d.msg).join("; ");  // FastAPI's parameter errors
  return detail || `the server answered ${status}`;
}

async function predict(file) {
  lastFile = file;
  const form = new FormData();
  form.append("file", file);
  const query = new URLSearchParams({ outputs: KINDS.join(",") });
  if (!$("adaptive").checked) query.set("threshold", $("threshold").value);

  setStatus(`Working on ${file.name || "the image"}…`);
  document.body.classList.add("busy");
  try {
    const response = await fetch(`predict/all?${query}`, { method: "POST", body: form });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      setStatus(`Could not process ${file.name || "the image"}: ${errorText(body, response.status)}`, true);
      return;
    }
    show(file, body);
  } catch (err) {
    setStatus(`Could not reach the server: ${err.message}`, true);
  } finally {
    document.body.classList.remove("busy");
  }
}

function show(file, body) {
  urls.forEach((u) => URL.revokeObjectURL(u));
  urls = [];
  const stem = (file.name || "image").replace(/\.[^.]*$/, "") || "image";
  const input = URL.createObjectURL(file);
  urls.push(input);
  $("img-input").src = input;
  for (const kind of KINDS) {
    const url = URL.createObjectURL(pngBlob(body.images[kind]));
    urls.push(url);
    $(`img-${kind}`).src = url;
    $(`dl-${kind}`).href = url;
    $(`dl-${kind}`).download = `${stem}${SUFFIX[kind]}.png`;
  }
  $("results").hidden = false;
  setStatus(`${body.width} × ${body.height} pixels · mask threshold ${body.threshold.toFixed(1)}`);
}

function firstImage(files) {
  return Array.from(files || []).find((f) => f.type.startsWith("image/") || f.type === "") || null;
}

function init() {
  const drop = $("drop");
  const api = new URL("predict?output=cutout", location.href);
  $("curl").textContent = `curl -F file=@photo.jpg "${api}" -o cutout.png`;
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) predict(file);
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = firstImage(e.dataTransfer.files);
    if (file) predict(file); else setStatus("That was not an image file.", true);
  });
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.files);
    if (file) predict(file);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  $("adaptive").addEventListener("change", () => {
    $("threshold").disabled = $("adaptive").checked;
    if (lastFile) predict(lastFile);
  });
  $("threshold").addEventListener("input", () => { $("threshold-value").value = $("threshold").value; });
  $("threshold").addEventListener("change", () => { if (lastFile) predict(lastFile); });
}

init();
