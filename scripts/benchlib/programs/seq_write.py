"""Sequential ``chain.write`` of TOTAL bytes in pieces into a writable chain, then close
(flush, fdatasync).

    python -m scripts.benchlib.programs.seq_write IMAGE TOTAL PIECE PATTERN

Prints {"loop": seconds of the writes, "total": seconds including the close}."""

import json
import sys
import time

import qcow


def main(path, total, piece, pattern):
    buf = bytes([pattern]) * piece
    t = time.perf_counter()
    with qcow.open_chain(path, writable=True) as chain:
        write = chain.write
        for off in range(0, total, piece):
            write(off, buf)
        loop = time.perf_counter() - t
    print(json.dumps({"loop": loop, "total": time.perf_counter() - t}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
