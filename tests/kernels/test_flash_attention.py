"""The Pallas flash kernels (both families, interpret mode on CPU) against the reference, with and without a
sliding window, their block geometry and the blocks they skip, and lowering for TPU and CUDA from this host."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.kernels.attention import BlockSizes, flash_attention, reference_attention
from llm_jax.kernels.attention import blocks as blk

FAMILIES = ["tpu", "triton"]
SMALL = BlockSizes(q=16, kv=32, q_bwd=32, kv_bwd=16)  # unequal tiles, so q/kv block arithmetic is exercised

CASES = [  # (batch, length, heads, kv heads, head dim, causal, packed, blocks)
    (2, 64, 4, 2, 64, True, True, SMALL),
    (1, 64, 6, 2, 64, True, False, SMALL),
    (2, 64, 4, 1, 128, False, True, SMALL),
    (1, 64, 2, 2, 128, False, False, SMALL),
    (1, 48, 4, 2, 64, True, True, BlockSizes(32, 32, 32, 32)),    # 48 is padded to 64
    (1, 40, 2, 1, 64, False, False, None),                        # default tiles, fitted and padded
]


def _inputs(b, t, h, kv, d, packed, dtype=jnp.float32, seed=0):
    kq, kk, kv_, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, t, h, d), dtype)
    k = jax.random.normal(kk, (b, t, kv, d), dtype)
    v = jax.random.normal(kv_, (b, t, kv, d), dtype)
    dout = jax.random.normal(kd, (b, t, h, d), dtype)
    segments = None
    if packed:  # three documents of uneven length, then padding (segment 0), different per row
        rows = []
        for row in range(b):
            cuts = np.array([t // 5 + row, t // 2, t - t // 8 - row])
            ids = np.searchsorted(cuts, np.arange(t), side="right") + 1
            ids[cuts[-1]:] = 0
            rows.append(ids)
        segments = jnp.asarray(np.stack(rows), jnp.int32)
    return q, k, v, dout, segments


def _value_and_grads(fn, q, k, v, dout):
    """(out, dq, dk, dv) for the cotangent dout; one jitted forward, which interpret mode runs about 2× faster."""
    def run(q_, k_, v_, dout_):
        out, vjp = jax.vjp(fn, q_, k_, v_)
        return (out,) + vjp(dout_)
    return jax.jit(run)(q, k, v, dout)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("b, t, h, kv, d, causal, packed, blocks", CASES)
def test_family_matches_the_reference(family, b, t, h, kv, d, causal, packed, blocks):
    q, k, v, dout, segments = _inputs(b, t, h, kv, d, packed)
    _check_family(family, blocks, q, k, v, dout, segment_ids_bt=segments, causal=causal)


def _check_family(family, blocks, q, k, v, dout, **options):
    """The family's kernels (interpret mode) against the reference with `options`: output and three gradients."""
    flash = lambda *a: flash_attention(*a, blocks=blocks, backend=family, interpret=True, **options)  # noqa: E731
    ref = lambda *a: reference_attention(*a, **options)  # noqa: E731
    for name, got, want in zip(["out", "dq", "dk", "dv"], _value_and_grads(flash, q, k, v, dout),
                               _value_and_grads(ref, q, k, v, dout)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_accumulates_in_float32(family):
    q, k, v, dout, segments = _inputs(2, 64, 4, 2, 64, packed=True)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v, dout)]
    flash = lambda *a: flash_attention(*a, segment_ids_bt=segments, blocks=SMALL, backend=family,  # noqa: E731
                                       interpret=True)
    ref = lambda *a: reference_attention(*a, segment_ids_bt=segments)  # noqa: E731
    got = _value_and_grads(flash, *half)
    want = _value_and_grads(ref, q, k, v, dout)  # float32 truth
    assert all(g.dtype == jnp.bfloat16 for g in got)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        # bf16 inputs carry ~3 significant digits: relative error in the norm, not elementwise
        err = np.linalg.norm(np.asarray(g, np.float32) - np.asarray(w)) / np.linalg.norm(np.asarray(w))
        assert err < 2e-2, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("window", [0, 1, 7, 16, 40])
def test_block_geometry_skips_exactly_the_invisible_blocks(window):
    """Against the element-wise mask: a block is in its ranges iff some key is visible, and runs unmasked iff
    every key is; the grid's sequential axis is as long as the longest range."""
    t = 128
    full = np.tril(np.ones((t, t), bool))  # key ≤ query
    if window:
        full &= np.arange(t)[None, :] > np.arange(t)[:, None] - window
    for bq, bk in [(16, 16), (16, 64), (64, 16), (32, 32)]:
        n_q, n_kv = t // bq, t // bk
        for i, j in itertools.product(range(n_q), range(n_kv)):
            tile = full[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            first_kv, last_kv = blk.key_block_range(i, bq, bk, n_kv, True, window)
            first_q, last_q = blk.query_block_range(j, bq, bk, n_q, True, window)
            assert (first_kv <= j <= last_kv) == tile.any() == (first_q <= i <= last_q), (bq, bk, i, j)
            inside = blk.block_is_inside_window(i * bq, j * bk, bq, window)
            assert inside == (j >= blk.first_key_block_inside_window(i * bq, bq, bk, window)) \
                == (i < blk.end_of_query_blocks_inside_window(j * bk, bq, window, n_q)), (bq, bk, i, j)
            assert (blk.block_is_below_diagonal(i * bq, j * bk, bk) and inside) == tile.all(), (bq, bk, i, j)
        key_steps = max(int(full[i * bq:(i + 1) * bq].reshape(bq, n_kv, bk).any(axis=(0, 2)).sum())
                        for i in range(n_q))
        assert blk.most_blocks_in_a_range(
            lambda i, bq=bq, bk=bk, n_kv=n_kv: blk.key_block_range(i, bq, bk, n_kv, True, window), n_q) == key_steps
    for span, block in itertools.product([1, 2, 15, 16, 17, 33], [8, 16]):
        touched = max(len({p // block for p in range(start, start + span)}) for start in range(2 * block))
        assert blk.most_blocks_touched(span, block) == touched, (span, block)


def test_block_sizes_fit_short_sequences_and_pad_long_ones():
    blocks = BlockSizes(q=512, kv=256, q_bwd=128, kv_bwd=512)
    assert blocks.fitted(100) == BlockSizes(128, 128, 128, 128)
    assert blocks.padded_length(1000) == 1024
    with pytest.raises(ValueError, match="block size kv=96 must be a power of two"):
        BlockSizes(q=64, kv=96, q_bwd=64, kv_bwd=64)


WINDOW_CASES = [  # (batch, length, heads, kv heads, window, packed, blocks); head dim 16, length ≤ 64 for speed
    (1, 64, 4, 2, 5, True, SMALL),                       # smaller than a block, packed, grouped-query
    (1, 64, 2, 1, 16, False, BlockSizes(16, 16, 16, 16)),  # exactly a block
    (2, 50, 4, 2, 40, True, SMALL),                      # several blocks; 50 is padded to 64
    (1, 40, 2, 2, 1, False, SMALL),                      # each query sees only itself; padded to 64
    (1, 24, 2, 1, 100, True, SMALL),                     # longer than the sequence: plain causal attention
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("b, t, h, kv, window, packed, blocks", WINDOW_CASES)
def test_family_with_a_window_matches_the_reference(family, b, t, h, kv, window, packed, blocks):
    q, k, v, dout, segments = _inputs(b, t, h, kv, 16, packed)
    _check_family(family, blocks, q, k, v, dout, segment_ids_bt=segments, window=window)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_wholly_outside_the_window_are_never_computed(family):
    """NaN where no visible key or query lies cannot leak: a masked block would still spread it, since its
    zero probabilities times NaN values are NaN. With blocks of 16 and W = 16, query block i sees key blocks
    i − 1 and i only."""
    t, window, blocks = 64, 16, BlockSizes(16, 16, 16, 16)
    q, k, v, dout, _ = _inputs(1, t, 4, 2, 16, packed=False)
    flash = lambda *a: flash_attention(*a, window=window, blocks=blocks, backend=family,  # noqa: E731
                                       interpret=True)
    run = jax.jit(lambda *a: _value_and_grads(flash, *a))  # one compile for both poisonings
    want = _value_and_grads(lambda *a: reference_attention(*a, window=window), q, k, v, dout)

    # Key block 0 is outside the windows of query blocks 2 and 3: their outputs and dQ stay exact.
    poisoned = [x.at[:, :16].set(jnp.nan) for x in (k, v)]
    out, dq, _, _ = run(q, *poisoned, dout)
    np.testing.assert_allclose(out[:, 32:], want[0][:, 32:], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(dq[:, 32:], want[1][:, 32:], atol=2e-5, rtol=2e-5)
    # Query blocks 2 and 3 do not see key block 0: its dK and dV stay exact.
    poisoned_q, poisoned_dout = (x.at[:, 32:].set(jnp.nan) for x in (q, dout))
    _, _, dk, dv = run(poisoned_q, k, v, poisoned_dout)
    np.testing.assert_allclose(dk[:, :16], want[2][:, :16], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(dv[:, :16], want[3][:, :16], atol=2e-5, rtol=2e-5)


def _pallas_grids(fn, *args):
    """{kernel name: grid} of every pallas_call in fn's jaxpr, nested ones included."""
    grids = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grids[eqn.params["name"]] = eqn.params["grid_mapping"].grid
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


@pytest.mark.parametrize("window, steps", [(0, 16), (32, 3), (20, 3), (8, 2)])
def test_the_tpu_grid_iterates_only_the_blocks_a_window_can_see(window, steps):
    """T = 256 in blocks of 16: a window of W keys needs about W / 16 + 1 key steps per query block (and query
    steps per key block), not the 16 of plain causal attention."""
    q, k, v, dout, _ = _inputs(1, 256, 4, 2, 16, packed=False)
    flash = lambda *a: flash_attention(*a, window=window, blocks=BlockSizes(16, 16, 16, 16),  # noqa: E731
                                       backend="tpu", interpret=True)
    grids = _pallas_grids(lambda *a: _value_and_grads(flash, *a), q, k, v, dout)
    assert grids == {"flash_attention_fwd": (1, 4, 16, steps), "flash_attention_dq": (1, 4, 16, steps),
                     "flash_attention_dkdv": (1, 2, 16, 2, steps)}


def test_bad_shapes_are_named():
    q, k, v, _, _ = _inputs(1, 32, 4, 3, 64, packed=False)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        flash_attention(q, k, v, interpret=True, backend="tpu")
    q, k, v, _, _ = _inputs(1, 32, 2, 1, 8, packed=False)
    with pytest.raises(ValueError, match="head dims 16–128, or 256; got 8"):
        flash_attention(q, k, v, interpret=True, backend="tpu")
    q, k, v, _, _ = _inputs(1, 32, 2, 1, 64, packed=False)
    with pytest.raises(ValueError, match=r"segment ids of shape \(1, 31\) do not match"):
        flash_attention(q, k, v, segment_ids_bt=jnp.ones((1, 31), jnp.int32), interpret=True, backend="tpu")
    with pytest.raises(ValueError, match="backend 'mosaic' is not one of"):
        flash_attention(q, k, v, backend="mosaic")
    with pytest.raises(ValueError, match=r"window \(window=4\) needs causal attention"):
        flash_attention(q, k, v, causal=False, window=4, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="window must be ≥ 0 .* got -1"):
        flash_attention(q, k, v, window=-1, backend="tpu", interpret=True)


# ------------------------------------------------------------------------------------------------- lowering
@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"), ("cuda", "triton")])
@pytest.mark.parametrize("d, causal, packed, window", [(128, True, True, 0), (64, True, False, 0),
                                                       (128, False, False, 0), (128, True, True, 700)])
def test_forward_and_backward_lower_for_accelerators(platform, marker, d, causal, packed, window):
    """Mosaic and Triton lowering run on this CPU host; compiling (VMEM limits, PTX) needs the device."""
    q = jax.ShapeDtypeStruct((2, 2048, 8, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 2048, 2, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 2048), jnp.int32)

    def loss(q_, k_, v_, seg_):
        out = flash_attention(q_, k_, v_, segment_ids_bt=seg_ if packed else None, causal=causal, window=window)
        return jnp.sum(out.astype(jnp.float32))
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(
        lowering_platforms=(platform,))
    text = lowered.as_text()
    assert text.count(marker) >= 3, f"expected forward, dQ and dK/dV kernels as {marker}"


@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"), ("cuda", "triton")])
def test_the_1b_train_step_lowers_with_the_pallas_kernels(platform, marker):
    """The whole sharded train step of configs/pretrain.py:1b, on abstract shapes (no memory), over 8 devices."""
    from llm_jax import sharding
    from llm_jax.config_lib import load
    from llm_jax.model.config import ModelConfig
    from llm_jax.objectives import get_objective
    from llm_jax.train.loop import build_training

    config = load("configs/pretrain.py:1b", ["model.attention_impl=pallas"])
    mesh, rules = sharding.make_mesh(config.mesh), sharding.check_rules(config.mesh_rules)
    training = build_training(config, ModelConfig.from_config(config.model), mesh, rules,
                              get_objective(config.objective))
    shape = (config.data.batch_size, config.data.seq_len)
    batch = {key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == "loss_mask" else jnp.int32,
                                       sharding=training.batch_sharding)
             for key in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    assert config.model.remat == "dots_attention"
    text = training.train_step.trace(training.abstract_state, batch).lower(lowering_platforms=(platform,)).as_text()
    # one scanned layer's kernels: forward, dQ and dK/dV; the remat policy keeps the forward's residuals, so
    # the backward does not run the forward kernel again
    assert text.count(marker) == 3
    for kernel in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkdv"):
        assert text.count(kernel) >= 1, kernel


ACCELERATOR = jax.default_backend() in ("gpu", "tpu")


@pytest.mark.skipif(not ACCELERATOR, reason="compiles the kernels for a real GPU or TPU")
@pytest.mark.parametrize("impl", ["pallas", "cudnn"])
@pytest.mark.parametrize("d, causal, packed", [(128, True, True), (64, True, False), (128, False, False)])
def test_compiled_kernels_match_the_reference_on_the_device(impl, d, causal, packed):
    from llm_jax.kernels.attention import attention
    if impl == "cudnn" and jax.default_backend() != "gpu":
        pytest.skip("cuDNN is NVIDIA only")
    q, k, v, dout, segments = _inputs(2, 1024, 8, 2, d, packed, dtype=jnp.bfloat16)
    fn = jax.jit(lambda *a: attention(*a, segment_ids_bt=segments, causal=causal, impl=impl))
    ref = lambda *a: reference_attention(*a, segment_ids_bt=segments, causal=causal)  # noqa: E731
    f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
    for name, got, want in zip(["out", "dq", "dk", "dv"], _value_and_grads(fn, q, k, v, dout),
                               _value_and_grads(ref, *f32)):
        err = np.linalg.norm(np.asarray(got, np.float32) - np.asarray(want)) / np.linalg.norm(np.asarray(want))
        assert err < 2e-2, f"{name}: relative error {err:.3g}"
