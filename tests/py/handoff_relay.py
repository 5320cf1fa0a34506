"""Opens a connection to a Unix socket and serves it to one client on
another socket, relaying bytes both ways.

    handoff_relay.py TARGET LISTEN stay|exit

With `exit`, the process that opened the connection exits at once and a
child it forked, which inherited the connection, does the relaying: the
server at TARGET sees a connection whose opener is gone. Prints "ready" when
LISTEN accepts.
"""

import os
import socket
import sys
import threading
import time


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main():
    target, listen, mode = sys.argv[1:4]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(target)
    if mode == "exit":
        opener = os.getpid()
        if os.fork() != 0:
            os._exit(0)
        deadline = time.monotonic() + 10
        while os.getppid() == opener:
            if time.monotonic() > deadline:
                sys.exit("the opener did not exit")
            time.sleep(0.01)
    elif mode != "stay":
        sys.exit(f"unknown mode {mode!r}")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen)
    server.listen(1)
    print("ready", flush=True)
    client, _ = server.accept()
    back = threading.Thread(target=pump, args=(conn, client), daemon=True)
    back.start()
    pump(client, conn)
    back.join(timeout=5)


if __name__ == "__main__":
    main()
