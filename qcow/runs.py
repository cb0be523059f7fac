"""Runs: the (start, length, ...) tuples every mapping answer is made of, merged as built."""


def append_run(out, run, host_index=None):
    """Append `run` = (start, length, *fields) to `out`, merging it into the last run
    when that one ends where `run` starts and every other field is equal, except the
    field at `host_index`: a host offset that must continue the last run's instead
    (or be None in both). Works for plain tuples and named tuples alike."""
    if out:
        last = out[-1]
        if last[0] + last[1] == run[0]:
            if host_index is None:
                same = last[2:] == run[2:]
            else:
                h, n = last[host_index], run[host_index]
                same = (
                    last[2:host_index] == run[2:host_index]
                    and last[host_index + 1 :] == run[host_index + 1 :]
                    and (
                        (h is None and n is None)
                        or (h is not None and n is not None and h + last[1] == n)
                    )
                )
            if same:
                merged = (last[0], last[1] + run[1]) + tuple(last[2:])
                out[-1] = last._make(merged) if hasattr(last, "_make") else merged
                return
    out.append(run)
