#!/usr/bin/env python3
"""A latd client written from the wire contract alone (standard library only).

It performs exactly the client side of the original exchange:
  1. write c-2-s.msg (a YAML mapping), then create c-2-s.done;
  2. poll every 50 ms for s-2-c.done;
  3. read s-2-c.msg, delete s-2-c.done.

The reply is printed on stdout as one JSON object. If it names a file
(status_file, log_file_path or yaml_file_path), that file's content is added
under "file_content" (null if unreadable).

Exit: 0 a reply arrived, 3 no reply within --timeout, 2 usage or I/O error.

  protocol_client.py --channel DIR --action ACTION [--workdir W]
                     [--yaml-file Y] [--timeout SECONDS]

--workdir defaults to $WORKSPACE_DIR or /localdisk; an empty --workdir leaves
the key out. --yaml-file is sent as given (no check, no absolute path).
"""
import argparse
import json
import os
import re
import sys
import time

FILE_KEYS = ("status_file", "log_file_path", "yaml_file_path")
PLAIN_SAFE = re.compile(r"^[A-Za-z0-9_./@+-]+$")
NOT_PLAIN = re.compile(r"^(?:true|false|yes|no|on|off|null|~|[-+.0-9][-+.0-9eE_]*)$", re.I)


def yaml_scalar(value):
    """A YAML scalar for value: plain when unambiguous, else single-quoted."""
    if PLAIN_SAFE.match(value) and not NOT_PLAIN.match(value):
        return value
    return "'" + value.replace("'", "''") + "'"


def parse_scalar(text):
    """Minimal YAML scalar: 'single' ('' escapes ') / "double" (\\ escapes) / plain."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "/": "/"}
        return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), m.group(0)), text[1:-1])
    return re.sub(r"\s+#.*$", "", text)  # a plain scalar may end with a comment


def parse_reply(text):
    """The reply's top-level `key: value` lines as a dict (other lines ignored)."""
    reply = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_-]*):(?:\s+(.*))?$", line.rstrip())
        if m:
            reply[m.group(1)] = parse_scalar(m.group(2) or "")
    return reply


def main():
    ap = argparse.ArgumentParser(description="latd protocol client (reference)")
    ap.add_argument("--channel", required=True, help="the channel directory")
    ap.add_argument("--action", required=True)
    ap.add_argument("--workdir", default=os.environ.get("WORKSPACE_DIR", "/localdisk"))
    ap.add_argument("--yaml-file")
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()

    ch = args.channel
    request = [("action", args.action)]
    if args.workdir:
        request.append(("workdir", args.workdir))
    if args.yaml_file is not None:
        request.append(("yaml_file", args.yaml_file))

    # 1. the request, then its signal
    try:
        with open(os.path.join(ch, "c-2-s.msg"), "w") as f:
            f.writelines(f"{k}: {yaml_scalar(v)}\n" for k, v in request)
        open(os.path.join(ch, "c-2-s.done"), "w").close()
    except OSError as e:
        print(f"protocol_client: cannot send the request: {e}", file=sys.stderr)
        return 2

    # 2. wait for the reply's signal
    done = os.path.join(ch, "s-2-c.done")
    deadline = time.monotonic() + args.timeout
    while not os.path.exists(done):
        if time.monotonic() >= deadline:
            print(f"protocol_client: no reply within {args.timeout:g} s", file=sys.stderr)
            return 3
        time.sleep(0.05)

    # 3. read the reply, consume the signal
    try:
        with open(os.path.join(ch, "s-2-c.msg")) as f:
            reply = parse_reply(f.read())
        os.remove(done)
    except OSError as e:
        print(f"protocol_client: cannot read the reply: {e}", file=sys.stderr)
        return 2

    # a reply naming a file: include that file's content
    for key in FILE_KEYS:
        if key in reply:
            try:
                with open(reply[key], errors="replace") as f:
                    reply["file_content"] = f.read()
            except OSError:
                reply["file_content"] = None
            break

    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
