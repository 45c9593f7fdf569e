// The Agora page: the group list, a group's history, and sending, over the gateway's
// WebSocket (docs/WEB.md). Message text is always put in the page as text, never as HTML.
"use strict";

const socket = new WebSocket(`ws://${location.host}/ws`);
const pending = [];
let current = null;

function call(request) {
  return new Promise((resolve) => {
    pending.push(resolve);
    socket.send(JSON.stringify(request));
  });
}

const lastSeq = {};

socket.addEventListener("message", (event) => {
  const message = JSON.parse(event.data);
  if (message.event) return pushed(message);
  const resolve = pending.shift();
  if (resolve) resolve(message);
});

// A live entry: shown once, in seq order, if it belongs to the open group.
function pushed(message) {
  if (message.event !== "entry") return;
  const { group, entry } = message;
  if (entry.seq <= (lastSeq[group] || 0)) return;
  lastSeq[group] = entry.seq;
  if (group === current && entry.kind === "message") show(entry);
}

function status(text) {
  document.getElementById("status").textContent = text;
}

function show(message) {
  const line = document.createElement("div");
  line.className = "message";
  line.dataset.seq = message.seq;
  const sender = document.createElement("span");
  sender.className = "sender";
  sender.textContent = `${message.sender}: `;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = typeof message.body === "string" ? message.body : JSON.stringify(message.body);
  line.append(sender, text);
  document.getElementById("messages").append(line);
}

async function open(group) {
  current = group;
  document.querySelectorAll("#groups li").forEach((li) => {
    li.classList.toggle("current", li.textContent === group);
  });
  document.getElementById("messages").replaceChildren();
  const reply = await call({ op: "history", group, after_seq: 0 });
  if (!reply.ok) return status(`${group}: ${reply.error}: ${reply.message}`);
  reply.messages.filter((m) => m.kind === "message").forEach(show);
  const last = reply.messages.length ? reply.messages[reply.messages.length - 1].seq : 0;
  lastSeq[group] = Math.max(lastSeq[group] || 0, last);
  // Then live, from where the history ended.
  await call({ op: "follow", group, after_seq: lastSeq[group] });
}

document.getElementById("send").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("text");
  if (!current || !input.value) return;
  const text = input.value;
  input.value = "";
  status("sending…");
  const reply = await call({ op: "send", group: current, text });
  if (!reply.ok) return status(`not sent: ${reply.error}: ${reply.message}`);
  status(`stored as #${reply.ack.seq}`);
});

socket.addEventListener("open", async () => {
  const reply = await call({ op: "groups" });
  if (!reply.ok) return status(`${reply.error}: ${reply.message}`);
  const list = document.getElementById("groups");
  for (const group of reply.groups) {
    const li = document.createElement("li");
    li.textContent = group.name;
    li.addEventListener("click", () => open(group.name));
    list.append(li);
  }
});
