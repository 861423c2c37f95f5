#!/usr/bin/env python3
"""A client that talks to latd the way the original latc does (standard
library only), to test that those clients keep working, on NFS too:

  1. rewrite c-2-s.msg in place (open for writing, truncating: the same
     file, not a new one), then create c-2-s.done (`touch`);
  2. poll for s-2-c.done by name with stat, every --interval seconds
     (once a second by default), the first time at once;
  3. read s-2-c.msg, delete s-2-c.done;
  4. a reply naming a file (status_file, log_file_path, yaml_file_path):
     run `cat FILE` and exit with cat's status, as the original does.

Prints the reply's lines on stderr (prefixed "reply: "), then the file's
content (cat's output) on stdout, and on stderr one line
"original_latc: round trip S s" with the time from step 1 to the reply.

Exit: cat's status when a file was named, else 0 for result succeed and 1
for fail; 3 no reply within --timeout; 2 usage or I/O error.

  original_latc.py --channel DIR ACTION [--workdir W] [--yaml-file Y]
                   [--interval S] [--timeout S]
"""
import argparse
import os
import re
import subprocess
import sys
import time


def main():
    ap = argparse.ArgumentParser(description="latd client, original style")
    ap.add_argument("--channel", required=True)
    ap.add_argument("action")
    ap.add_argument("--workdir", default=os.environ.get("WORKSPACE_DIR", "/localdisk"))
    ap.add_argument("--yaml-file")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()

    ch = args.channel
    lines = [f"action: {args.action}\n", f"workdir: {args.workdir}\n"]
    if args.yaml_file is not None:
        lines.append(f"yaml_file: {args.yaml_file}\n")
    start = time.monotonic()
    try:
        with open(os.path.join(ch, "c-2-s.msg"), "w") as f:
            f.writelines(lines)
        subprocess.check_call(["touch", os.path.join(ch, "c-2-s.done")])
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"original_latc: cannot send the request: {e}", file=sys.stderr)
        return 2

    done = os.path.join(ch, "s-2-c.done")
    deadline = start + args.timeout
    while True:
        try:
            os.stat(done)
            break
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            print(f"original_latc: no reply within {args.timeout:g} s", file=sys.stderr)
            return 3
        time.sleep(args.interval)

    try:
        with open(os.path.join(ch, "s-2-c.msg")) as f:
            text = f.read()
        os.unlink(done)
    except OSError as e:
        print(f"original_latc: cannot read the reply: {e}", file=sys.stderr)
        return 2
    print(f"original_latc: round trip {time.monotonic() - start:.2f} s", file=sys.stderr)
    reply = {}
    for line in text.splitlines():
        print(f"reply: {line}", file=sys.stderr)
        m = re.match(r"^([A-Za-z_]+):\s*(.*)$", line)
        if m:
            reply[m.group(1)] = m.group(2).strip().strip("'\"")
    for key in ("status_file", "log_file_path", "yaml_file_path"):
        if key in reply:
            sys.stdout.flush()
            return subprocess.call(["cat", reply[key]])
    return 0 if reply.get("result") == "succeed" else 1


if __name__ == "__main__":
    sys.exit(main())
