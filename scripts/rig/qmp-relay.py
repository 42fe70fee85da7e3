#!/usr/bin/env python3
"""Host side of the rig's guest-to-host link (scripts/rig/README.md, "QMP").

run.sh gives the guest a second serial port (/dev/ttyS1) whose other end is
the unix socket LINK, and QEMU a QMP monitor on the unix socket QMP. This
relay connects to both and serves one request per line from the guest:

  qmp {"execute": ..., "arguments": {...}}   ->  ok <return as JSON> | err <desc>
  event NAME SECONDS                          ->  ok <event as JSON>  | err timeout

Events arriving at any time are kept, so `event` also finds one that came
before it was asked for (each is handed out once). In a qmp request,
@IMAGE_DIR@ stands for the directory of the disk images (for blockdev-add). Every request and answer
is appended to LOG. The relay ends when QEMU closes the sockets.

usage: qmp-relay.py QMP LINK LOG IMAGE_DIR
"""
import json
import select
import socket
import sys
import time


def connect(path, deadline):
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Qmp:
    def __init__(self, path, log):
        self.sock = connect(path, time.monotonic() + 30)
        # Lines are split here rather than by a socket file: a file object
        # refuses every read after one timed out.
        self.inbuf = b""
        self.events = []
        self.log = log
        self.read_msg()  # greeting
        self.command({"execute": "qmp_capabilities"})

    def read_msg(self, deadline=None):
        """The next message; None if DEADLINE (monotonic) passes first."""
        while b"\n" not in self.inbuf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    return None
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("QMP closed")
            self.inbuf += data
        raw, self.inbuf = self.inbuf.split(b"\n", 1)
        line = raw.decode("utf-8", "replace")
        msg = json.loads(line)
        if "event" in msg:
            self.log.write(f"event {line.strip()}\n")
            self.events.append(msg)
        return msg

    def command(self, cmd):
        self.sock.sendall((json.dumps(cmd) + "\n").encode())
        while True:
            msg = self.read_msg()
            if "return" in msg:
                return "ok " + json.dumps(msg["return"])
            if "error" in msg:
                e = msg["error"]
                return f"err {e.get('class', '')}: {e.get('desc', '')}"

    def event(self, name, secs):
        deadline = time.monotonic() + secs
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    del self.events[i]
                    return "ok " + json.dumps(ev)
            if self.read_msg(deadline) is None:
                return "err timeout"


def main():
    qmp_path, link_path, log_path, image_dir = sys.argv[1:5]
    with open(log_path, "a", buffering=1, encoding="utf-8") as log:
        try:
            qmp = Qmp(qmp_path, log)
            link = connect(link_path, time.monotonic() + 30)
        except (OSError, EOFError) as e:
            log.write(f"relay: cannot connect: {e}\n")
            return 2
        log.write("relay: connected\n")
        buf = b""
        while True:
            data = link.recv(4096)
            if not data:
                return 0
            buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                req = raw.decode("utf-8", "replace").strip()
                if not req:
                    continue
                log.write(f"guest {req}\n")
                try:
                    verb, _, rest = req.partition(" ")
                    if verb == "qmp":
                        ans = qmp.command(json.loads(rest.replace("@IMAGE_DIR@", image_dir)))
                    elif verb == "event":
                        name, secs = rest.split()
                        ans = qmp.event(name, float(secs))
                    else:
                        ans = f"err unknown request {verb!r}"
                except EOFError:
                    return 0
                except (ValueError, KeyError) as e:
                    ans = f"err bad request: {e}"
                log.write(f"answer {ans}\n")
                link.sendall((ans.replace("\n", " ") + "\n").encode())


if __name__ == "__main__":
    sys.exit(main())
