// The chat page: keeps the conversation here, sends it to /v1/chat/completions with
// stream=true and shows the answer as its server-sent events arrive. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
let messages = [];   // the OpenAI messages so far
let pending = [];    // data: URLs of images attached to the next question

fetch("/v1/models").then((r) => r.json()).then((m) => { $("model").textContent = m.data[0].id; });

function bubble(role, text, images) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("log").appendChild(div);
  return span;
}

$("images").addEventListener("change", async (ev) => {
  for (const file of ev.target.files) {
    const url = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
    pending.push(url);
    const img = document.createElement("img");
    img.src = url;
    $("thumbs").appendChild(img);
  }
  ev.target.value = "";
  $("status").textContent = pending.length + " image(s) attached";
});

$("reset").addEventListener("click", () => {
  messages = [];
  pending = [];
  $("log").textContent = "";
  $("thumbs").textContent = "";
  $("status").textContent = "ready";
});

// Parses server-sent events out of a fetch body; calls onData(json) for every data line.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question && !pending.length) return;
  const content = pending.map((url) => ({ type: "image_url", image_url: { url } }));
  content.push({ type: "text", text: question });
  bubble("user", question, pending);
  messages.push({ role: "user", content });
  pending = [];
  $("thumbs").textContent = "";
  $("question").value = "";
  $("send").disabled = true;
  $("status").textContent = "answering…";
  const out = bubble("assistant", "");
  out.parentElement.id = "answer-" + messages.length;
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        messages, stream: true,
        max_tokens: Number($("max_tokens").value),
        temperature: Number($("temperature").value),
      }),
    });
    if (!response.ok) {
      const body = await response.json();
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    let reason = null;
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          out.textContent = answer;
        }
        if (choice.finish_reason) reason = choice.finish_reason;
      }
    });
    messages.push({ role: "assistant", content: answer });
    out.parentElement.dataset.finish = reason || "";
    $("status").textContent = "done (" + reason + ")";
  } catch (err) {
    messages.pop();
    out.parentElement.classList.add("error");
    out.textContent = "error: " + err.message;
    $("status").textContent = "error";
  } finally {
    $("send").disabled = false;
  }
});
