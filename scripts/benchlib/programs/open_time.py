"""How long opening a chain takes: N times open_chain, one 4 KiB read at the end of the
flat view, close.

    python -m scripts.benchlib.programs.open_time IMAGE N

Prints {"times": [seconds, ...]}."""

import json
import sys
import time

import qcow


def main(path, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with qcow.open_chain(path, writable=False) as chain:
            chain.read(chain.virtual_size - 4096, 4096)
        times.append(time.perf_counter() - t)
    print(json.dumps({"times": times}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
