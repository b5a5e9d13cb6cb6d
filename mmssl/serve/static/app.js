// The search page of `mmssl serve`: plain JavaScript, no library, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let recorder = null;
let chunks = [];

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function about() {
  const info = await (await fetch("/health")).json();
  const m = info.model, ix = info.index;
  const step = m.step == null ? "" : ` (step ${m.step})`;
  $("about").textContent =
    `model ${m.run}${step}, ${m.dim}-d · index ${ix.folder}: ${ix.images} images, ` +
    `${ix.captions} spoken captions · ${ix.search} search`;
  $("text-form").hidden = !m.text_queries;
  $("k").max = info.limits.max_k;
}

function k() {
  return Math.max(1, parseInt($("k").value, 10) || 8);
}

function show(answer) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of answer.results) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.src = "/items/" + encodeURIComponent(hit.id);
    img.alt = hit.id;
    const head = document.createElement("div");
    head.className = "head";
    head.innerHTML = `<span>#${hit.rank}</span><span class="score">${hit.score.toFixed(3)}</span>`;
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = hit.id;
    const list = document.createElement("ul");
    for (const c of hit.captions) {
      const li = document.createElement("li");
      const play = document.createElement("button");
      play.type = "button";
      play.textContent = "▶";
      play.title = "play the spoken caption";
      play.onclick = () => new Audio("/items/" + encodeURIComponent(c.id)).play();
      const text = document.createElement("span");
      text.textContent = c.text || c.id;
      li.append(play, text);
      list.append(li);
    }
    card.append(img, head, id, list);
    grid.append(card);
  }
  const t = answer.timing_ms;
  const what = answer.query.name ? `${answer.query.name} (${answer.query.seconds} s)` : `“${answer.query.text}”`;
  let line = `${answer.results.length} images for ${what} in ${t.total.toFixed(0)} ms ` +
    `(embedding ${t.embed.toFixed(0)} ms, search ${t.search.toFixed(2)} ms)`;
  if (answer.warnings.length) line += " · " + answer.warnings.join("; ");
  status(line, false);
}

async function post(url, options) {
  status("searching…", false);
  try {
    const response = await fetch(url, { method: "POST", ...options });
    const body = await response.json();
    if (!response.ok) {
      status(`${response.status}: ${body.error}`, true);
      return;
    }
    show(body);
  } catch (err) {
    status(`the server did not answer: ${err}`, true);
  }
}

function searchAudio(blob, name) {
  const form = new FormData();
  form.append("file", blob, name);
  form.append("k", k());
  return post("/search/audio", { body: form });
}

$("audio-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) {
    status("choose an audio file first", true);
    return;
  }
  searchAudio(file, file.name);
});
$("file").addEventListener("change", () => {
  if ($("file").files[0]) $("search-file").click();
});

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  post("/search/text", {
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text, k: k() }),
  });
});

$("record").addEventListener("click", async () => {
  if (recorder && recorder.state === "recording") {
    recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    status("this browser cannot record here (recording needs localhost or https)", true);
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    recorder = new MediaRecorder(stream);
    chunks = [];
    recorder.ondataavailable = (e) => chunks.push(e.data);
    recorder.onstop = () => {
      stream.getTracks().forEach((track) => track.stop());
      $("record").classList.remove("on");
      $("record").textContent = "● Record";
      const type = recorder.mimeType || "audio/webm";
      searchAudio(new Blob(chunks, { type }), "recording." + (type.includes("ogg") ? "ogg" : "webm"));
    };
    recorder.start();
    $("record").classList.add("on");
    $("record").textContent = "■ Stop";
    status("recording… press Stop to search", false);
  } catch (err) {
    status(`no microphone: ${err.message || err}`, true);
  }
});

about().catch((err) => status(`cannot reach the server: ${err}`, true));
