// The meshllm console: polls /console/stats once a second and draws the devices, the layer plan and the
// charts; the chat streams from /v1/chat/completions. Text from the server is only ever set as text.
"use strict";

const POLL_MS = 1000;
const STAGE_COLORS = ["#58a6ff", "#3fb950", "#d2a8ff", "#ffa657", "#79c0ff", "#f778ba", "#a5d6ff", "#e3b341"];
const SVG = "http://www.w3.org/2000/svg";
const KEY_STORE = "meshllm-api-key";

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  locked: false,
  model: "",
  history: [], // the conversation sent with each chat request
  controller: null, // aborts the reply being streamed
};

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return `${(n / 1024 ** i).toFixed(i >= 3 ? 1 : 0)} ${units[i]}`;
}

function stageColor(index) {
  return STAGE_COLORS[index % STAGE_COLORS.length];
}

// ---------------------------------------------------------------------------------------------- polling

// `stale`: the key changed while the request was out, so its answer no longer describes this page.
async function fetchStats() {
  const key = state.key;
  const response = await fetch("/console/stats", { headers: authHeaders(), cache: "no-store" });
  if (response.status === 401) return { refused: key === state.key, stale: key !== state.key };
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return { stats: await response.json(), stale: key !== state.key };
}

async function poll() {
  try {
    const { refused, stats, stale } = await fetchStats();
    if (refused) {
      forgetKey("The key was refused.");
    } else if (!stale) {
      render(stats);
      $("connection").textContent = "";
    }
  } catch (error) {
    $("connection").textContent = `coordinator not answering (${error.message})`;
    $("cluster-status").textContent = "offline";
    $("cluster-status").dataset.status = "degraded";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function forgetKey(message) {
  state.key = "";
  sessionStorage.removeItem(KEY_STORE);
  $("key-error").textContent = message;
}

async function unlock(event) {
  event.preventDefault();
  state.key = $("key-input").value.trim();
  $("key-error").textContent = "";
  try {
    const { refused, stats } = await fetchStats();
    if (refused) {
      forgetKey("The key was refused.");
      $("key-input").select();
      return;
    }
    sessionStorage.setItem(KEY_STORE, state.key);
    $("key-input").value = "";
    render(stats);
  } catch (error) {
    $("key-error").textContent = `The coordinator did not answer: ${error.message}`;
  }
}

// -------------------------------------------------------------------------------------------- rendering

function render(stats) {
  state.locked = stats.locked;
  state.model = stats.model;
  $("model-name").textContent = stats.model;
  $("chat-model").textContent = stats.model;
  const pill = $("cluster-status");
  pill.textContent = stats.cluster_status;
  pill.dataset.status = stats.cluster_status;
  $("live-sequences").textContent = `${stats.live_sequences} live sequence${stats.live_sequences === 1 ? "" : "s"}`;
  $("key-panel").hidden = !stats.locked;
  $("chat-send").disabled = stats.locked || state.controller !== null;
  renderDevices(stats.devices);
  renderLayers(stats.devices, stats.num_layers);
  renderCharts(stats.series, stats.devices);
}

function renderDevices(devices) {
  const cards = devices.map((device, index) => {
    const card = element("article", "device");
    card.dataset.name = device.name;
    card.dataset.status = device.status;
    card.style.setProperty("--stage-color", stageColor(index));
    card.append(element("h3", "", device.name), element("div", "role", `stage ${device.device_id} · ${device.role}`));
    const used = device.memory_total - device.memory_available;
    const rows = [
      ["status", device.status, "status"],
      ["host", device.address === "local" ? device.hostname : `${device.hostname} (${device.address})`],
      ["engine", `${device.engine} · ${device.device_type}${device.quantize ? ` · ${device.quantize}` : ""}`],
      ["layers", `[${device.layers[0]}, ${device.layers[1]})`],
      ["memory", `${bytes(used)} used of ${bytes(device.memory_total)}`],
      ["weights", bytes(device.weight_bytes)],
      ["sequences", String(device.live_sequences)],
      ["round trip", device.rtt_ms === null ? "—" : `${device.rtt_ms.toFixed(1)} ms`],
    ];
    const list = element("dl");
    for (const [label, value, className] of rows) {
      const dd = element("dd", className || "", value);
      if (label === "memory" && device.memory_total > 0) {
        const meter = element("div", "meter");
        const fill = element("div");
        fill.style.width = `${Math.min(100, (100 * used) / device.memory_total).toFixed(1)}%`;
        meter.append(fill);
        dd.append(meter);
      }
      list.append(element("dt", "", label), dd);
    }
    card.append(list);
    if (device.error) card.append(element("div", "error", device.error));
    return card;
  });
  $("devices").replaceChildren(...cards);
}

function renderLayers(devices, numLayers) {
  $("layer-count").textContent = numLayers ? `(${numLayers} in all)` : "";
  const segments = devices.map((device, index) => {
    const [start, end] = device.layers;
    const segment = element("div", device.status === "healthy" ? "segment" : "segment down");
    segment.dataset.name = device.name;
    segment.style.flexGrow = String(Math.max(1, end - start));
    segment.style.setProperty("--stage-color", stageColor(index));
    segment.title = `${device.name}: layers [${start}, ${end}) · ${device.status}`;
    segment.append(element("span", "", device.name), element("span", "range", `${start}–${end}`));
    return segment;
  });
  $("layer-bar").replaceChildren(...segments);
}

// ----------------------------------------------------------------------------------------------- charts

function svgNode(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 2.5, 5, 10].map((step) => step * power).find((candidate) => candidate >= value);
}

// lines: [{values: [number|null], color}] over `seconds` seconds ending now.
function drawChart(svg, lines, seconds, emptyText) {
  const [width, height] = [svg.viewBox.baseVal.width, svg.viewBox.baseVal.height];
  const [left, right, top, bottom] = [44, 8, 8, 20];
  const plotWidth = width - left - right;
  const plotHeight = height - top - bottom;
  const top_value = niceMax(Math.max(0, ...lines.flatMap((line) => line.values.filter((v) => v !== null))));
  const x = (i) => left + (plotWidth * i) / Math.max(1, seconds - 1);
  const y = (v) => top + plotHeight * (1 - v / top_value);
  const nodes = [];
  for (const fraction of [0, 0.5, 1]) {
    const value = top_value * fraction;
    nodes.push(svgNode("line", { class: "grid", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
    const label = value >= 100 ? value.toFixed(0) : String(+value.toPrecision(3));
    nodes.push(svgNode("text", { class: "axis", x: left - 6, y: y(value) + 4, "text-anchor": "end" }, label));
  }
  for (let minute = Math.floor(seconds / 60); minute >= 0; minute -= 1) {
    const i = seconds - 1 - minute * 60;
    const text = minute === 0 ? "now" : `−${minute} min`;
    nodes.push(svgNode("text", { class: "axis", x: x(i), y: height - 4, "text-anchor": minute === 0 ? "end" : "middle" }, text));
  }
  let drawn = false;
  for (const line of lines) {
    let path = "";
    let previous = null;
    line.values.forEach((value, i) => {
      if (value === null) {
        previous = null;
        return;
      }
      path += `${previous === null ? "M" : "L"}${x(i).toFixed(1)},${y(value).toFixed(1)}`;
      if (previous === null && (i + 1 >= line.values.length || line.values[i + 1] === null)) {
        nodes.push(svgNode("circle", { cx: x(i), cy: y(value), r: 2.2, fill: line.color })); // a lone point
      }
      previous = value;
      drawn = true;
    });
    if (path) {
      const attributes = { class: "line", d: path, stroke: line.color };
      if (line.dashed) attributes["stroke-dasharray"] = "4 3";
      nodes.push(svgNode("path", attributes));
    }
  }
  if (!drawn) {
    nodes.push(svgNode("text", { class: "placeholder", x: left + plotWidth / 2, y: top + plotHeight / 2, "text-anchor": "middle" }, emptyText));
  }
  svg.replaceChildren(...nodes);
}

function latest(values, within) {
  for (let i = values.length - 1; i >= Math.max(0, values.length - within); i -= 1) {
    if (values[i] !== null) return values[i];
  }
  return null;
}

// A stage's step times in its card's colour; the round trip through the workers ("remote chain") grey.
function stepColor(name, devices) {
  const index = devices.findIndex((device) => device.name === name);
  return index >= 0 ? stageColor(index) : "#8b98a5";
}

function renderCharts(series, devices) {
  const charts = [$("chart-tokens"), $("chart-ttft"), $("chart-steps")];
  if (!series) {
    for (const svg of charts) drawChart(svg, [], 300, "the API key unlocks the charts");
    $("steps-legend").replaceChildren();
    return;
  }
  $("window-minutes").textContent = String(Math.round(series.seconds / 60));
  const tokens = series.tokens_per_second;
  const idle = "nothing generated in this window";
  drawChart(charts[0], [{ values: tokens, color: "#79c0ff" }], series.seconds, idle);
  const recentTokens = tokens.slice(-5);
  $("now-tokens").textContent = `${(recentTokens.reduce((a, b) => a + b, 0) / recentTokens.length).toFixed(1)} (last 5 s)`;
  drawChart(charts[1], [{ values: series.time_to_first_token_ms, color: "#ffa657" }], series.seconds, "no request in this window");
  const lastTtft = latest(series.time_to_first_token_ms, series.seconds);
  $("now-ttft").textContent = lastTtft === null ? "" : `${lastTtft.toFixed(0)} ms last`;
  const names = Object.keys(series.stage_step_ms);
  const lines = names.map((name) => ({
    values: series.stage_step_ms[name],
    color: stepColor(name, devices),
    dashed: !devices.some((device) => device.name === name),
  }));
  drawChart(charts[2], lines, series.seconds, "no step in this window");
  $("steps-legend").replaceChildren(
    ...names.map((name, index) => {
      const label = element("span", "", `■ ${name}`);
      label.style.color = lines[index].color;
      return label;
    }),
  );
}

// ------------------------------------------------------------------------------------------------- chat

function addMessage(role, text) {
  const node = element("div", `message ${role}`, text);
  $("chat-log").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function setStreaming(streaming) {
  $("chat-stop").disabled = !streaming;
  $("chat-send").disabled = streaming || state.locked;
}

function chatBody() {
  const body = { messages: state.history, stream: true, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || state.controller || state.locked) return;
  $("chat-input").value = "";
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const content = element("span", "content");
  reply.append(content);
  reply.dataset.state = "streaming";
  reply.dataset.chunks = "0";
  state.controller = new AbortController();
  setStreaming(true);
  const started = performance.now();
  let firstAt = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(chatBody()),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const eventText = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of eventText.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta.content : "";
          if (delta) {
            if (firstAt === null) firstAt = performance.now();
            content.textContent += delta;
            reply.dataset.chunks = String(Number(reply.dataset.chunks) + 1);
            reply.scrollIntoView({ block: "end" });
          }
        }
      }
    }
    reply.dataset.state = "done";
  } catch (error) {
    if (error.name === "AbortError") {
      reply.dataset.state = "stopped";
    } else {
      reply.dataset.state = "error";
      reply.classList.add("error");
      reply.append(element("span", "info", error.message));
    }
  } finally {
    if (reply.dataset.state === "error" && !content.textContent) {
      state.history.pop(); // nothing came back: the message can be sent again as it was
    } else {
      state.history.push({ role: "assistant", content: content.textContent });
    }
    const seconds = (performance.now() - started) / 1000;
    const facts = [];
    if (firstAt !== null) facts.push(`first token ${((firstAt - started) / 1000).toFixed(2)} s`);
    if (usage) facts.push(`${usage.completion_tokens} tokens, ${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
    if (reply.dataset.state === "stopped") facts.push("stopped");
    if (facts.length) reply.append(element("span", "info", facts.join(" · ")));
    state.controller = null;
    setStreaming(false);
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function clearChat() {
  stop();
  state.history = [];
  $("chat-log").replaceChildren();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-panel").addEventListener("submit", unlock);
  $("chat-form").addEventListener("submit", send);
  $("chat-stop").addEventListener("click", stop);
  $("chat-clear").addEventListener("click", clearChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  poll();
});
