"""Seeds derived from the run seed and names, identical on every node and run."""

import zlib


def derive_seed(*parts: object) -> int:
    """A 31-bit seed for ``parts`` (e.g. run seed, stage, purpose, task name)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF
