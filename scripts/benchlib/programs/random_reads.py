"""Memory after random 4 KiB reads of a chain: the offsets come from a file (one per
line).

    python -m scripts.benchlib.programs.random_reads IMAGE OFFSETS_FILE

Prints {"before": RSS after open, "after": RSS after the reads, "peak": peak RSS}, bytes."""

import json
import resource
import sys

import qcow


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main(path, offsets):
    with open(offsets) as f:
        offs = [int(x) for x in f.read().split()]
    with qcow.open_chain(path, writable=False) as chain:
        chain.read(0, 4096)
        before = rss()
        for off in offs:
            chain.read(off, 4096)
        after = rss()
    print(
        json.dumps(
            {
                "before": before,
                "after": after,
                "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
