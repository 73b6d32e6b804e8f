// clotho-retrieve's page: search by text, by example clip, or "more like this"; listen to the results.
// Plain JavaScript, no build step, no network beyond this server. Text is set with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search"), qBox = $("q"), indexBox = $("index"), kBox = $("k");
const statusLine = $("status"), list = $("results"), drop = $("drop"), fileInput = $("file");
const template = $("result-template");

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body;
  try {
    body = await response.json();
  } catch (e) {
    throw new Error(`HTTP ${response.status}`);
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function params(extra) {
  const p = new URLSearchParams(extra);
  p.set("k", kBox.value);
  if (indexBox.value) p.set("index", indexBox.value);
  return p;
}

function captionItem(caption) {
  const li = document.createElement("li");
  li.textContent = caption;
  return li;
}

function render(data, title) {
  list.replaceChildren();
  for (const hit of data.results) {
    const item = template.content.firstElementChild.cloneNode(true);
    item.dataset.id = hit.id;
    item.querySelector(".rank").textContent = hit.rank;
    const img = item.querySelector(".thumb img");
    if (hit.thumbnail) img.src = hit.thumbnail;
    else item.querySelector(".thumb").classList.add("none");
    item.querySelector(".file").textContent = hit.file;
    item.querySelector(".score").textContent = hit.score.toFixed(3);
    item.querySelector(".duration").textContent = `${hit.duration.toFixed(1)} s`;
    const captions = item.querySelector(".captions");
    captions.append(...hit.captions.slice(0, 2).map(captionItem));
    if (hit.captions.length > 2) {  // the rest behind a toggle, so a card keeps its height under the mouse
      const more = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = `${hit.captions.length - 2} more caption${hit.captions.length > 3 ? "s" : ""}`;
      const rest = document.createElement("ul");
      rest.append(...hit.captions.slice(2).map(captionItem));
      more.append(summary, rest);
      captions.after(more);
    }
    const audio = item.querySelector("audio");
    if (hit.audio) {
      audio.src = hit.audio;
      item.querySelector(".unavailable").remove();
    } else {
      audio.remove();
    }
    item.querySelector(".more").addEventListener("click", () => moreLike(data.index, hit.id, hit.file));
    list.append(item);
  }
  const n = data.results.length;
  setStatus(`${title}: ${n} result${n === 1 ? "" : "s"} in ${data.took_ms.toFixed(0)} ms`);
  document.body.dataset.kind = data.kind;
}

async function searchText(q, push = true) {
  if (!q.trim()) return;
  setStatus("searching…");
  try {
    const data = await getJSON(`/api/search?${params({ q })}`);
    render(data, `“${data.query}”`);
    if (push) history.pushState({ q }, "", `?${new URLSearchParams({ q })}`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function moreLike(index, id, file) {
  setStatus(`finding sounds like ${file}…`);
  try {
    const p = params({});
    p.delete("index");
    const data = await getJSON(`/api/similar/${encodeURIComponent(index)}/${id}?${p}`);
    render(data, `More like ${file}`);
    window.scrollTo({ top: 0, behavior: "smooth" });
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function searchClip(file) {
  setStatus(`listening to ${file.name}…`);
  const body = new FormData();
  body.append("file", file, file.name);
  try {
    const data = await getJSON(`/api/search/audio?${params({})}`, { method: "POST", body });
    render(data, `Like ${file.name}`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  searchText(qBox.value);
});
fileInput.addEventListener("change", () => {
  if (fileInput.files.length) searchClip(fileInput.files[0]);
  fileInput.value = "";
});
for (const type of ["dragenter", "dragover"]) {
  document.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) drop.classList.remove("over");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) searchClip(file);
});
// one clip plays at a time
document.addEventListener("play", (event) => {
  for (const audio of document.querySelectorAll("audio")) if (audio !== event.target) audio.pause();
}, true);
window.addEventListener("popstate", () => {
  const q = new URLSearchParams(location.search).get("q") || "";
  qBox.value = q;
  searchText(q, false);
});

async function start() {
  try {
    const health = await getJSON("/api/health");
    for (const index of health.indexes) {
      const option = document.createElement("option");
      option.value = index.name;
      option.textContent = `${index.name} (${index.clips.toLocaleString()} clips)`;
      indexBox.append(option);
    }
    indexBox.hidden = health.indexes.length < 2;
    const names = health.indexes.map((i) => `${i.name}: ${i.clips.toLocaleString()} clips`).join(", ");
    const silent = health.indexes.filter((i) => !i.audio).map((i) => i.name);
    setStatus(`${names}${silent.length ? ` (audio unavailable for ${silent.join(", ")})` : ""}`);
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  const q = new URLSearchParams(location.search).get("q");
  if (q) {
    qBox.value = q;
    searchText(q, false);
  }
}
start();
