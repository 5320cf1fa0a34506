"""A test application for Ward's tunnels: checks that bytes arrive intact both ways.

serve  --port P --log FILE
    For each connection: read an 8-byte big-endian length L, then L bytes
    (hashing them); answer with the SHA-256 of what arrived, then L bytes of its
    own (a pattern seeded by L) and their SHA-256. Each accepted connection is
    appended to FILE as a line (so a test can tell whether any arrived).

client --port P --size L [--streams K] [--seconds S] [--half-close]
    K concurrent connections, each sending L random bytes and checking both
    hashes; with --seconds, each connection repeats the exchange on the same
    connection until S seconds have passed. With --half-close, each
    connection closes its sending half once its one request is sent (the
    server then closes as soon as it has answered), and the answer must end
    in a clean end of file. Prints one JSON line:
    {"ok": n, "errors": [..], "bytes_sent": .., "bytes_received": ..}
"""
import argparse, hashlib, json, os, socket, struct, sys, threading, time

CHUNK = 256 * 1024


def pattern(length):
    # Deterministic bytes the receiver cannot guess without the stream: a
    # SHA-256 counter stream seeded by the length.
    h = hashlib.sha256(struct.pack(">Q", length)).digest()
    block = (h * (CHUNK // 32 + 1))[:CHUNK]
    sent = 0
    while sent < length:
        n = min(CHUNK, length - sent)
        yield block[:n]
        sent += n


def recv_exact(sock, n, digest=None):
    buf = bytearray()
    while n > 0:
        chunk = sock.recv(min(n, CHUNK))
        if not chunk:
            raise EOFError("connection closed with %d bytes missing" % n)
        n -= len(chunk)
        if digest is not None:
            digest.update(chunk)
        else:
            buf += chunk
    return bytes(buf)


def serve(args):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(1024)
    lock = threading.Lock()

    def handle(conn):
        with lock, open(args.log, "a") as f:
            f.write("connection\n")
        try:
            while True:
                try:
                    head = recv_exact(conn, 8)
                except EOFError:
                    return
                (length,) = struct.unpack(">Q", head)
                d = hashlib.sha256()
                recv_exact(conn, length, d)
                conn.sendall(d.digest())
                out = hashlib.sha256()
                for block in pattern(length):
                    out.update(block)
                    conn.sendall(block)
                conn.sendall(out.digest())
        except OSError:
            pass
        finally:
            conn.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def exchange(s, size, half_close=False):
    s.sendall(struct.pack(">Q", size))
    sent = hashlib.sha256()
    left = size
    while left > 0:
        block = os.urandom(min(CHUNK, left))
        sent.update(block)
        s.sendall(block)
        left -= len(block)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    theirs = recv_exact(s, 32)
    if theirs != sent.digest():
        raise ValueError("the server received different bytes than were sent")
    got = hashlib.sha256()
    recv_exact(s, size, got)
    claimed = recv_exact(s, 32)
    if claimed != got.digest():
        raise ValueError("the client received different bytes than the server sent")
    if half_close and s.recv(1) != b"":
        raise ValueError("bytes after the answer")
    return size


def client(args):
    result = {"ok": 0, "errors": [], "bytes_sent": 0, "bytes_received": 0}
    lock = threading.Lock()
    deadline = time.time() + args.seconds

    def worker():
        # One connection per worker, kept open: with --seconds it carries
        # exchange after exchange for the whole time.
        try:
            s = socket.create_connection(("127.0.0.1", args.port), timeout=60)
        except OSError as e:
            with lock:
                result["errors"].append("connect: %s" % e)
            return
        try:
            while True:
                n = exchange(s, args.size, args.half_close)
                with lock:
                    result["ok"] += 1
                    result["bytes_sent"] += n
                    result["bytes_received"] += n
                if args.half_close or time.time() >= deadline:
                    return
        except Exception as e:  # noqa: BLE001 - every failure is reported
            with lock:
                result["errors"].append("%s: %s" % (type(e).__name__, e))
        finally:
            s.close()

    threads = [threading.Thread(target=worker) for _ in range(args.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--size", type=int, required=True)
    c.add_argument("--streams", type=int, default=1)
    c.add_argument("--seconds", type=float, default=0)
    c.add_argument("--half-close", action="store_true")
    args = p.parse_args()
    serve(args) if args.cmd == "serve" else client(args)


if __name__ == "__main__":
    main()
