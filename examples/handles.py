"""File descriptors as values: a pipe, a socket and an open file cross with tether.Handle."""

from __future__ import annotations

import os
import socket
import tempfile

import tether
from tether.aio.loop import run


async def worker(peer: tether.Peer) -> None:  # in the child
    @peer.handle("write-to")
    def write_to(call: tether.Call, h: tether.Handle, text: str) -> None:
        with h.open("w") as f:  # the Handle becomes a file; closing it closes the fd
            f.write(text)

    @peer.handle("serve")
    def serve(call: tether.Call, h: tether.Handle) -> None:
        with h.socket() as s:  # ... or a socket
            s.sendall(s.recv(64).upper())

    @peer.handle("log-file")
    def log_file(call: tether.Call) -> tether.Handle:
        with tempfile.TemporaryFile("w+") as f:
            f.write("written by the child\n")
            f.flush()
            return tether.Handle.from_file(f)  # a duplicate travels; f stays the child's

    await peer.wait_closed()


async def main() -> None:
    async with tether.Main(timeout=10.0) as hub:
        child = await hub.spawn(worker)

        r, w = os.pipe()
        h = tether.Handle(w)  # owns w from now on
        await child.invoke("write-to", h, "hello through a pipe")
        print(f"main: the pipe says {os.read(r, 100).decode()!r}")
        os.close(r)
        try:
            h.fileno()
        except tether.ConsumedError:
            print("main: the sent Handle is gone from main: ConsumedError")

        ours, theirs = socket.socketpair()
        ours.sendall(b"ping")  # waits in the socket for the child
        await child.invoke("serve", tether.Handle.from_socket(theirs))
        theirs.close()
        print(f"main: the socket says {ours.recv(64).decode()!r}")
        ours.close()

        log = await child.invoke("log-file")  # child -> main, as a result
        with log.open("r") as f:
            f.seek(0)
            print(f"main: the child's file says {f.read().strip()!r}")

        server = await hub.listen("tcp://127.0.0.1:0")
        async with tether.connect(str(server.address)) as tcp:
            r, w = os.pipe()
            os.close(r)
            try:
                await tcp.invoke("anything", tether.Handle(w))
            except tether.HandleRefused:
                print("tcp client: a Handle over TCP is refused: HandleRefused")


if __name__ == "__main__":
    run(main())
