// The page at `/`: choose a task, type a text or a pair, show the label with probability bars
// or the score. Talks to /v1/tasks and /v1/predict only; plain DOM, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
let tasks = {};

function headers() {
  const key = $("key").value.trim();
  const result = { "Content-Type": "application/json" };
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

async function call(path, body) {
  const response = await fetch(path, body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (response.status === 401) $("key-row").hidden = false;
  if (!response.ok) throw Object.assign(new Error(data.error || response.statusText),
    { status: response.status });
  return data;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadTasks() {
  try {
    const data = await call("/v1/tasks");
    tasks = Object.fromEntries(data.tasks.map((task) => [task.name, task]));
    $("task").replaceChildren(...data.tasks.map((task) => new Option(
      `${task.name} (${task.pair ? "pair" : "sentence"}, ${task.kind})`, task.name)));
    $("status").hidden = true;
    $("form").hidden = false;
    showError("");
    chooseTask();
  } catch (error) {
    $("form").hidden = true;
    $("status").hidden = false;
    if (error.status === 401) {  // loaded again when a key is typed
      $("status").textContent = "This server needs an API key.";
    } else {  // 503: the model is still loading
      $("status").textContent = "Waiting for the model: " + error.message;
      setTimeout(loadTasks, 1000);
    }
  }
}

function chooseTask() {
  const task = tasks[$("task").value];
  $("text-b-row").hidden = !task.pair;
  $("text-b").required = task.pair;
  $("text-a-label").textContent = task.pair ? "First text" : "Text";
  $("task-info").textContent = task.kind === "regression"
    ? `A score from ${task.label_range[0]} to ${task.label_range[1]}.`
    : `Classes: ${task.labels.join(", ")}.`;
  $("result").hidden = true;
}

function bar(name, fraction, text, top) {
  const row = document.createElement("div");
  row.className = "bar" + (top ? " top" : "");
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = name;
  const track = document.createElement("div");
  track.className = "track";
  const fill = document.createElement("div");
  fill.className = "fill";
  fill.style.width = (100 * Math.min(Math.max(fraction, 0), 1)).toFixed(1) + "%";
  track.append(fill);
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = text;
  row.append(label, track, value);
  return row;
}

function render(task, prediction) {
  const bars = [];
  if (task.kind === "regression") {
    const [low, high] = task.label_range;
    $("answer").textContent = `Score: ${prediction.score.toFixed(2)}`;
    bars.push(bar(`${low} – ${high}`, (prediction.score - low) / (high - low),
      prediction.score.toFixed(2), true));
  } else {
    $("answer").textContent = `Label: ${prediction.label}`;
    for (const [name, p] of Object.entries(prediction.probabilities)) {
      bars.push(bar(name, p, (100 * p).toFixed(1) + "%", name === prediction.label));
    }
  }
  $("bars").replaceChildren(...bars);
  $("result").hidden = false;
}

async function submit(event) {
  event.preventDefault();
  const task = tasks[$("task").value];
  const a = $("text-a").value, b = $("text-b").value;
  $("submit").disabled = true;
  showError("");
  try {
    const data = await call("/v1/predict", { task: task.name, inputs: [task.pair ? [a, b] : a] });
    render(task, data.predictions[0]);
  } catch (error) {
    $("result").hidden = true;
    showError(error.message);
  } finally {
    $("submit").disabled = false;
  }
}

$("task").addEventListener("change", chooseTask);
$("form").addEventListener("submit", submit);
$("key").addEventListener("change", loadTasks);
loadTasks();
