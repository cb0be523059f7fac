"""Sequential ``chain.read`` of the whole flat view in pieces, open to close.

    python -m scripts.benchlib.programs.seq_read IMAGE PIECE

Prints {"seconds": ..., "bytes": virtual size}."""

import json
import sys
import time

import qcow


def main(path, piece):
    qcow.tune_malloc()  # as the qcowfs CLI and daemon do
    t = time.perf_counter()
    with qcow.open_chain(path, writable=False) as chain:
        size = chain.virtual_size
        read = chain.read
        for off in range(0, size, piece):
            read(off, min(piece, size - off))
    print(json.dumps({"seconds": time.perf_counter() - t, "bytes": size}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
