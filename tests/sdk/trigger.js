#!/usr/bin/env node
// One call of the Pusher HTTP API through pusher-http-node 5 (npm `pusher`),
// the SDK a Node backend uses; prints the outcome as one JSON line. Used
// through tests/common/sdk.rs (`trigger`).
//
//   node trigger.js '{"port":P,"key":K,"secret":S,"op":"trigger",
//                     "channels":["a"],"event":"e","data":{...},"socket_id":null}'
//
// Common fields: port, key, secret; optional host (127.0.0.1), appId ("1"),
// timeout (ms, 10000), encryptionMasterKeyBase64 (for private-encrypted-).
// Ops and their fields:
//   trigger        channels (or channel), event, data, socket_id?, info?
//                  -> pusher.trigger(channels, event, data, {socket_id, info})
//   trigger_batch  batch: [{channel, name, data, socket_id?, info?}]
//   channels       filter_by_prefix?, info?   -> GET /apps/{id}/channels
//   channel        channel, info?             -> GET /apps/{id}/channels/{channel}
//   users          channel                    -> GET /apps/{id}/channels/{channel}/users
//   terminate      user_id   -> POST /apps/{id}/users/{user_id}/terminate_connections
//   send_to_user   user_id, event, data       -> trigger on #server-to-user-{user_id}
//   get            path (after /apps/{id}), params?   the SDK's signed GET
//   post           path (after /apps/{id}), body      the SDK's signed POST:
//                  for what the SDK itself refuses (over 100 channels, ...)
//   authorize_channel  socket_id, channel, user?   (no request: the signature)
//   authenticate_user  socket_id, user              (no request: the signature)
//
// Output, always one line, exit status 0 (2 for unusable input):
//   {"ok":true,"status":200,"body":<JSON, or the text if not JSON>,"content_type":...}
//   {"ok":false,"status":401,"body":...,"error":"Unexpected status code 401"}
//   {"ok":false,"status":null,"body":null,"error":"Request failed with an error",
//    "cause":"ECONNREFUSED: ...","url":...}   nothing answered
//   {"ok":false,"status":null,"body":null,"error":"...","thrown":true}
//                                        the SDK refused before sending
"use strict";

const util = require("util");

for (const k of ["log", "info", "warn", "error", "debug", "trace"]) {
  console[k] = (...args) => process.stderr.write(util.format(...args) + "\n");
}

const Pusher = require("pusher");

function print(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function parseBody(text) {
  if (text === undefined || text === null) return null;
  try {
    return JSON.parse(text);
  } catch (_) {
    return text;
  }
}

function describeCause(err) {
  if (!err) return null;
  const parts = [err.code, err.message].filter(Boolean);
  return parts.length ? parts.join(": ") : String(err);
}

async function response(res) {
  const text = await res.text();
  return {
    ok: true,
    status: res.status,
    body: parseBody(text),
    content_type: res.headers.get("content-type"),
  };
}

function request(pusher, cmd) {
  switch (cmd.op) {
    case "trigger": {
      const channels = cmd.channels ?? cmd.channel;
      const params = {};
      if (cmd.socket_id !== undefined && cmd.socket_id !== null) params.socket_id = cmd.socket_id;
      if (cmd.info !== undefined && cmd.info !== null) params.info = cmd.info;
      return pusher.trigger(channels, cmd.event, cmd.data, params);
    }
    case "trigger_batch":
      return pusher.triggerBatch(cmd.batch);
    case "channels": {
      const params = {};
      if (cmd.filter_by_prefix !== undefined) params.filter_by_prefix = cmd.filter_by_prefix;
      if (cmd.info !== undefined) params.info = cmd.info;
      return pusher.get({ path: "/channels", params });
    }
    case "channel": {
      const params = {};
      if (cmd.info !== undefined) params.info = cmd.info;
      return pusher.get({ path: `/channels/${cmd.channel}`, params });
    }
    case "users":
      return pusher.get({ path: `/channels/${cmd.channel}/users` });
    case "terminate":
      return pusher.terminateUserConnections(cmd.user_id);
    case "send_to_user":
      return pusher.sendToUser(cmd.user_id, cmd.event, cmd.data);
    case "get":
      return pusher.get({ path: cmd.path, params: cmd.params });
    case "post":
      return pusher.post({ path: cmd.path, body: cmd.body });
    default:
      throw new Error(`unknown op ${JSON.stringify(cmd.op)}`);
  }
}

async function main() {
  let cmd;
  try {
    cmd = JSON.parse(process.argv[2]);
  } catch (e) {
    process.stderr.write(`usage: node trigger.js '<json>' (${e.message})\n`);
    process.exit(2);
  }
  const options = {
    appId: String(cmd.appId ?? "1"),
    key: cmd.key,
    secret: cmd.secret,
    host: cmd.host ?? "127.0.0.1",
    port: cmd.port,
    useTLS: false,
    timeout: cmd.timeout ?? 10000,
  };
  if (cmd.encryptionMasterKeyBase64) options.encryptionMasterKeyBase64 = cmd.encryptionMasterKeyBase64;
  let pusher;
  let sent;
  try {
    pusher = new Pusher(options);
    if (cmd.op === "authorize_channel") {
      print({ ok: true, status: null, body: pusher.authorizeChannel(cmd.socket_id, cmd.channel, cmd.user) });
      return;
    }
    if (cmd.op === "authenticate_user") {
      print({ ok: true, status: null, body: pusher.authenticateUser(cmd.socket_id, cmd.user) });
      return;
    }
    sent = request(pusher, cmd);
  } catch (e) {
    print({ ok: false, status: null, body: null, error: e && e.message ? e.message : String(e), thrown: true });
    return;
  }
  try {
    print(await response(await sent));
  } catch (e) {
    // pusher-http-node's RequestError: status and body for an HTTP error,
    // the underlying error when nothing answered.
    print({
      ok: false,
      status: e.status ?? null,
      body: parseBody(e.body),
      error: e.message,
      cause: describeCause(e.error),
      url: e.url ?? null,
    });
  }
}

main();
