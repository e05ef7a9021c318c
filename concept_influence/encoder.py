"""A learned encoder of a gradient index's rows: one forward pass per example (no backward) gives a code of ``m``
numbers whose product with a projected query approximates the index's score (issue 28; Influcoder-style).

* **Features** (:mod:`.encoder_features`): at each of the example's loss tokens, the inputs ``a_t`` of the index's
  maps (each distinct input once) projected on the index's own input bases ``P_in`` (the ``a`` side of a row
  ``Σ_t (P_outᵀ g_t)(P_inᵀ a_t)ᵀ``), standardised; the example's features are their mean over the tokens and the mean
  of the token second moments in their top principal components (a row is a sum over tokens of a product of two token
  quantities, which a linear map of the means alone cannot express). The forward stops after the last block read.
* **Code**: the centred rows of a training sample give their top-``m`` principal subspace ``B`` ``[D, m]`` and mean
  ``μ``; the code of ``z`` is a ridge regression (scikit-learn ``RidgeCV``, penalty by leave-one-out) of its
  coordinates ``Bᵀ(r_z − μ)`` on its features. The reconstruction ``μ + B·code`` lives in the index's space, so any
  query the index answers (:func:`~concept_influence.index.query.checkpoint_query`: projected and preconditioned as
  the index does it) scores ``z`` as ``−(code·(Bᵀq) + μ·q)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .curvature.ekfac import DEFAULT_DAMPING_FACTOR
from .data import TokenizedExample, iter_batches
from .encoder_features import EncoderError, TokenFeatures, distinct_inputs, forward_tokens
from .estimators import GradientEstimator
from .fileio import load_tensors_and_metadata, save_tensors
from .index import GradientIndex
from .index.query import checkpoint_query, query_mode
from .index.store import STORAGE_DTYPES, IndexStore
from .models import ModelAdapter
from .scores import Scores

__all__ = ["EncoderError", "Codes", "RowEncoder", "fit_linear_codes", "ALPHAS"]

#: the ridge penalties ``RidgeCV`` chooses from (on standardised features)
ALPHAS = tuple(float(a) for a in 10.0 ** np.arange(-2.0, 6.5, 0.5))
FORMAT = "concept-influence-encoder"
_TENSORS = ("token_mean", "token_scale", "token_basis", "feature_mean", "feature_scale", "coef", "intercept", "basis",
            "row_mean")


@dataclass
class Codes:
    """The codes ``values`` ``[N, m]`` (in their storage dtype) of the examples ``ids``, made by the encoder whose
    digest is ``encoder``."""

    ids: list[str]
    values: torch.Tensor
    encoder: str

    @property
    def bytes_per_example(self) -> int:
        return self.values.shape[1] * self.values.element_size()

    def save(self, path: str | Path) -> Path:
        """Write the codes as safetensors (ids and the encoder's digest in the header)."""
        meta = {"codes": json.dumps({"ids": self.ids, "encoder": self.encoder})}
        return save_tensors(path, {"codes": self.values.contiguous()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Codes":
        tensors, meta = load_tensors_and_metadata(path, EncoderError)
        try:
            info = json.loads(meta["codes"])
            return cls(info["ids"], tensors["codes"], info["encoder"])
        except (KeyError, ValueError):
            raise EncoderError(f"{path}: not a codes file (written by Codes.save)") from None


class RowEncoder:
    """Forward-only codes of a gradient index's rows (see the module docstring); :meth:`fit` makes one."""

    def __init__(self, tensors: dict[str, torch.Tensor], info: dict):
        self.tensors, self.info = tensors, info
        self.features = TokenFeatures(tensors["token_mean"], tensors["token_scale"], tensors["token_basis"])

    @property
    def m(self) -> int:
        """The code's length."""
        return self.tensors["coef"].shape[1]

    @property
    def digest(self) -> str:
        return self.info["digest"]

    @classmethod
    def fit(cls, index: GradientIndex | str | Path, adapter: ModelAdapter, examples: Sequence[TokenizedExample], *,
            m: int = 64, sample: int | float = 0.25, token_rank: int = 32, last_block: int | None = None, seed: int = 0,
            checkpoint: int = 0, alphas: Sequence[float] = ALPHAS, batch_size: int = 16, progress: bool = True) -> "RowEncoder":
        """Fit on the rows of a uniform random ``sample`` (a count, or a fraction of the indexed examples) of the
        index's checkpoint ``checkpoint``: ``examples`` are the indexed examples (any order), ``adapter`` the model
        the checkpoint was indexed on; ``m`` the code's length, ``token_rank`` the principal components of a token
        whose second moments are features; ``last_block``: only the inputs of the maps of blocks up to it are read, so
        the forward stops there (default: the index's last block). ``info["sample_ids"]`` records the sample."""
        store = index.store if isinstance(index, GradientIndex) else IndexStore.open(index)
        entries = store.manifest["checkpoints"]
        if not 0 <= checkpoint < len(entries) or not entries[checkpoint].get("finished"):
            raise EncoderError(f"{store.path}: checkpoint {checkpoint} is not a finished checkpoint of the index "
                               f"({len(entries)} checkpoints)")
        _check_model(store.path, entries[checkpoint], adapter, "the index's checkpoint was built on")
        blocks = [e["block"] for e in store.manifest["maps"]]
        last_block = max(blocks) if last_block is None else last_block
        if not min(blocks) <= last_block <= max(blocks):
            raise EncoderError(f"last_block={last_block}: the index's maps are in blocks {min(blocks)}..{max(blocks)}")
        by_id = {e.id: e for e in examples}
        ids = [i for shard in range(entries[checkpoint]["n_shards"]) for i in store.rows(checkpoint, shard)[0]]
        missing = [i for i in ids if i not in by_id]
        if missing or len(by_id) != len(ids):
            raise EncoderError(f"examples: {len(by_id)} given, the index holds {len(ids)} (first indexed id not given: "
                               f"{missing[0] if missing else '-'}); pass the examples the index was built on")
        n = round(sample * len(ids)) if isinstance(sample, float) else int(sample)
        if not m >= 1 or not m < n <= len(ids):
            raise EncoderError(f"sample={sample!r} gives {n} examples and m={m}: the sample must hold more examples "
                               f"than the code has dimensions (m < sample <= {len(ids)}, m >= 1)")
        chosen = sorted(np.random.default_rng(seed).choice(len(ids), n, replace=False).tolist())
        rows = _rows_of(store, checkpoint, {ids[i] for i in chosen})
        spaces = store.load_spaces(checkpoint)
        layout = distinct_inputs(adapter, [e for e in store.manifest["maps"] if e["block"] <= last_block], spaces)
        loss_tokens = store.manifest["settings"]["loss_tokens"]
        tokens = [t for part in _batches([by_id[ids[i]] for i in chosen], batch_size, adapter, "fit encoder", progress)
                  for t in forward_tokens(adapter, layout, spaces, part, loss_tokens)]
        features = TokenFeatures.fit(tokens, token_rank)
        y = torch.stack([rows[ids[i]] for i in chosen])
        tensors = {"token_mean": features.mean, "token_scale": features.scale, "token_basis": features.basis,
                   **fit_linear_codes(features.pooled(tokens), y, m, alphas)}
        digest = hashlib.sha256(b"".join(tensors[k].numpy().tobytes() for k in _TENSORS)).hexdigest()[:16]
        info = {"format": FORMAT, "index": str(store.path.resolve()), "checkpoint": checkpoint,
                "fingerprint": entries[checkpoint]["fingerprint"], "maps": store.manifest["maps"],
                "feature_maps": layout, "loss_tokens": loss_tokens,
                "sample": n, "indexed": len(ids), "seed": seed, "digest": digest,
                "sample_ids": [ids[i] for i in chosen]}
        return cls(tensors, info)

    def encode(self, adapter: ModelAdapter, examples: Sequence[TokenizedExample], *, dtype: str = "float16",
               batch_size: int = 16, progress: bool = True) -> Codes:
        """The codes of ``examples`` (any, not only indexed ones) from one forward pass each, stored in ``dtype``."""
        if dtype not in STORAGE_DTYPES:
            raise EncoderError(f"dtype {dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
        _check_model(self.info["index"], self.info, adapter, "the encoder was fitted on")
        spaces = self._index().load_spaces(self.info["checkpoint"])
        t = self.tensors
        parts = []
        for batch in _batches(examples, batch_size, adapter, "encode", progress):
            x = self.features.pooled(forward_tokens(adapter, self.info["feature_maps"], spaces, batch,
                                                      self.info["loss_tokens"]))
            parts.append(((x - t["feature_mean"]) / t["feature_scale"]) @ t["coef"] + t["intercept"])
        values = torch.cat(parts) if parts else torch.zeros(0, self.m)
        return Codes([e.id for e in examples], values.to(STORAGE_DTYPES[dtype]), self.digest)

    def score(self, estimator: GradientEstimator, adapter: ModelAdapter, codes: Codes, *, curvature: str = "ekfac",
              damping_factor: float = DEFAULT_DAMPING_FACTOR, batch_size: int = 8, progress: bool = True) -> Scores:
        """``estimator``'s approximate scores of the examples of ``codes``: the index's query (``curvature`` as in
        :meth:`GradientIndex.score`) times each code's reconstruction. A :class:`Scores` (estimator
        ``<name>[encoder]``), usable as the first stage of :func:`~concept_influence.retrieval.certified_retrieval`."""
        if codes.encoder != self.digest:
            raise EncoderError(f"codes made by encoder {codes.encoder}, this encoder is {self.digest}; encode the "
                               "examples with this encoder")
        if codes.values.ndim != 2 or codes.values.shape != (len(codes.ids), self.m):
            raise EncoderError(f"codes of shape {tuple(codes.values.shape)} for {len(codes.ids)} ids; this encoder's "
                               f"codes are [N, {self.m}]")
        store = self._index()
        q, columns, used = checkpoint_query(store, self.info["checkpoint"], estimator, adapter,
                                            query_mode(estimator, curvature), damping_factor, batch_size, progress)
        width = q.shape[0]
        projected = self.tensors["basis"][:width].T @ q  # [m, K]
        offset = self.tensors["row_mean"][:width] @ q
        values = -(codes.values.float() @ projected + offset)
        meta = {"index": self.info["index"], "encoder": self.digest, "m": self.m, "curvature": query_mode(estimator, curvature),
                "maps": [m.name for m in used], "sample": self.info["sample"], "indexed": self.info["indexed"]}
        return Scores(list(codes.ids), values.double().numpy(), f"{estimator.name}[encoder]", columns, meta)

    def _index(self) -> IndexStore:
        """The index the encoder was fitted on, refused when it was rebuilt since (other maps, or another model at the
        checkpoint): its projections are the features' and the query's."""
        store = IndexStore.open(self.info["index"])
        entries = store.manifest["checkpoints"]
        c = self.info["checkpoint"]
        if store.manifest["maps"] != self.info["maps"] or c >= len(entries) or \
                entries[c]["fingerprint"] != self.info["fingerprint"]:
            raise EncoderError(f"{store.path}: the index changed since the encoder was fitted (its maps or the model at "
                               f"checkpoint {c}); fit the encoder again")
        return store

    def save(self, path: str | Path) -> Path:
        """Write the encoder as one safetensors file (its settings in the header)."""
        return save_tensors(path, self.tensors, {"encoder": json.dumps(self.info)})

    @classmethod
    def load(cls, path: str | Path) -> "RowEncoder":
        tensors, meta = load_tensors_and_metadata(path, EncoderError)
        info = json.loads(meta.get("encoder", "{}"))
        if info.get("format") != FORMAT or any(k not in tensors for k in _TENSORS):
            raise EncoderError(f"{path}: not an encoder file (written by RowEncoder.save)")
        return cls(tensors, info)


def fit_linear_codes(x: torch.Tensor, y: torch.Tensor, m: int, alphas: Sequence[float] = ALPHAS) -> dict[str, torch.Tensor]:
    """The linear part of an encoder, from features ``x`` ``[n, F]`` and rows ``y`` ``[n, D]``: the rows' mean
    ``row_mean`` and top-``m`` principal directions ``basis`` ``[D, m]``, and the ridge regression (penalty chosen
    from ``alphas`` by leave-one-out) of the coordinates on the standardised features (``feature_mean``,
    ``feature_scale``, ``coef`` ``[F, m]``, ``intercept``): ``code = (x − mean)/scale · coef + intercept``."""
    from sklearn.linear_model import RidgeCV

    x, y = x.double(), y.double()
    feature_mean, feature_scale = x.mean(0), x.std(0).clamp_min(1e-12)
    row_mean = y.mean(0)
    basis = _principal_directions(y - row_mean, m)
    ridge = RidgeCV(alphas=np.asarray(alphas, dtype=float))
    ridge.fit(((x - feature_mean) / feature_scale).numpy(), ((y - row_mean) @ basis).numpy())
    out = {"feature_mean": feature_mean, "feature_scale": feature_scale, "coef": torch.from_numpy(ridge.coef_.T.copy()),
           "intercept": torch.from_numpy(np.asarray(ridge.intercept_, dtype=np.float64)).reshape(m), "basis": basis,
           "row_mean": row_mean}
    return {k: v.float().contiguous() for k, v in out.items()}


def _principal_directions(a: torch.Tensor, m: int) -> torch.Tensor:
    """The top-``m`` right singular vectors of ``a`` ``[n, D]`` as columns ``[D, m]``, from the eigenvectors of the
    smaller of ``a aᵀ`` and ``aᵀ a`` (exact up to rounding, in double; a full SVD of a sample's rows, 4,000 × 16,224,
    took 184 s on one thread, most of an encoder's fit). With ``a aᵀ`` (n < D), directions beyond the rank of ``a``
    are zero."""
    n, d = a.shape
    if n >= d:
        return torch.linalg.eigh(a.T @ a).eigenvectors.flip(1)[:, :m]
    values, vectors = torch.linalg.eigh(a @ a.T)
    values, vectors = values.flip(0)[:m], vectors.flip(1)[:, :m]
    singular = values.clamp_min(0).sqrt()
    kept = singular > singular[0] * 1e-7
    return torch.where(kept, (a.T @ vectors) / torch.where(kept, singular, 1.0), 0.0)


def _check_model(where, entry: dict, adapter: ModelAdapter, what: str) -> None:
    if adapter.fingerprint() != entry["fingerprint"]:
        raise EncoderError(f"{where}: {what} model {entry['fingerprint']}, this model's fingerprint is "
                           f"{adapter.fingerprint()}; use that model")


def _rows_of(store: IndexStore, c: int, wanted: set[str]) -> dict[str, torch.Tensor]:
    """The stored rows (float32, full width) of the ids ``wanted`` at checkpoint ``c``."""
    out = {}
    for ids, block in store.iter_rows(c, store.dim):
        for i, id_ in enumerate(ids):
            if id_ in wanted:
                out[id_] = block[i].clone()
    return out


def _batches(examples, batch_size: int, adapter: ModelAdapter, desc: str, progress: bool):
    return tqdm(iter_batches(examples, batch_size, adapter.pad_token_id), total=-(-len(examples) // batch_size),
                desc=desc, disable=not progress, leave=False)
