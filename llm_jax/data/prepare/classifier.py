"""A fastText-style binary document classifier (Joulin et al. 2017, "Bag of Tricks for Efficient Text
Classification"): its saved file and its scoring in NumPy, which is what data preparation runs per document.

The model (trained in JAX by classifier_train.py):

    f_1 .. f_n   the document's hashed n-gram bucket ids (classifier_features.py)
    h            = (1/n) Σ_i E[f_i]                 E: (buckets, dim) embedding table, h: (dim,)
    z            = w · h + b                        w: (dim,), b: scalar; z is the logit
    p(positive)  = σ(z)

For one logit the mean of embeddings and the linear layer commute: w · (1/n) Σ E[f_i] = (1/n) Σ (E w)[f_i]. So
scoring needs only the per-bucket scalar table s = E w (buckets,) and b:

    p(positive) = σ((1/n) Σ_i s[f_i] + b)

one gather and one mean per document, no matrix product. A document with no features scores σ(b).

The mean dilutes a signal confined to one part of a long document (one abusive paragraph among many clean ones), so
a document may instead be scored as its highest-scoring paragraph (`pooling="max_paragraph"`; paragraphs are
separated by blank lines). That raises recall on long documents and, since a document gets as many chances to score
high as it has paragraphs, the false-positive rate: the classifier's report measures both poolings.

What "positive" means is the training data's: a quality classifier is trained with good documents as positives
(prepare's `quality_classifier` step drops documents scoring below its threshold), a toxicity classifier with toxic
ones (`toxicity_classifier` drops those scoring at or above it).

The file, `classifier.npz` (written byte-for-byte the same for the same weights, so its sha256 names the model):
    settings        a JSON string: format, features (classifier_features.FeatureConfig), dim, threshold
    bucket_scores   (buckets,) float32, s = E w
    bias            () float32, b
    embeddings      (buckets, dim) float32, E      (kept to resume or inspect; scoring does not read it)
    output          (dim,) float32, w
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import zipfile

import numpy as np

from llm_jax.data.prepare.classifier_features import FeatureConfig, feature_ids
from llm_jax.files import file_sha256

FORMAT = "llm_jax/fasttext-binary-classifier/1"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)   # a fixed member time: the same weights give the same file bytes
_SCORING_KEYS = ("settings", "bucket_scores", "bias")


# How a document's score is taken: the mean over the whole document (what the model was trained on), or the
# highest score among its paragraphs, so that one bad paragraph in a long document is not averaged away.
POOLINGS = ("document", "max_paragraph")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def paragraphs(text: str) -> list[str]:
    """The text's blank-line-separated paragraphs that hold more than whitespace; [text] when there are none."""
    found = [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    return found or [text]


class ModelFileError(ValueError):
    """A classifier file that is missing or not one this module wrote; names the file and what is wrong."""


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))   # σ without exp overflow for large |z|


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
    """What scoring needs: the feature settings, the per-bucket scores s = E w, the bias and the saved threshold."""
    features: FeatureConfig
    bucket_scores: np.ndarray      # (buckets,) float32
    bias: float
    threshold: float
    path: str = ""

    def logits_of_ids(self, ids_per_doc: list[np.ndarray]) -> np.ndarray:
        """(n_docs,) float64 logits z = mean_i s[f_i] + b of documents given as bucket ids."""
        lengths = np.array([len(ids) for ids in ids_per_doc], np.int64)
        if not len(lengths):
            return np.zeros(0)
        flat = np.concatenate(ids_per_doc) if lengths.sum() else np.zeros(0, np.int32)
        sums = np.bincount(np.repeat(np.arange(len(lengths)), lengths), self.bucket_scores[flat].astype(np.float64),
                           minlength=len(lengths))
        return sums / np.maximum(lengths, 1) + self.bias

    def scores(self, texts: list[str]) -> np.ndarray:
        """(n_docs,) p(positive) of each text."""
        return sigmoid(self.logits_of_ids([feature_ids(t, self.features) for t in texts]))

    def score(self, text: str, pooling: str = "document") -> float:
        """p(positive) of the text (`pooling="document"`), or of its highest-scoring paragraph ("max_paragraph")."""
        if pooling == "max_paragraph":
            return max(self.score(p) for p in paragraphs(text))
        if pooling != "document":
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        ids = feature_ids(text, self.features)
        mean = float(self.bucket_scores[ids].astype(np.float64).mean()) if len(ids) else 0.0
        return float(sigmoid(mean + self.bias))

    def max_paragraph_scores(self, texts: list[str]) -> np.ndarray:
        """(n_docs,) the highest p(positive) among each text's paragraphs, scored in one batch."""
        pieces = [paragraphs(t) for t in texts]
        scores = self.scores([p for ps in pieces for p in ps])
        ends = np.cumsum([len(ps) for ps in pieces])
        return np.array([scores[end - len(ps):end].max() for end, ps in zip(ends, pieces)])


def bucket_scores(embeddings_bd: np.ndarray, output_d: np.ndarray) -> np.ndarray:
    """s = E w, (buckets,) float32: the binary model collapsed to one scalar per bucket (module docstring)."""
    return (np.asarray(embeddings_bd, np.float64) @ np.asarray(output_d, np.float64)).astype(np.float32)


def save_classifier(path: str, params: dict, features: FeatureConfig, threshold: float) -> str:
    """Writes `params` (embeddings, output, bias) as a classifier file; returns its sha256. Written under a
    temporary name and renamed, so a reader never sees half a file."""
    embeddings = np.asarray(params["embeddings"], np.float32)
    if embeddings.shape[0] != features.buckets:
        raise ValueError(f"embeddings have {embeddings.shape[0]} rows, features.buckets is {features.buckets}")
    settings = dict(format=FORMAT, features=features.to_json(), dim=int(embeddings.shape[1]),
                    threshold=float(threshold))
    arrays = dict(settings=np.array(json.dumps(settings, sort_keys=True)),
                  bucket_scores=bucket_scores(embeddings, params["output"]),
                  bias=np.asarray(params["bias"], np.float32).reshape(()),
                  embeddings=embeddings, output=np.asarray(params["output"], np.float32))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), buffer.getvalue())
    os.replace(tmp, path)
    return file_sha256(path)


def _read_arrays(path: str, keys) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise ModelFileError(f"classifier file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as saved:
            missing = [k for k in keys if k not in saved.files]
            if missing:
                raise ModelFileError(f"{path} is not a classifier file: it has no {missing[0]!r} array "
                                     f"(arrays: {sorted(saved.files)[:8]})")
            return {k: saved[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(f"{path} is not a classifier file (an .npz written by `llm-jax classifier`): "
                             f"{type(e).__name__}: {e}") from None


def read_settings(path: str) -> dict:
    """The settings JSON of a classifier file, checked for the format (ModelFileError otherwise)."""
    raw = _read_arrays(path, ("settings",))["settings"]
    try:
        settings = json.loads(str(raw))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: its settings are not JSON ({e})") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        found = settings.get("format") if isinstance(settings, dict) else type(settings).__name__
        raise ModelFileError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return settings


def load_classifier(path: str) -> Classifier:
    """The scoring part of a classifier file (ModelFileError if it is missing or not a classifier file)."""
    settings = read_settings(path)
    arrays = _read_arrays(path, _SCORING_KEYS)
    try:
        features, threshold = FeatureConfig(**settings["features"]), float(settings["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: its settings are invalid ({type(e).__name__}: {e})") from None
    table = arrays["bucket_scores"]
    if table.shape != (features.buckets,) or table.dtype != np.float32:
        raise ModelFileError(f"{path}: bucket_scores is {table.dtype}{list(table.shape)}, expected "
                             f"float32[{features.buckets}]")
    return Classifier(features, table, float(arrays["bias"]), threshold, path)


def load_params(path: str) -> dict[str, np.ndarray]:
    """The full weights (embeddings, output, bias) of a classifier file, e.g. to check them against JAX."""
    read_settings(path)
    return _read_arrays(path, ("embeddings", "output", "bias"))
