"""qcowfs beside QEMU, measured in one run: every speed figure the README reports.

    python scripts/bench.py [--size 1G] [--only SECTION]... [--quick] [--json]

Sections (``--only`` takes these names; default: all, in this order):

  reader  sequential ``chain.read`` in 1 MiB pieces vs ``qemu-img convert -O raw``
          (and ``qemu-img bench`` reading); opening a 1 TiB sparse chain; peak RSS after
          20k random 4 KiB reads of a 1 TiB sparse chain vs ``qemu-io`` doing the same.
  writer  sequential 1 MiB ``chain.write`` into an empty active layer vs
          ``qemu-img bench -w -s 1M -t writeback`` on the same kind of image.
  mount   ``qcowfs mount`` vs ``qemu-storage-daemon``'s FUSE export of the same
          chain: fio (psync, one job, O_DIRECT) sequential 1 MiB read, 4 KiB random read,
          sequential 1 MiB write and 4 KiB random write, each into an empty overlay and
          into allocated clusters, with the server's CPU time per request; time to mount
          (to the first 4 KiB read) and to a usable ``qcowfs info`` vs ``qemu-img info``;
          the daemon's peak RSS after 20k random reads of a 1 TiB chain.
  commit  offline ``qcowfs commit active.qcow2`` vs ``qemu-img commit -b base
          top`` (the same work: (base, top] into base); live block-commit of top into base
          over our control socket vs QSD's QMP, idle and under a 4 KiB random-write load:
          time, guest write IOPS during the job vs idle, longest guest write stall and
          write latency p99.9, guest read latency, longest query-block-jobs wait.
  active  active commit (top = the active image): time to READY and to
          COMPLETED (block-job-complete sent at READY), idle and under load, ours vs QSD;
          longest write stall around the pivot.
  guard   the stranding guard's scan of 2,000 small qcow2 files.

Method: timings on a small VM swing 2x with CPU placement, so every figure compares the
two programs in the same run, alternating which goes first, pinned the same way (servers
and offline tools on CPU 0, fio and the guest load on CPU 1, with ``taskset``), over
several rounds; tables show medians and the ratio ours/QEMU. The test chain is
deterministic: base <- mid <- top <- active, 64 KiB clusters, base fully written, the
flat view ~30% top, ~21% mid (mid also holds data under about half of top's clusters),
~49% base, active empty; built with qemu-io and fixed patterns in a temporary directory
(``--tmpdir``; the default temp directory is on the same file system as the one the
figures were taken on, see the header printed). Write tests get a fresh copy of what
they write to: a new empty active layer over the (read-only) chain for mount writes, a
full copy of the chain (then ``sync``) for every commit.

The guest load for the live sections is a small Python process writing 4 KiB at random
offsets with O_DIRECT through the mounted file (QD1, pwrite, a CLOCK_MONOTONIC stamp at
each completion): IOPS in a window = completions in it / its length; the longest stall =
the longest interval between two completions that overlaps the window.

A section (or a figure) that needs a feature that does not work yet prints "n/a: why"
instead of failing. Every mount and daemon started here is taken down on every path
(``qcowfs unmount``, QMP ``quit``, then kill + ``fusermount3 -u -z``).

The package: ``main`` (options, running the sections), ``harness`` (the run's context,
timed and pinned processes, rows and tables), ``chains`` (the test chains), ``servers``
(our mount and QSD's, the QMP client), ``load`` (the guest load during live jobs), one
module per section (``reader``, ``writer``, ``mount``, ``commit`` for commit and active,
``guard``), and ``programs/``: the processes measured, run with ``python -m``.
"""
