// The page for people: pick or drop images, see each one's top labels. Same origin, no external assets.
"use strict";

let limits = { max_upload_bytes: 20 * 1024 * 1024, max_images_per_request: 16, top_k: 5 };
let model = null; // the model picked; null: the server's only (or first ready) model
let precision = ""; // the precision target to abstain under; "": always answer

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

function query(params) {
  const search = new URLSearchParams(params);
  if (model) search.set("model", model);
  return search.toString() ? `?${search}` : "";
}

function showPicker(models, current) {
  const select = document.getElementById("model");
  const ready = models.filter((m) => m.default_version !== null);
  document.getElementById("picker").hidden = ready.length < 2;
  select.replaceChildren(...ready.map((m) => {
    const option = el("option", { value: m.name }, `${m.name} (version ${m.default_version})`);
    option.selected = m.name === current;
    return option;
  }));
}

function showAbstain(calibration) {
  // The model's calibrated precision targets: answers under the target's confidence threshold abstain.
  const usable = calibration ? calibration.thresholds.filter((t) => t.confidence !== null) : [];
  document.getElementById("abstain").hidden = !usable.length;
  const select = document.getElementById("precision");
  select.replaceChildren(el("option", { value: "" }, "always"), ...usable.map((t) => el("option",
    { value: String(t.precision) },
    `or abstain under ${(100 * t.precision).toFixed(0)}% precision (answers ${(100 * t.coverage).toFixed(0)}% of held-out images)`)));
  if (!usable.some((t) => String(t.precision) === precision)) precision = "";
  select.value = precision;
}

function showRollout(rollout) {
  // The model's rollout (a new version measured against the serving one), from the card; text only.
  const box = document.getElementById("rollout");
  box.hidden = !rollout;
  if (!rollout) return box.replaceChildren();
  const lines = [];
  if (rollout.stage) {
    const by = rollout.decide === "external" ? "a controller decides" : "this server decides";
    lines.push(el("p", { class: "stage" }, rollout.stage === "promoted"
      ? `Rollout: version ${rollout.candidate} promoted over version ${rollout.serving} (grace period; ${by})`
      : `Rollout: version ${rollout.candidate} in ${rollout.stage} against version ${rollout.serving} (${by})`));
    lines.push(el("p", { class: "muted" }, rollout.status));
  } else {
    lines.push(el("p", { class: "stage" }, "Rollout: no version being measured"));
  }
  const last = (rollout.decisions || []).at(-1);
  if (last) {
    const when = new Date(1000 * last.at).toLocaleString();
    lines.push(el("p", { class: "muted decision" },
      `Last decision: ${last.action} version ${last.version} by ${last.by} (${when}): ${last.reason}`));
  }
  box.replaceChildren(...lines);
}

async function loadCard() {
  const response = await fetch(`/${query({})}`, { headers: { Accept: "application/json" }, cache: "no-store" });
  const info = await response.json();
  if (!response.ok) throw new Error(info.detail);
  limits = info.limits || limits;
  if ((info.models || []).length > 1) model = info.name; // with several, every request names its model
  showPicker(info.models || [], info.name);
  showAbstain(info.calibration);
  showRollout(info.rollout || null);
  document.getElementById("model-name").textContent = `${info.name} · version ${info.version}`;
  const parity = info.parity[info.variant];
  const agreement = parity ? ` · top-1 agreement with fp32 ${(100 * parity.top1_agreement).toFixed(1)}%` : "";
  document.getElementById("model-card").textContent =
    `${info.num_labels} labels · ${info.image_size} px · ${info.variant} graph on ${info.runtime}${agreement}`;
  document.getElementById("model-card").title = info.variant_reason;
  document.getElementById("limits").textContent =
    `Up to ${limits.max_images_per_request} images at once, each at most ` +
    `${(limits.max_upload_bytes / 1048576).toFixed(0)} MB.`;
}

function card(file) {
  const box = el("article", { class: "card" });
  const image = el("img", { alt: file.name });
  image.src = URL.createObjectURL(file);
  box.append(image, el("p", { class: "name" }, file.name));
  document.getElementById("results").append(box);
  return box;
}

function showPredictions(box, predictions) {
  for (const p of predictions) {
    const row = el("div", { class: "row prediction" });
    const bar = el("div", { class: "bar" });
    const fill = el("span");
    fill.style.width = `${(100 * p.probability).toFixed(1)}%`;
    bar.append(fill);
    row.append(el("span", { class: "label" }, p.label), bar, el("span", {}, `${(100 * p.probability).toFixed(1)}%`));
    box.append(row);
  }
}

function showError(box, message) {
  box.append(el("p", { class: "error" }, message));
}

async function classify(files) {
  const status = document.getElementById("status");
  document.getElementById("results").replaceChildren();
  if (files.length > limits.max_images_per_request) {
    status.textContent = `Only the first ${limits.max_images_per_request} images are sent (the server's limit).`;
    files = files.slice(0, limits.max_images_per_request);
  } else {
    status.textContent = "";
  }
  const boxes = files.map(card);
  const form = new FormData();
  const sent = [];
  files.forEach((file, i) => {
    if (file.size > limits.max_upload_bytes) {
      showError(boxes[i], `Too large: ${file.size} bytes, the limit is ${limits.max_upload_bytes}. Not sent.`);
    } else {
      form.append("file", file, file.name);
      sent.push(boxes[i]);
    }
  });
  if (!sent.length) return;
  status.textContent = "classifying…";
  const params = { top_k: limits.top_k, ...(precision ? { precision } : {}) };
  const response = await fetch(`/classify${query(params)}`, { method: "POST", body: form });
  const body = await response.json();
  if (!response.ok) {
    status.textContent = "";
    sent.forEach((box) => showError(box, `Not classified: ${body.detail}`));
    return;
  }
  status.textContent = `${body.model} version ${body.version}: done in ${Math.round(body.timing.total_ms)} ms`;
  body.results.forEach((result, i) => {
    if (result.error) showError(sent[i], `Not classified: ${result.error.detail}`);
    else {
      if (result.abstained) {
        const top = (100 * result.predictions[0].probability).toFixed(1);
        sent[i].append(el("p", { class: "abstained" },
          `Abstained: confidence ${top}% is under ${(100 * body.min_confidence).toFixed(1)}%`));
      }
      showPredictions(sent[i], result.predictions);
    }
  });
}

function setUp() {
  const input = document.getElementById("files");
  document.getElementById("model").addEventListener("change", (event) => {
    model = event.target.value;
    document.getElementById("results").replaceChildren();
    loadCard().catch((err) => { document.getElementById("model-card").textContent = `model card unavailable: ${err}`; });
  });
  document.getElementById("precision").addEventListener("change", (event) => { precision = event.target.value; });
  const drop = document.getElementById("drop");
  input.addEventListener("change", () => classify(Array.from(input.files)));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    classify(Array.from(event.dataTransfer.files));
  });
  loadCard().catch((err) => { document.getElementById("model-card").textContent = `model card unavailable: ${err}`; });
}

document.addEventListener("DOMContentLoaded", setUp);
