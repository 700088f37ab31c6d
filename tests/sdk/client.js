#!/usr/bin/env node
// One pusher-js 8 connection (optionally driven through Laravel Echo 2),
// scripted by a Rust test over JSON lines: commands on stdin, what the SDK
// observes on stdout. Used through tests/common/sdk.rs (`SdkClient`).
//
// pusher-js under Node: `require('pusher-js')` resolves to its Node build
// (dist/node/pusher.js, the `main` of its package.json). That build bundles
// its own WebSocket client (faye-websocket), so no `ws` package is needed,
// and it exports the class with tweetnacl wired in, so `private-encrypted-`
// channels work. laravel-echo 2 is ESM-only in practice (its CommonJS file
// is loaded as a module because the package says "type": "module"), so it is
// loaded with `import()`.
//
// Commands (one JSON object per line; unknown fields are ignored):
//   {"op":"connect","port":P,"key":K,"secret":S}     one connection per process
//       optional: "host" (127.0.0.1), "appId" ("1"), "user" (default presence
//       channel_data), "signin_user" ({"id":"1","user_info":{},"watchlist":[]}),
//       "encryptionMasterKeyBase64", "raw" (also print every frame),
//       "debug" (pusher-js logs to stderr), "options" (extra pusher-js options,
//       e.g. {"activityTimeout":1000,"pongTimeout":1000})
//   {"op":"subscribe","channel":"presence-x","user":{"user_id":"1","user_info":{}}}
//       optional, to provoke errors: "auth" (sent instead of the signature),
//       "channel_data" (string or object, sent instead), "auth_error"
//       (the auth handler fails with this message; nothing is sent)
//   {"op":"unsubscribe","channel":"x"}
//   {"op":"trigger_client","channel":"private-x","event":"client-x","data":{}}
//   {"op":"signin","user":{"id":"1","user_info":{}}}   pusher.signin()
//   {"op":"members","channel":"presence-x"}            the SDK's member list now
//   {"op":"info"}                                      state, socket_id, channels
//   {"op":"send_raw","data":"text"}  a text frame on the SDK's socket as is;
//       with "binary":true the data (a string) goes as a binary frame
//   {"op":"disconnect"}   pusher.disconnect()      {"op":"reconnect"}   pusher.connect()
//   {"op":"echo","kind":"channel|private|encryptedPrivate|join","name":"orders",
//       "listen":["OrderShipped",".raw-name"],"listen_whisper":["typing"],
//       "user":{...},"namespace":"App.Events"}  (namespace: first echo op only)
//   {"op":"whisper","kind":"private|join","name":"x","event":"typing","data":{}}
//   {"op":"echo_leave","name":"orders"}
//   {"op":"exit"}
//
// Output lines (every line is one JSON object with a "type"):
//   ready          {pusher_js, laravel_echo, pusher_http_node, node}, first line
//   state          {previous, current, socket_id (when connected, else null)};
//                  the first one (previous null) is the state right after
//                  construction, which has already begun connecting
//   retry_in       {seconds}: pusher-js will reconnect by itself after this
//   open           {url}: the WebSocket opened (the URL pusher-js chose)
//   closed         {code, reason, was_clean}: the WebSocket's close event, as
//                  the socket saw it (this is where a 4xxx close code shows)
//   pusher_error   {code, message, channel}: a pusher:error frame arrived
//                  (also during the handshake, which pusher-js hides)
//   pong           {}: a pusher:pong frame arrived (the answer to a
//                  pusher:ping sent with send_raw: everything sent before
//                  it has been handled by the server)
//   error          {error}: pusher-js's connection 'error' event, serialised
//   ws_error       {message}: the socket's own error event
//   subscribed     {channel, members, me, count}: subscription succeeded;
//                  members {id: info} and me {id, info} on presence channels
//   subscription_error {channel, error_type, error, status, data}
//   event          {channel, event, data, user_id}: whatever the channel
//                  emits, incl. pusher:member_added / pusher:member_removed
//                  (data {id, info}), pusher:cache_miss, client events
//   signed_in      {user_data}: pusher:signin_success
//   user_event     {event, data}: an event sent to the signed-in user
//   watchlist      {event, data}: online/offline from the user's watchlist
//   members        {channel, count, members, me}: answer to "members"
//   info           {state, socket_id, channels}: answer to "info"
//   client_triggered {channel, event, sent}
//   echo           {channel, what: event|whisper|subscribed|error|here|joining|leaving,
//                  listener, data}
//   frame          {dir: in|out, data}: with "raw"
//   op_error       {op, error}: a command failed in the driver or the SDK
"use strict";

const fs = require("fs");
const path = require("path");
const readline = require("readline");
const util = require("util");

// stdout carries only our JSON lines: anything a library prints goes to
// stderr (the test inherits it).
for (const k of ["log", "info", "warn", "error", "debug", "trace"]) {
  console[k] = (...args) => process.stderr.write(util.format(...args) + "\n");
}

const Pusher = require("pusher-js");
const PusherServer = require("pusher");

function versionOf(pkg) {
  const file = path.join(__dirname, "node_modules", pkg, "package.json");
  return JSON.parse(fs.readFileSync(file, "utf8")).version;
}

// Makes SDK values (Members, errors, socket events) JSON-safe.
function plain(value, depth = 0, seen = new WeakSet()) {
  if (value === undefined || typeof value === "function") return null;
  if (value === null || typeof value !== "object") return value;
  if (seen.has(value) || depth > 6) return "[…]";
  seen.add(value);
  if (value instanceof Error) {
    return { name: value.name, message: value.message, code: value.code ?? null };
  }
  if (Buffer.isBuffer(value)) return value.toString("utf8");
  if (Array.isArray(value)) return value.map((v) => plain(v, depth + 1, seen));
  const out = {};
  for (const k of Object.keys(value)) {
    if (k === "target" || k === "currentTarget") continue; // socket events
    const v = plain(value[k], depth + 1, seen);
    if (v !== null || value[k] === null) out[k] = v;
  }
  return out;
}

function out(obj) {
  // Writes to a pipe are synchronous on Linux: nothing is lost on exit.
  process.stdout.write(JSON.stringify(obj) + "\n");
}

let pusher = null; // the pusher-js client
let server = null; // pusher-http-node, used only to sign (authorizeChannel)
let options = null; // the connect command
let socket = null; // the current faye-websocket socket
let echo = null; // the Laravel Echo instance, made by the first echo op
const presenceUsers = new Map(); // channel -> channel_data user
const authOverrides = new Map(); // channel -> {auth, channel_data, auth_error}

// Every socket pusher-js opens goes through Runtime.createWebSocket (the Node
// runtime is exposed as Pusher.Runtime): wrap it to see the close code and
// reason, pusher:error frames during the handshake and, with "raw", frames.
const createWebSocket = Pusher.Runtime.createWebSocket;
Pusher.Runtime.createWebSocket = function (url) {
  const ws = createWebSocket.call(this, url);
  socket = ws;
  ws.addEventListener("open", () => out({ type: "open", url }));
  ws.addEventListener("message", (ev) => {
    if (options && options.raw) out({ type: "frame", dir: "in", data: plain(ev.data) });
    let msg = null;
    try {
      msg = JSON.parse(ev.data);
    } catch (_) {
      return;
    }
    if (msg && msg.event === "pusher:pong") out({ type: "pong" });
    if (msg && msg.event === "pusher:error") {
      let data = msg.data;
      if (typeof data === "string") {
        try {
          data = JSON.parse(data);
        } catch (_) {
          /* left as a string */
        }
      }
      out({
        type: "pusher_error",
        code: data && data.code !== undefined ? data.code : null,
        message: data && data.message !== undefined ? data.message : null,
        channel: msg.channel ?? null,
      });
    }
  });
  ws.addEventListener("close", (ev) => {
    if (socket === ws) socket = null;
    out({ type: "closed", code: ev.code, reason: ev.reason ?? "", was_clean: Boolean(ev.wasClean) });
  });
  ws.addEventListener("error", (ev) => out({ type: "ws_error", message: ev && ev.message ? String(ev.message) : null }));
  const send = ws.send;
  ws.send = function (data) {
    if (options && options.raw) out({ type: "frame", dir: "out", data: plain(data) });
    return send.apply(this, arguments);
  };
  return ws;
};

function membersOf(channel) {
  const m = channel.members;
  if (!m) return { members: null, me: null, count: null };
  return { members: plain(m.members), me: plain(m.me), count: m.count };
}

// Reports everything a channel emits, with the metadata (user_id) that
// bind_global would drop.
function watchChannel(channel) {
  if (!channel || channel.__sdkWatched) return;
  channel.__sdkWatched = true;
  const emit = channel.emit;
  channel.emit = function (event, data, metadata) {
    const name = channel.name;
    if (event === "pusher:subscription_succeeded") {
      out({ type: "subscribed", channel: name, ...membersOf(channel) });
    } else if (event === "pusher:subscription_error") {
      const d = data || {};
      out({
        type: "subscription_error",
        channel: name,
        error_type: d.type ?? null,
        error: d.error ?? null,
        status: d.status ?? null,
        data: plain(data),
      });
    } else {
      out({
        type: "event",
        channel: name,
        event,
        data: plain(data),
        user_id: metadata && metadata.user_id !== undefined ? metadata.user_id : null,
      });
    }
    return emit.call(this, event, data, metadata);
  };
}

// pusher-js asks this for every private-, presence- and encrypted channel:
// sign as a backend would, with pusher-http-node's authorizeChannel.
function authorizeChannel(params, callback) {
  const { socketId, channelName } = params;
  const o = authOverrides.get(channelName) || {};
  if (o.auth_error !== undefined) {
    callback(new Error(String(o.auth_error)), null);
    return;
  }
  let signed;
  try {
    let user = presenceUsers.get(channelName);
    if (user === undefined && channelName.startsWith("presence-")) user = options.user;
    signed = server.authorizeChannel(socketId, channelName, user);
  } catch (e) {
    callback(e, null);
    return;
  }
  if (o.auth !== undefined) signed.auth = o.auth;
  if (o.channel_data !== undefined) {
    signed.channel_data = typeof o.channel_data === "string" ? o.channel_data : JSON.stringify(o.channel_data);
  }
  callback(null, signed);
}

let signinUser = null;
function authenticateUser(params, callback) {
  try {
    if (!signinUser) throw new Error("no user to sign in: give signin_user to connect or user to signin");
    callback(null, server.authenticateUser(params.socketId, signinUser));
  } catch (e) {
    callback(e, null);
  }
}

function connect(cmd) {
  if (pusher) throw new Error("already connected: one pusher-js client per process");
  for (const k of ["port", "key"]) {
    if (cmd[k] === undefined) throw new Error(`connect needs "${k}"`);
  }
  options = cmd;
  const host = cmd.host || "127.0.0.1";
  const serverOptions = {
    appId: String(cmd.appId ?? "1"),
    key: cmd.key,
    secret: cmd.secret ?? "",
    host,
    port: cmd.port,
    useTLS: false,
  };
  if (cmd.encryptionMasterKeyBase64) serverOptions.encryptionMasterKeyBase64 = cmd.encryptionMasterKeyBase64;
  server = new PusherServer(serverOptions);
  signinUser = cmd.signin_user || null;
  if (cmd.debug) {
    Pusher.log = (msg) => process.stderr.write(`pusher-js: ${msg}\n`);
  }
  pusher = new Pusher(cmd.key, {
    cluster: "mt1",
    wsHost: host,
    wsPort: cmd.port,
    forceTLS: false,
    enabledTransports: ["ws"],
    enableStats: false,
    channelAuthorization: { customHandler: authorizeChannel },
    userAuthentication: { customHandler: authenticateUser },
    ...(cmd.options || {}),
  });
  const conn = pusher.connection;
  // The constructor has already started connecting (initialized ->
  // connecting) before anything could be bound: report where it is now.
  out({ type: "state", previous: null, current: conn.state, socket_id: null });
  conn.bind("state_change", ({ previous, current }) => {
    out({
      type: "state",
      previous,
      current,
      socket_id: current === "connected" ? conn.socket_id ?? null : null,
    });
  });
  conn.bind("connecting_in", (seconds) => out({ type: "retry_in", seconds }));
  conn.bind("error", (err) => out({ type: "error", error: plain(err) }));
  conn.bind("message", (ev) => {
    if (ev.event === "pusher:signin_success") {
      let userData = ev.data && ev.data.user_data;
      try {
        userData = JSON.parse(userData);
      } catch (_) {
        /* reported as sent */
      }
      out({ type: "signed_in", user_data: plain(userData) });
    }
    // The server-to-user channel is subscribed by pusher-js itself after
    // sign-in and is no member of pusher.channels: report its outcome here.
    if (typeof ev.channel === "string" && ev.channel.startsWith("#server-to-user-")) {
      if (ev.event === "pusher_internal:subscription_succeeded") {
        out({ type: "subscribed", channel: ev.channel, members: null, me: null, count: null });
      } else if (ev.event === "pusher:subscription_error") {
        const d = ev.data || {};
        out({
          type: "subscription_error",
          channel: ev.channel,
          error_type: d.type ?? null,
          error: d.error ?? null,
          status: d.status ?? null,
          data: plain(ev.data),
        });
      }
    }
  });
  pusher.user.bind_global((event, data) => out({ type: "user_event", event, data: plain(data) }));
  pusher.user.watchlist.bind_global((event, data) => out({ type: "watchlist", event, data: plain(data) }));
}

function needPusher() {
  if (!pusher) throw new Error("not connected: send connect first");
  return pusher;
}

function setAuthFor(channel, cmd) {
  if (cmd.user !== undefined) presenceUsers.set(channel, cmd.user);
  const o = {};
  for (const k of ["auth", "channel_data", "auth_error"]) {
    if (cmd[k] !== undefined) o[k] = cmd[k];
  }
  if (Object.keys(o).length) authOverrides.set(channel, o);
  else authOverrides.delete(channel);
}

let Echo = null;
async function echoChannel(cmd) {
  const p = needPusher();
  if (!Echo) Echo = (await import("laravel-echo")).default;
  if (!echo) {
    const echoOptions = { broadcaster: "pusher", client: p };
    if (cmd.namespace !== undefined) echoOptions.namespace = cmd.namespace;
    echo = new Echo(echoOptions);
  }
  const prefix = { channel: "", private: "private-", encryptedPrivate: "private-encrypted-", join: "presence-" }[cmd.kind];
  if (prefix === undefined) throw new Error(`unknown echo kind ${JSON.stringify(cmd.kind)}`);
  const full = prefix + cmd.name;
  setAuthFor(full, cmd);
  const ch = echo[cmd.kind](cmd.name);
  watchChannel(p.channel(full));
  const report = (what, listener) => (data) =>
    out({ type: "echo", channel: full, what, listener: listener ?? null, data: plain(data) });
  for (const l of cmd.listen || []) ch.listen(l, report("event", l));
  for (const w of cmd.listen_whisper || []) ch.listenForWhisper(w, report("whisper", w));
  ch.subscribed(report("subscribed"));
  ch.error(report("error"));
  if (cmd.kind === "join") {
    ch.here(report("here"));
    ch.joining(report("joining"));
    ch.leaving(report("leaving"));
  }
}

async function handle(cmd) {
  switch (cmd.op) {
    case "connect":
      connect(cmd);
      break;
    case "subscribe": {
      const p = needPusher();
      setAuthFor(cmd.channel, cmd);
      watchChannel(p.subscribe(cmd.channel));
      break;
    }
    case "unsubscribe":
      needPusher().unsubscribe(cmd.channel);
      break;
    case "trigger_client": {
      const ch = needPusher().channel(cmd.channel);
      if (!ch) throw new Error(`not subscribed to ${cmd.channel}`);
      const sent = ch.trigger(cmd.event, cmd.data ?? {});
      out({ type: "client_triggered", channel: cmd.channel, event: cmd.event, sent: Boolean(sent) });
      break;
    }
    case "signin":
      if (cmd.user !== undefined) signinUser = cmd.user;
      needPusher().signin();
      break;
    case "members": {
      const ch = needPusher().channel(cmd.channel);
      out({ type: "members", channel: cmd.channel, ...(ch ? membersOf(ch) : { members: null, me: null, count: null }) });
      break;
    }
    case "info": {
      const p = needPusher();
      out({
        type: "info",
        state: p.connection.state,
        socket_id: p.connection.socket_id ?? null,
        channels: p.allChannels().map((c) => ({ name: c.name, subscribed: c.subscribed })),
      });
      break;
    }
    case "send_raw": {
      if (!socket) throw new Error("no open socket");
      socket.send(cmd.binary ? Buffer.from(String(cmd.data), "utf8") : String(cmd.data));
      break;
    }
    case "disconnect":
      needPusher().disconnect();
      break;
    case "reconnect":
      needPusher().connect();
      break;
    case "echo":
      await echoChannel(cmd);
      break;
    case "whisper": {
      if (!echo) throw new Error("no echo channel yet");
      const method = { private: "private", join: "join", encryptedPrivate: "encryptedPrivate" }[cmd.kind || "private"];
      if (!method) throw new Error(`cannot whisper on kind ${JSON.stringify(cmd.kind)}`);
      echo[method](cmd.name).whisper(cmd.event, cmd.data ?? {});
      break;
    }
    case "echo_leave":
      if (!echo) throw new Error("no echo channel yet");
      echo.leave(cmd.name);
      break;
    case "exit":
      shutdown();
      break;
    default:
      throw new Error(`unknown op ${JSON.stringify(cmd.op)}`);
  }
}

function shutdown() {
  try {
    if (pusher) pusher.disconnect();
  } catch (_) {
    /* exiting anyway */
  }
  // Let the close frame go out.
  setTimeout(() => process.exit(0), 50);
}

out({
  type: "ready",
  pusher_js: versionOf("pusher-js"),
  laravel_echo: versionOf("laravel-echo"),
  pusher_http_node: versionOf("pusher"),
  node: process.version,
});

// Commands run one after another, in order, even the asynchronous ones.
let queue = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on("line", (line) => {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    out({ type: "op_error", op: null, error: `not JSON: ${e.message}` });
    return;
  }
  queue = queue
    .then(() => handle(cmd))
    .catch((e) => out({ type: "op_error", op: cmd.op ?? null, error: e && e.message ? e.message : String(e) }));
});
rl.on("close", () => queue.then(shutdown));
