"""One call of the Pusher HTTP API through the PyPI `pusher` SDK (3.x), the
SDK a Python backend uses; prints the outcome as one JSON line. Runs in the
venv scripts/test.sh makes (tests/sdk/.venv); used through
tests/common/sdk.rs (`trigger_py`).

    .venv/bin/python trigger.py '{"port":P,"key":K,"secret":S,"op":"trigger",
                                  "channels":["a"],"event":"e","data":{...}}'

Common fields: port, key, secret; optional host (127.0.0.1), appId ("1"),
timeout (seconds, 10), encryptionMasterKeyBase64 (for private-encrypted-).
Ops and their fields (the same names as trigger.js where the SDK has them):
    trigger        channels (or channel), event, data, socket_id?
    trigger_batch  batch: [{channel, name, data, socket_id?}]
    channels       filter_by_prefix?, info? ("user_count,subscription_count")
    channel        channel, info?
    users          channel
    terminate      user_id
    send_to_user   user_id, event, data
    authenticate   channel, socket_id, user?  (no request: the signature)

Output, always one line, exit status 0 (2 for unusable input):
    {"ok": true, "status": 200, "body": <JSON>}
    {"ok": false, "status": 401, "body": <JSON or text>, "error": "PusherBadAuth: ..."}
    {"ok": false, "status": null, "body": null, "error": "ConnectionError: ..."}
    {"ok": false, "status": null, "body": null, "error": "...", "thrown": true}
        the SDK refused before sending
"""

import json
import sys

import pusher
import requests
from pusher.http import process_response
from pusher.requests import RequestsBackend


class RecordingBackend(RequestsBackend):
    """The SDK's own requests backend, remembering the status and body it
    got: the SDK returns only the parsed body, or raises on an error."""

    last = None

    def send_request(self, request):
        resp = self.session.request(
            request.method,
            request.url,
            headers=request.headers,
            data=request.body,
            timeout=self.client.timeout,
            **self.options,
        )
        RecordingBackend.last = (resp.status_code, resp.text)
        return process_response(resp.status_code, resp.text)


def parse_body(text):
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def call(client, cmd):
    op = cmd.get("op")
    if op == "trigger":
        channels = cmd.get("channels", cmd.get("channel"))
        return client.trigger(channels, cmd["event"], cmd.get("data"), cmd.get("socket_id"))
    if op == "trigger_batch":
        return client.trigger_batch(cmd["batch"])
    if op == "channels":
        attributes = [a for a in (cmd.get("info") or "").split(",") if a]
        return client.channels_info(cmd.get("filter_by_prefix"), attributes)
    if op == "channel":
        attributes = [a for a in (cmd.get("info") or "").split(",") if a]
        return client.channel_info(cmd["channel"], attributes)
    if op == "users":
        return client.users_info(cmd["channel"])
    if op == "terminate":
        return client.terminate_user_connections(cmd["user_id"])
    if op == "send_to_user":
        return client.send_to_user(cmd["user_id"], cmd["event"], cmd.get("data"))
    raise ValueError("unknown op %r" % (op,))


def main():
    try:
        cmd = json.loads(sys.argv[1])
    except (IndexError, ValueError) as e:
        sys.stderr.write("usage: trigger.py '<json>' (%s)\n" % e)
        sys.exit(2)

    def done(obj):
        sys.stdout.write(json.dumps(obj) + "\n")

    try:
        options = {}
        if cmd.get("encryptionMasterKeyBase64"):
            options["encryption_master_key_base64"] = cmd["encryptionMasterKeyBase64"]
        client = pusher.Pusher(
            app_id=str(cmd.get("appId", "1")),
            key=cmd["key"],
            secret=cmd["secret"],
            host=cmd.get("host", "127.0.0.1"),
            port=cmd["port"],
            ssl=False,
            timeout=cmd.get("timeout", 10),
            backend=RecordingBackend,
            **options,
        )
        if cmd.get("op") == "authenticate":
            body = client.authenticate(cmd["channel"], cmd["socket_id"], cmd.get("user"))
            done({"ok": True, "status": None, "body": body})
            return
    except Exception as e:  # noqa: BLE001 - reported, not raised
        done({"ok": False, "status": None, "body": None, "error": "%s: %s" % (type(e).__name__, e), "thrown": True})
        return

    RecordingBackend.last = None
    try:
        body = call(client, cmd)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        last = RecordingBackend.last
        out = {"ok": False, "status": None, "body": None, "error": "%s: %s" % (type(e).__name__, e)}
        if last is not None:
            out["status"], out["body"] = last[0], parse_body(last[1])
        else:
            # Nothing was sent: the SDK's own checks refused, or nothing
            # answered (a requests ConnectionError).
            out["thrown"] = not isinstance(e, requests.exceptions.RequestException)
        done(out)
        return
    status = RecordingBackend.last[0] if RecordingBackend.last else None
    done({"ok": True, "status": status, "body": body})


if __name__ == "__main__":
    main()
