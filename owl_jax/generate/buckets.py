"""Shape buckets: prompt lengths, token capacities, batch sizes and image counts are rounded up
so that a new request rarely means a new compile."""
from __future__ import annotations


def bucket_length(n: int, minimum: int = 32, per_octave: int = 4) -> int:
    """Prompt-length bucket: `per_octave` buckets between consecutive powers of two, at least
    `minimum` tokens apart (32, 64, 96, 128, 160, 192, 224, 256, 320, 384, ...), so a prompt
    pays at most ~25% (or < `minimum` tokens) of padded prefill, and a few compiles per octave."""
    if n <= minimum:
        return minimum
    step = max(minimum, (1 << ((n - 1).bit_length() - 1)) // per_octave)
    return -(-n // step) * step


def pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())
