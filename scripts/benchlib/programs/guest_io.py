"""The guest of the live sections: 4 KiB O_DIRECT random writes (or reads) at QD1
through the mounted file, with a CLOCK_MONOTONIC stamp at each completion.

    python -m scripts.benchlib.programs.guest_io FILE SIZE STAMPS STOP SEED write|read

Prints "ready" once the file is open, runs until the file STOP exists (or 900 s), then
writes the stamps (the start first) to STAMPS as native doubles and prints
{"writes": completions, "errors": failed requests, "last_error": text}."""

import array
import json
import mmap
import os
import random
import sys
import time

BLOCK = 4096
MAX_SECONDS = 900
MAX_ERRORS = 100


def main(path, size, out, stop, seed, mode):
    reading = mode == "read"
    fd = os.open(path, (os.O_RDONLY if reading else os.O_WRONLY) | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    buf.write(b"\xa5" * BLOCK)
    if reading:

        def pw(fd, buf, off):
            return os.preadv(fd, [buf], off)
    else:
        pw = os.pwrite
    rnd = random.Random(seed).randrange
    n = size // BLOCK
    ts = array.array("d")
    mono, exists = time.monotonic, os.path.exists
    errors = 0
    last_error = ""
    ts.append(mono())
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    i = 0
    limit = mono() + MAX_SECONDS
    while True:
        i += 1
        if not (i & 63) and (exists(stop) or mono() > limit):  # the stop file, now and then
            break
        try:
            pw(fd, buf, rnd(n) * BLOCK)
        except OSError as e:
            errors += 1
            last_error = str(e)
            if errors > MAX_ERRORS:
                break
            continue
        ts.append(mono())
    os.close(fd)
    with open(out, "wb") as f:
        ts.tofile(f)
    print(json.dumps({"writes": len(ts) - 1, "errors": errors, "last_error": last_error}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
