"""Real failures planted in files (shared by the checkpoint tests)."""


def corrupt_mid_member(path, nbytes=16384, seed=0):
    """Overwrite ``nbytes`` in the middle of the largest tensor storage of torch zip file ``path`` with random
    bytes: same size, zip directory and headers intact (the corruption a bad disk or a bit flip leaves).
    Returns the member's name."""
    import random
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len
        n = min(nbytes, info.file_size // 2)
        f.seek(start + (info.file_size - n) // 2)
        f.write(random.Random(seed).randbytes(n))
    return info.filename
