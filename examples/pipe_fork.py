"""The classic C pipe example with tether.pipe(): a forked child reads whole messages."""

from __future__ import annotations

import hashlib
import os
import sys

import tether

reader, writer = tether.pipe()
big = os.urandom(4 * 1024 * 1024)  # far bigger than the pipe's kernel buffer
sys.stdout.flush()  # or the child would print our buffered output again

pid = os.fork()
if pid == 0:  # child: close the write end, read until the parent closes its end
    writer.close()
    first = reader.recv(timeout=10.0).decode()
    print(f"Child received message: {first}", flush=True)
    for data in reader:  # stops cleanly at end of stream
        print(f"Child received {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    reader.close()
    sys.stdout.flush()
    os._exit(0)

reader.close()  # parent: close the read end, write, close, wait
message = "Psst .. hello from parent process!"
print(f"Parent process message: {message}", flush=True)
# Both parent lines go out before the child can print: their output shares a pipe.
print(f"Parent sends {len(big)} bytes, sha256 {hashlib.sha256(big).hexdigest()[:16]}", flush=True)
writer.send(message)
writer.send(big)
writer.close()  # the child's loop ends after the last message
_, status = os.waitpid(pid, 0)
print(f"child exited with code {os.waitstatus_to_exitcode(status)}")
