"""Compressed clusters: raw deflate (QEMU's default) and zstd.

QEMU stores each compressed cluster as raw deflate without a zlib header, or as one or
more zstd frames without a length prefix. The descriptor's length is rounded up to
sectors, so trailing bytes after the stream are normal and ignored.
"""

import threading
import zlib

from .header import COMPRESSION_DEFLATE

# zstandard's decompressors are not thread-safe: one per thread (reads run in parallel)
_local = threading.local()


def _zstd(zstandard):
    d = getattr(_local, "zstd", None)
    if d is None:
        d = _local.zstd = zstandard.ZstdDecompressor()
    return d


def decompress(data, cluster_size, compression_type):
    """Exactly one cluster of output, or ValueError if the stream is short or broken."""
    if compression_type == COMPRESSION_DEFLATE:
        try:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        except zlib.error as e:
            raise ValueError(f"bad deflate stream: {e}") from None
    else:
        import zstandard  # here: only images holding zstd clusters pay for loading it

        out = bytearray()
        try:
            reader = _zstd(zstandard).stream_reader(data, read_across_frames=True)
            while len(out) < cluster_size:
                chunk = reader.read(cluster_size - len(out))
                if not chunk:
                    break
                out += chunk
        except zstandard.ZstdError as e:
            raise ValueError(f"bad zstd stream: {e}") from None
    if len(out) != cluster_size:
        raise ValueError(f"compressed cluster decodes to {len(out)} bytes, not {cluster_size}")
    return bytes(out)
