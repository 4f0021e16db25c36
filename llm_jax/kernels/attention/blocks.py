"""Block geometry shared by the flash kernels: block sizes, sequence padding, causal and window block bounds, masks.

Kernels see (B, H, T, D) queries and (B, K, S, D) keys/values, cut into `block_q` query rows and `block_kv`
key columns. Under a causal mask a key block is
- skipped when it lies wholly above the diagonal (its first key is after the block's last query),
- visible without a mask when it lies wholly below (its last key is at or before the block's first query),
- masked element-wise only on the diagonal.
A sliding window W > 0 (key s visible to query t when t − W < s ≤ t) cuts the other side the same way: a key
block wholly before the window of every query of the block is skipped, one wholly inside the window of every
query needs no window mask, and the blocks on the window's edge are masked element-wise. So each query block
sees a contiguous range of key blocks (`key_block_range`), each key block is seen by a contiguous range of query
blocks (`query_block_range`), and the kernels iterate those ranges only.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm_jax.kernels.attention.reference import MASK_VALUE

NUM_LANES, NUM_SUBLANES = 128, 8  # TPU vector register tile: (sublanes, lanes)
PAD_SEGMENT = -1  # segment id of rows added to reach a block multiple; real segment ids are ≥ 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two): forward and dQ use (q, kv); the dK/dV kernel uses (q_bwd, kv_bwd)."""
    q: int
    kv: int
    q_bwd: int
    kv_bwd: int

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value < 8 or value & (value - 1):
                raise ValueError(f"attention block size {name}={value} must be a power of two ≥ 8")

    def fitted(self, seq_len: int) -> "BlockSizes":
        """Caps every block at the sequence length rounded up to a power of two, so short sequences work."""
        cap = max(8, 1 << (seq_len - 1).bit_length())
        return BlockSizes(*(min(v, cap) for v in dataclasses.astuple(self)))

    def padded_length(self, seq_len: int) -> int:
        multiple = max(dataclasses.astuple(self))
        return -(-seq_len // multiple) * multiple


# Defaults per kernel family. TPU: large tiles keep the MXU busy and amortise the ~0.35 µs per grid step.
# Triton: the FlashAttention-2 tutorial's shapes for head dim 64–128 on Ampere/Hopper.
DEFAULT_BLOCKS = {
    "tpu": BlockSizes(q=512, kv=512, q_bwd=512, kv_bwd=512),
    "triton": BlockSizes(q=128, kv=64, q_bwd=64, kv_bwd=128),
}


def div(a, b):
    """a // b for non-negative ints, traced or not, as truncating division: Mosaic's floor division lowers
    through `sign`, which needs the TPU generation and so cannot be lowered from another host."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return jax.lax.div(a, b)


def _maximum(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def minimum(a, b):
    """min(a, b), a Python int where both are (grid sizes are computed from it), else traced."""
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def last_visible_block(q_block, block_q: int, block_kv: int):
    """Index of the last key block that the query block can see under a causal mask."""
    return div(q_block * block_q + block_q - 1, block_kv)


def first_visible_block(kv_block, block_q: int, block_kv: int):
    """Index of the first query block that can see the key block under a causal mask."""
    return div(kv_block * block_kv, block_q)


def first_key_block_in_window(q_start, block_kv: int, window: int):
    """Index of the first key block holding a key inside the window of the query at `q_start` (0 without one).

    `q_start` is the earliest query of a tile (a query block's first row, or a decode tile's earliest position),
    whose window reaches furthest back: key q_start − W + 1.
    """
    if not window:
        return 0
    return div(_maximum(q_start - window + 1, 0), block_kv)


def last_query_block_in_window(kv_block, block_q: int, block_kv: int, window: int, n_q: int):
    """Index of the last query block that sees some key of the key block under the window (n_q − 1 without one).

    The block's last key k is the last one to leave the window: query k + W − 1 is the last to see it.
    """
    if not window:
        return n_q - 1
    return minimum(div(kv_block * block_kv + block_kv - 1 + window - 1, block_q), n_q - 1)


def key_block_range(q_block, block_q: int, block_kv: int, n_kv: int, causal: bool, window: int):
    """(first, last), inclusive: the key blocks the query block sees; every block between sees some key."""
    first = first_key_block_in_window(q_block * block_q, block_kv, window)
    last = last_visible_block(q_block, block_q, block_kv) if causal else n_kv - 1
    return first, last


def query_block_range(kv_block, block_q: int, block_kv: int, n_q: int, causal: bool, window: int):
    """(first, last), inclusive: the query blocks that see some key of the key block."""
    first = first_visible_block(kv_block, block_q, block_kv) if causal else 0
    return first, last_query_block_in_window(kv_block, block_q, block_kv, window, n_q)


def most_blocks_in_a_range(block_range, n: int) -> int:
    """The longest of `block_range(x)` over x < n: the steps a grid axis iterating those ranges needs."""
    return max(last - first + 1 for first, last in map(block_range, range(n)))


def most_blocks_touched(span: int, block: int) -> int:
    """The most `block`-sized blocks that `span` ≥ 1 consecutive positions touch, over every alignment."""
    return (span - 2) // block + 2


def block_is_below_diagonal(q_start, k_start, block_kv: int):
    """Every key of the block is at or before the query block's first query: no causal mask needed."""
    return k_start + block_kv - 1 <= q_start


def block_is_inside_window(q_start, k_start, block_q: int, window: int):
    """Every key of the block is inside the window of every query of the query block (always without one):
    its first key is less than W behind the block's last query, so no window mask is needed."""
    if not window:
        return True
    return k_start + window >= q_start + block_q


def first_key_block_inside_window(q_start, block_q: int, block_kv: int, window: int):
    """Index of the first key block wholly inside the window of every query of the query block at `q_start`
    (0 without one): the first whose first key is less than W behind the block's last query."""
    if not window:
        return 0
    return div(_maximum(q_start + block_q - window + block_kv - 1, 0), block_kv)


def end_of_query_blocks_inside_window(k_start, block_q: int, window: int, n_q: int):
    """One past the last query block whose every query holds the key block at `k_start` wholly inside its
    window (n_q without one): the block's first key leaves the window first, after query k_start + W − 1."""
    if not window:
        return n_q
    return minimum(div(k_start + window, block_q), n_q)


def causal_mask(q_start, k_start, shape, q_axis: int = 0, window: int = 0):
    """bool `shape`: key position ≤ query position (and > query position − `window` with one); queries run
    along `q_axis` (1 for transposed scores)."""
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    if not window:
        return k_pos <= q_pos
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def and_masks(*masks):
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out & m
    return out


def lanes(x, n: int):
    """A (rows, 128) lane-replicated tile widened or narrowed to (rows, n)."""
    if n == NUM_LANES:
        return x
    if n < NUM_LANES:
        return x[:, :n]
    return jnp.tile(x, (1, n // NUM_LANES))


def apply_mask(scores, mask):
    return scores if mask is None else jnp.where(mask, scores, MASK_VALUE)


def pad_sequence(x, axis: int, length: int, value=0):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
