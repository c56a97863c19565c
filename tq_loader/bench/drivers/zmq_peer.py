"""The far end of the raw pyzmq baseline: ``python zmq_peer.py PULL_PORT PUSH_PORT`` (imports only zmq).

It connects a PULL socket to the suite's PUSH and a PUSH socket to the suite's PULL, on loopback.
``put`` + frames: keep the frames (zero-copy), answer ``ok``; ``get``: send the kept frames back
(zero-copy); ``stop``: exit. This is the wire limit of two processes moving the same bytes.
"""

from __future__ import annotations

import sys

import zmq


def main() -> int:
    pull_port, push_port = int(sys.argv[1]), int(sys.argv[2])
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.setsockopt(zmq.LINGER, 0)
    pull.connect(f"tcp://127.0.0.1:{pull_port}")
    push.connect(f"tcp://127.0.0.1:{push_port}")
    push.send(b"ready")
    held: list[zmq.Frame] = []
    try:
        while True:
            frames = pull.recv_multipart(copy=False)
            op = frames[0].bytes
            if op == b"put":
                held = frames[1:]
                push.send(b"ok")
            elif op == b"get":
                push.send_multipart(held, copy=False)
            elif op == b"stop":
                push.send(b"bye")
                return 0
            else:
                push.send(b"unknown op " + op[:32])
    finally:
        pull.close(linger=0)
        push.close(linger=1000)
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
