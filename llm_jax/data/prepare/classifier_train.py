"""Training the fastText-style classifier of classifier.py in JAX with optax.

Parameters: E (buckets, dim) initialised uniform in [-1/dim, 1/dim] and w (dim,), b initialised to zero, as
fastText does (with w = 0 the first steps move w and b only; E follows once w is non-zero).

A batch is B documents of bucket ids padded to one length L, with a mask: ids_bl (B, L) int32, mask_bl (B, L)
float32 (1 for a real feature). The forward pass is the mean of the unmasked rows of E, then w · h + b:

    h_b = Σ_l mask_bl E[ids_bl] / max(Σ_l mask_bl, 1)        z_b = w · h_b + b

and the loss the weighted binary cross-entropy with logits (`weighted_logistic_loss`). Each epoch visits the
training documents in a new order drawn from the seed; the last batch is filled with rows of weight 0 and L is
rounded up to a power of two, so the step compiles for a handful of shapes only. Optimiser: AdamW whose learning
rate decays linearly to 0 over the run (fastText decays SGD's rate the same way), passed to the step as a value so
that runs of other lengths and seeds reuse the compiled step. Everything random derives from
`TrainConfig.seed`, so the same data and config give the same weights.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

MIN_PAD = 16


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    dim: int = 16
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 0.02
    weight_decay: float = 0.0
    # Adam's epsilon, above optax's 1e-8. A bucket seen in one document gets a gradient of about |w|/(n·batch), and a
    # tiny epsilon lets Adam scale that up to a full step (momentum then repeats it), so rare n-grams memorise labels
    # as fast as a signal shared by every positive is learnt. Held-out F1 / ROC AUC, eps 1e-8, 1e-5, 1e-3: quality
    # preset 0.980/0.9989, 0.982/0.9982, 0.966/0.9952; toxicity 0.922/0.984, 0.927/0.990, 0.637/0.900. A few hundred
    # one-sentence documents with a planted token want 1e-3 (their gradients are larger; the tests use it).
    adam_eps: float = 1e-5
    balance_classes: bool = True    # weight each class to half the loss, whatever their counts
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.adam_eps > 0:
            raise ValueError(f"TrainConfig.adam_eps must be > 0, got {self.adam_eps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")


def init_params(key: jax.Array, buckets: int, dim: int) -> dict:
    return dict(embeddings=jax.random.uniform(key, (buckets, dim), jnp.float32, -1.0 / dim, 1.0 / dim),
                output=jnp.zeros((dim,), jnp.float32), bias=jnp.zeros((), jnp.float32))


def forward_logits(params: dict, ids_bl: jax.Array, mask_bl: jax.Array) -> jax.Array:
    """(B,) logits z_b = w · mean of the unmasked E[ids_bl] + b (module docstring)."""
    emb_bld = params["embeddings"][ids_bl]
    count_b = jnp.maximum(mask_bl.sum(axis=1), 1.0)
    mean_bd = jnp.einsum("bld,bl->bd", emb_bld, mask_bl) / count_b[:, None]
    return mean_bd @ params["output"] + params["bias"]


def weighted_logistic_loss(logits_b: jax.Array, labels_b: jax.Array, weights_b: jax.Array) -> jax.Array:
    """Binary cross-entropy with logits, weighted:

        L = Σ_b w_b [softplus(z_b) − y_b z_b] / Σ_b w_b

    softplus(z) − y z = −[y log σ(z) + (1 − y) log(1 − σ(z))], written so that it never overflows.
    """
    per_doc_b = jax.nn.softplus(logits_b) - labels_b * logits_b
    return jnp.sum(weights_b * per_doc_b) / jnp.maximum(jnp.sum(weights_b), 1e-12)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW whose learning rate is a value of its state, set by each step (`learning_rate_at`), so that one
    compiled step serves every run length and seed."""
    return optax.inject_hyperparams(optax.adamw)(learning_rate=config.learning_rate, eps=config.adam_eps,
                                                 weight_decay=config.weight_decay)


def learning_rate_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Linear decay from `learning_rate` to 0 over the run, as fastText decays its rate."""
    return config.learning_rate * (1.0 - step / max(total_steps, 1))


def _loss(params, batch):
    return weighted_logistic_loss(forward_logits(params, batch["ids"], batch["mask"]), batch["labels"],
                                  batch["weights"])


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def train_step(optimizer, params, opt_state, batch, learning_rate):
    """One AdamW step on a batch (module docstring); `optimizer` is static: one compilation per optimizer settings
    and batch shape."""
    opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    loss, grads = jax.value_and_grad(_loss)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.lru_cache(maxsize=8)
def _optimizer(learning_rate: float, adam_eps: float, weight_decay: float) -> optax.GradientTransformation:
    """One optimizer object per setting, so that `train_step`'s static argument hashes alike across runs."""
    return make_optimizer(TrainConfig(learning_rate=learning_rate, adam_eps=adam_eps, weight_decay=weight_decay))


def padded_length(longest: int) -> int:
    return max(MIN_PAD, 1 << max(longest - 1, 0).bit_length())


def pad_batch(ids_per_doc: list[np.ndarray], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """ids (rows, L) int32 and mask (rows, L) float32, L a power of two >= the longest document; rows past the
    documents are all padding."""
    length = padded_length(max((len(ids) for ids in ids_per_doc), default=1))
    ids_bl = np.zeros((rows, length), np.int32)
    mask_bl = np.zeros((rows, length), np.float32)
    for row, ids in enumerate(ids_per_doc):
        ids_bl[row, :len(ids)] = ids
        mask_bl[row, :len(ids)] = 1.0
    return ids_bl, mask_bl


def class_weights(labels: np.ndarray, balance: bool) -> np.ndarray:
    """Per-document loss weights: n / (2 n_class) with `balance` (each class half the loss), else 1."""
    labels = np.asarray(labels, np.float32)
    if not balance:
        return np.ones_like(labels)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return np.where(labels == 1, len(labels) / (2 * n_pos), len(labels) / (2 * n_neg)).astype(np.float32)


def train_classifier(ids_per_doc: list[np.ndarray], labels: np.ndarray, buckets: int, config: TrainConfig,
                     log=None) -> tuple[dict[str, np.ndarray], list[float], float]:
    """Trains on documents given as bucket ids with labels 1/0. Returns the weights as numpy arrays, the mean loss
    of every epoch, and the training time in seconds (compilation included)."""
    labels = np.asarray(labels, np.float32)
    if len(ids_per_doc) != len(labels):
        raise ValueError(f"{len(ids_per_doc)} documents but {len(labels)} labels")
    n_pos = int(labels.sum())
    if not n_pos or n_pos == len(labels):
        raise ValueError(f"training needs both classes, got {n_pos} positives and {len(labels) - n_pos} negatives")
    start = time.perf_counter()
    weights = class_weights(labels, config.balance_classes)
    batches_per_epoch = -(-len(labels) // config.batch_size)
    optimizer = _optimizer(config.learning_rate, config.adam_eps, config.weight_decay)
    total_steps = batches_per_epoch * config.epochs
    init_key, order_key = jax.random.split(jax.random.key(config.seed))
    params = init_params(init_key, buckets, config.dim)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(order_key)))
    epoch_losses = []
    for epoch in range(config.epochs):
        order = rng.permutation(len(labels))
        losses = []
        for first in range(0, len(order), config.batch_size):
            chosen = order[first:first + config.batch_size]
            ids_bl, mask_bl = pad_batch([ids_per_doc[i] for i in chosen], config.batch_size)
            batch = dict(ids=ids_bl, mask=mask_bl,
                         labels=np.pad(labels[chosen], (0, config.batch_size - len(chosen))),
                         weights=np.pad(weights[chosen], (0, config.batch_size - len(chosen))))
            learning_rate = learning_rate_at(config, epoch * batches_per_epoch + first // config.batch_size,
                                             total_steps)
            params, opt_state, loss = train_step(optimizer, params, opt_state, batch, learning_rate)
            losses.append(loss)
        epoch_losses.append(float(np.mean(jax.device_get(losses))))
        if log:
            log(f"epoch {epoch + 1}/{config.epochs}: mean loss {epoch_losses[-1]:.4f}")
    params = {k: np.asarray(v) for k, v in jax.device_get(params).items()}
    return params, epoch_losses, time.perf_counter() - start
