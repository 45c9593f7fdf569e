#!/usr/bin/env python3
"""A minimal Agora client in Python, written from docs/PROTOCOL.md alone.

Usage: agora_client.py REGISTRY_ENDPOINT REGISTRY_PUBLIC_KEY GROUP_NAME

Every connection is CURVE (RFC 26): the client makes its own key pair, knows the registry's
public key from the command line, and takes the node's from the registry's lookup reply.

Looks the group up in the registry, joins it, sends typed bodies (with a client-chosen id,
retried to check idempotency), reads the history back page by page and by time, and checks
the documented errors. Prints "interop ok" and exits 0 when every check holds.
"""
import hashlib
import json
import os
import sys
import uuid

import zmq

SIGNATURE = b"AGORA/1"
TIMEOUT_MS = 5000


class Failure(Exception):
    pass


MY_PUBLIC, MY_SECRET = zmq.curve_keypair()
SERVER_KEYS = {}  # endpoint -> the server's Z85 public key


def curve_socket(ctx, kind, endpoint):
    """A socket of `kind` connected to `endpoint` over CURVE."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey = MY_PUBLIC
    sock.curve_secretkey = MY_SECRET
    sock.curve_serverkey = SERVER_KEYS[endpoint].encode()
    sock.connect(endpoint)
    return sock


def call(ctx, endpoint, request):
    """One request on a fresh REQ socket (so a timeout never wedges the next call)."""
    sock = curve_socket(ctx, zmq.REQ, endpoint)
    try:
        sock.send_multipart([SIGNATURE, json.dumps(request).encode()])
        if not sock.poll(TIMEOUT_MS):
            raise Failure(f"no reply from {endpoint} to {request['action']}")
        frames = sock.recv_multipart()
    finally:
        sock.close()
    if len(frames) != 2 or frames[0] != SIGNATURE:
        raise Failure(f"bad reply frames {frames!r}")
    return json.loads(frames[1])


def call_data(ctx, endpoint, request, data=None):
    """A request with an optional data frame after its body (§2, §6.9); returns the reply and
    its data frame (None when the reply has none)."""
    sock = curve_socket(ctx, zmq.REQ, endpoint)
    try:
        frames = [SIGNATURE, json.dumps(request).encode()]
        if data is not None:
            frames.append(data)
        sock.send_multipart(frames)
        if not sock.poll(TIMEOUT_MS):
            raise Failure(f"no reply from {endpoint} to {request['action']}")
        frames = sock.recv_multipart()
    finally:
        sock.close()
    if len(frames) not in (2, 3) or frames[0] != SIGNATURE:
        raise Failure(f"bad reply frames {len(frames)}")
    return json.loads(frames[1]), (frames[2] if len(frames) == 3 else None)


def ok(reply):
    if reply.get("ok") is not True:
        raise Failure(f"expected success, got {reply}")
    return reply


def err(reply, code):
    if reply.get("ok") is not False or reply.get("error") != code:
        raise Failure(f"expected error {code}, got {reply}")


def check(cond, what):
    if not cond:
        raise Failure(what)


def main():
    registry, registry_key, group = sys.argv[1], sys.argv[2], sys.argv[3]
    SERVER_KEYS[registry] = registry_key
    ctx = zmq.Context()
    entry = ok(call(ctx, registry, {"action": "lookup", "name": group}))["group"]
    node = entry["endpoint"]
    SERVER_KEYS[node] = entry["public_key"]
    names = [g["name"] for g in ok(call(ctx, registry, {"action": "list"}))["groups"]]
    check(group in names, f"{group} not in list {names}")

    user = "py_client"
    err(call(ctx, node, {"action": "send", "user": user, "body": "x"}), "not_member")
    joined = ok(call(ctx, node, {"action": "join", "user": user, "group": group}))
    check(joined["group"] == group and joined["changed"] is True, f"join: {joined}")

    bodies = ["hello from python", {"temp": 21.5, "tags": ["a", "b"]}, True, 42, 2.5, [1, None]]
    acks = []
    for body in bodies:
        msg_id = str(uuid.uuid4())
        ack = ok(call(ctx, node, {"action": "send", "user": user, "body": body, "id": msg_id}))
        check(ack["id"] == msg_id and ack["duplicate"] is False, f"ack: {ack}")
        again = ok(call(ctx, node, {"action": "send", "user": user, "body": body, "id": msg_id}))
        check(again["seq"] == ack["seq"] and again["duplicate"] is True, f"retry: {again}")
        acks.append(ack)
    seqs = [a["seq"] for a in acks]
    check(seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"seqs not consecutive: {seqs}")

    got = []
    after = 0
    while True:
        page = ok(call(ctx, node, {"action": "get_messages", "user": user,
                                   "after_seq": after, "limit": 2}))
        got += page["messages"]
        if not page["more"]:
            break
        after = page["messages"][-1]["seq"]
    mine = [m for m in got if m["sender"] == user and m["kind"] == "message"]
    check([m["body"] for m in mine] == bodies, f"bodies differ: {mine}")
    events = [m for m in got if m["sender"] == user and m["kind"] == "join"]
    check(len(events) == 1 and events[0]["body"] is None, f"join event: {events}")

    since = ok(call(ctx, node, {"action": "get_messages", "user": user,
                                "since": acks[2]["time"]}))["messages"]
    check([m["seq"] for m in since] == seqs[2:], f"since: {since}")
    by_id = ok(call(ctx, node, {"action": "get_messages", "user": user,
                                "id": acks[1]["id"]}))["messages"]
    check(by_id[0]["body"] == bodies[1], f"by id: {by_id}")

    # Live stream: subscribe on a DEALER, then a send is pushed to it.
    sub = curve_socket(ctx, zmq.DEALER, node)
    sub.send_multipart([b"", SIGNATURE, json.dumps({"action": "subscribe", "user": user}).encode()])
    check(sub.poll(TIMEOUT_MS), "no reply to subscribe")
    empty, sig, body = sub.recv_multipart()
    reply = ok(json.loads(body))
    check(empty == b"" and sig == SIGNATURE and reply["last_seq"] == seqs[-1], f"subscribe: {reply}")
    pushed = ok(call(ctx, node, {"action": "send", "user": user, "body": "live"}))
    check(sub.poll(TIMEOUT_MS), "no push")
    empty, sig, body = sub.recv_multipart()
    event = json.loads(body)
    check(event["event"] == "entry" and event["entry"]["seq"] == pushed["seq"]
          and event["entry"]["body"] == "live", f"push: {event}")
    sub.close()

    # Batched pushes and acks: subscribe with "batch" and "acked_seq" (§6.7).
    sub = curve_socket(ctx, zmq.DEALER, node)
    sub.send_multipart([b"", SIGNATURE, json.dumps(
        {"action": "subscribe", "user": user, "batch": True, "acked_seq": pushed["seq"]}).encode()])
    check(sub.poll(TIMEOUT_MS), "no reply to a batched subscribe")
    reply = ok(json.loads(sub.recv_multipart()[2]))
    check(reply["budget_bytes"] > 0, f"batched subscribe: {reply}")
    pushed = ok(call(ctx, node, {"action": "send", "user": user, "body": "batched"}))
    check(sub.poll(TIMEOUT_MS), "no batched push")
    event = json.loads(sub.recv_multipart()[2])
    check(event["event"] == "entries" and [e["seq"] for e in event["entries"]] == [pushed["seq"]]
          and event["entries"][0]["body"] == "batched", f"batched push: {event}")
    sub.send_multipart([b"", SIGNATURE, json.dumps(
        {"action": "subscribe", "user": user, "batch": True, "acked_seq": "x"}).encode()])
    check(sub.poll(TIMEOUT_MS), "no reply to a bad ack")
    err(json.loads(sub.recv_multipart()[2]), "invalid_field")
    sub.close()

    # A file (§6.9): declared, sent in chunks, carried by a message, read back by range.
    content = os.urandom(600_000)
    digest = hashlib.sha256(content).hexdigest()
    up = ok(call(ctx, node, {"action": "upload", "user": user, "sha256": digest,
                             "size": len(content)}))
    check(up["have"] == 0 and up["complete"] is False, f"upload: {up}")
    step = up["chunk_bytes"]
    err(call_data(ctx, node, {"action": "upload_chunk", "user": user, "sha256": digest,
                              "offset": 7}, content[:10])[0], "bad_offset")
    for offset in range(0, len(content), step):
        reply, _ = call_data(ctx, node, {"action": "upload_chunk", "user": user,
                                         "sha256": digest, "offset": offset},
                             content[offset:offset + step])
        ok(reply)
    check(reply["complete"] is True and reply["have"] == len(content), f"last chunk: {reply}")
    back = b""
    while len(back) < len(content):
        reply, data = call_data(ctx, node, {"action": "download", "user": user,
                                            "sha256": digest, "offset": len(back)})
        ok(reply)
        check(data is not None and reply["length"] == len(data), f"download: {reply}")
        back += data
    check(back == content, "downloaded bytes differ")
    attachment = {"sha256": digest, "size": len(content), "name": "noise.bin",
                  "media_type": "application/octet-stream"}
    file_msg = ok(call(ctx, node, {"action": "send", "user": user, "body": "a file",
                                   "attachment": attachment}))
    shown = ok(call(ctx, node, {"action": "get_messages", "user": user,
                                "id": file_msg["id"]}))["messages"][0]
    check(shown["attachment"] == attachment and shown["body"] == "a file", f"file: {shown}")

    err(call(ctx, node, {"action": "get_messages", "user": user, "latest": 0}), "invalid_field")
    err(call(ctx, node, {"action": "teleport"}), "unknown_action")
    err(call(ctx, node, {"action": "join", "user": user, "group": "not this one"}), "unknown_group")
    ok(call(ctx, node, {"action": "leave", "user": user}))
    err(call(ctx, node, {"action": "get_messages", "user": user}), "not_member")
    print("interop ok")


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"interop FAILED: {e}", file=sys.stderr)
        sys.exit(1)
