"""Validation, decoding for monitoring, and the baselines every run is measured against.

Decoding is nearest-neighbour retrieval: a predicted embedding decodes to the validation target
text whose teacher embedding is closest. Top-1 is "decoded text == true target"; BLEU compares the
decoded texts with the true targets (sacrebleu, corpus level).

Baselines on the same validation rows (see `baselines`): identity, the mean target, ridge
regression and kernel ridge regression, each fitted on the training rows only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model import EnergyLattice, lattice_loss

from .data.datasets import Split
from .data.teacher import default_cache_dir
from .files import atomic_write


@dataclass
class Decoded:
    """Predictions on validation rows, decoded to text."""
    cosine: Tensor        # (n,) cosine of each prediction to its own target
    neighbour: Tensor     # (n,) index of the nearest validation target

    def texts(self, val: Split) -> list[str]:
        return [val.target_texts[i] for i in self.neighbour.tolist()]


def decode(pred: Tensor, target: Tensor, bank: Tensor) -> Decoded:
    """Cosine to own target and nearest neighbour in `bank` (normalized target embeddings)."""
    p = F.normalize(pred.float(), dim=-1)
    return Decoded(cosine=(p * F.normalize(target.float(), dim=-1)).sum(-1), neighbour=(p @ bank.T).argmax(1))


def text_metrics(decoded_texts: list[str], val: Split) -> dict[str, float]:
    import sacrebleu  # here, where BLEU is computed: commands that never decode do not need it installed
    targets = val.target_texts[:len(decoded_texts)]
    top1 = float(np.mean([d == t for d, t in zip(decoded_texts, targets)])) if targets else 0.0
    bleu = sacrebleu.corpus_bleu(decoded_texts, [targets]).score if targets else 0.0
    return {"top1": top1, "bleu": bleu}


def example_rows(decoded_texts: list[str], val: Split, n: int) -> list[dict[str, str]]:
    return [{"input": val.input_texts[i], "decoded": decoded_texts[i], "target": val.target_texts[i]}
            for i in range(min(n, len(decoded_texts)))]


class Evaluation(NamedTuple):
    """What `evaluate` returns: metrics, and the decoded predictions of the model and its two paths."""
    metrics: dict[str, float]
    decoded: Decoded                 # the model's prediction
    lattice_decoded: Decoded         # the lattice path alone (the collector's output)
    skip_decoded: Decoded | None     # the skip path alone, as the model computes it (None without a skip path)


@torch.no_grad()
def evaluate(model: EnergyLattice, val: Split, *, batch_size: int, device: torch.device, seed: int,
             rows: slice = slice(None)) -> Evaluation:
    """Model metrics on validation rows `rows` (a worker's share), and the decoded predictions of the
    model, of its lattice path alone and of its skip path alone; decoding searches every validation
    row's target.

    Metrics are means over the rows, so shares from several workers merge by a weighted mean; call
    `finish_metrics` on the merged means. Flow noise is drawn from a forked RNG seeded with `seed`,
    so evaluation neither depends on nor disturbs the training RNG stream.
    """
    was_training = model.training
    model.eval()
    inputs = torch.from_numpy(val.input_emb[rows]).to(device)
    targets = torch.from_numpy(val.target_emb[rows]).to(device)
    bank = F.normalize(torch.from_numpy(val.target_emb).to(device), dim=-1)
    preds, lattice_preds, skip_preds, sums = [], [], [], {}
    devices = [device.index or 0] if device.type == "cuda" else []

    def add(key: str, value: Tensor | float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(inputs), batch_size):
            x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
            out = model(x)
            preds.append(out.embedding.float())
            lattice_preds.append(out.lattice_only.float())
            add("loss", lattice_loss(out, y, model.cfg) * len(x))
            add("steps_used", out.stats.steps_used * len(x))
            add("completion", out.stats.completion * len(x))
            add("spawned_per_sample", out.stats.spawned.float().sum())
            # Without a skip path, the skip-only prediction is zero: the lattice does all the work.
            # The gain is measured against the shortcut either way: the skip path alone, or, without
            # one, the input copied unchanged, which is what a skip path would give for free.
            if out.skip_only is not None:
                skip_preds.append(out.skip_only.float())
                skip_cosine = F.cosine_similarity(out.skip_only.float(), y, dim=-1).sum()
                add("cosine_skip_only", skip_cosine)
                add("cosine_shortcut", skip_cosine)
            else:
                add("cosine_shortcut", F.cosine_similarity(x.float(), y.float(), dim=-1).sum())
            lower, upper = out.planes.chunk(2, dim=1)  # z = -1's energy channels, then z = +1's
            add("plane_diff_mass", (upper - lower).abs().sum())
            add("upper_plane_mass", upper.abs().sum())
            add("lower_plane_mass", lower.abs().sum())
    model.train(was_training)
    n = max(len(inputs), 1)
    metrics = {k: float(v) / n for k, v in sums.items()}
    metrics.setdefault("cosine_skip_only", 0.0)
    decoded, lattice_decoded = decode(torch.cat(preds), targets, bank), decode(torch.cat(lattice_preds), targets, bank)
    metrics["cosine"] = float(decoded.cosine.mean())
    metrics["cosine_lattice_only"] = float(lattice_decoded.cosine.mean())
    skip_decoded = decode(torch.cat(skip_preds), targets, bank) if skip_preds else None
    return Evaluation(metrics, decoded, lattice_decoded, skip_decoded)


def finish_metrics(means: dict[str, float]) -> dict[str, float]:
    """The reported validation metrics from (merged) per-row means. Adds

    lattice_gain      what the lattice adds over the shortcut (cosine): over the skip path alone, or,
                      for a model without one, over the input copied unchanged (the identity
                      baseline), so that a model cannot score a gain by dropping its skip path
    plane_difference  sum|p1 - p0| / sum(|p1| + |p0|) over cells: 0 for two copies of one map, 1 where
                      no cell holds energy of one sign on both planes (which includes one plane left
                      empty, hence:). For non-negative planes this is sum|p1 - p0| / sum|p1 + p0|;
                      the energies are signed, and then this form stays within [0, 1].
    plane_balance     the smaller plane's share of the deposited energy: 0 if one plane is empty
    """
    masses = ("plane_diff_mass", "upper_plane_mass", "lower_plane_mass", "cosine_shortcut")
    out = {k: v for k, v in means.items() if k not in masses}
    out["lattice_gain"] = means["cosine"] - means["cosine_shortcut"]
    upper, lower = means["upper_plane_mass"], means["lower_plane_mass"]
    out["plane_difference"] = means["plane_diff_mass"] / max(upper + lower, 1e-12)
    out["plane_balance"] = min(upper, lower) / max(upper + lower, 1e-12)
    return out


def _with_intercept(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1), x.dtype)]).astype(np.float64)


def _ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    x1 = _with_intercept(x)
    reg = lam * np.eye(x1.shape[1])
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(x1.T @ x1 + reg, x1.T @ y.astype(np.float64))


def _ridge_predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (_with_intercept(x) @ w).astype(np.float32)


def _mean_cosine(pred: np.ndarray, target: np.ndarray) -> float:
    return float(F.cosine_similarity(torch.from_numpy(np.asarray(pred, np.float32)),
                                     torch.from_numpy(np.asarray(target, np.float32)), dim=-1).mean())


def _holdout(train: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fit inputs, fit targets, holdout inputs, holdout targets): 10% of the training rows, drawn by
    a fixed seed, choose every baseline's hyperparameters, so validation rows never do. Drawn, not
    the last 10%: a corpus in sorted order (the stdlib's, by module) would otherwise choose them on
    a few modules unlike the rest."""
    order = np.random.default_rng(0).permutation(len(train))
    cut = max(1, int(len(train) * 0.9))
    fit, hold = np.sort(order[:cut]), np.sort(order[cut:])
    return train.input_emb[fit], train.target_emb[fit], train.input_emb[hold], train.target_emb[hold]


def fit_ridge(train: Split, penalties=(0.01, 0.1, 1.0, 10.0, 100.0)) -> tuple[np.ndarray, float]:
    """Ridge regression input -> target embedding: (weights with intercept, chosen penalty)."""
    x_fit, y_fit, x_hold, y_hold = _holdout(train)
    best_lam, best_cos = 1.0, -2.0
    if len(x_hold):
        for lam in penalties:
            cos = _mean_cosine(_ridge_predict(_ridge_fit(x_fit, y_fit, lam), x_hold), y_hold)
            if cos > best_cos:
                best_lam, best_cos = lam, cos
    return _ridge_fit(train.input_emb, train.target_emb, best_lam), best_lam


class KernelRidge:
    """Kernel ridge regression with the exp-cosine kernel k(a, b) = exp((cos(a, b) - 1) / width):
    the nonlinear reference a lattice should reach.

    Up to EXACT_MAX_ROWS training rows it is solved exactly, by Cholesky in float64 (one n^3/3
    factorisation per hyperparameter pair, about a second for 3,500 rows on 2 cores). Beyond, the
    exact solver needs n^2 memory (80 GB at 100,000 rows), so it is solved through m landmark rows
    (Nystroem, "subset of regressors"): prediction k(x, L) beta with

        beta = (K_nL^T K_nL + penalty * K_LL)^-1 K_nL^T Y,

    which is the exact solution when the landmarks are all the rows. K_nL is never held whole: its
    row blocks are summed into the m x m and m x E products, so memory is O(m^2 + block x m) and
    time O(n m^2). Width and penalty are chosen on the training holdout with FIRST_LANDMARKS
    landmarks, then the number of landmarks (doubling up to max_landmarks or all the rows, the
    penalty chosen again at each) where the holdout stops gaining MIN_LANDMARK_GAIN cosine.
    """
    EXACT_MAX_ROWS = 6000
    FIRST_LANDMARKS = 1000
    MIN_LANDMARK_GAIN = 0.002
    BLOCK_ROWS = 4096

    def __init__(self, landmarks: Tensor, dual: Tensor, width: float, penalty: float):
        self.landmarks, self.dual, self.width, self.penalty = landmarks, dual, width, penalty

    @property
    def n_landmarks(self) -> int:
        return len(self.landmarks)

    @staticmethod
    def _unit(x: np.ndarray) -> Tensor:
        return F.normalize(torch.from_numpy(np.asarray(x, np.float64)), dim=-1)

    @staticmethod
    def _kernel(a: Tensor, b: Tensor, width: float) -> Tensor:
        return torch.exp((a @ b.T - 1.0) / width)

    @staticmethod
    def _solve(gram: Tensor, targets: Tensor, penalty: float) -> Tensor:
        factor = torch.linalg.cholesky(gram + penalty * torch.eye(len(gram), dtype=gram.dtype))
        return torch.cholesky_solve(targets, factor)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = [self._kernel(self._unit(x[i:i + self.BLOCK_ROWS]), self.landmarks, self.width) @ self.dual
               for i in range(0, len(x), self.BLOCK_ROWS)]
        return torch.cat(out).float().numpy() if out else np.zeros((0, self.dual.shape[1]), np.float32)

    # ---- exact -------------------------------------------------------------------------------

    @classmethod
    def fit_exact(cls, train: Split, widths, penalties) -> KernelRidge:
        x_fit, y_fit, x_hold, y_hold = _holdout(train)
        best, best_cos = (widths[len(widths) // 2], penalties[len(penalties) // 2]), -2.0
        if len(x_hold):
            unit_fit, unit_hold = cls._unit(x_fit), cls._unit(x_hold)
            y64 = torch.from_numpy(y_fit.astype(np.float64))
            for width in widths:
                gram, cross = cls._kernel(unit_fit, unit_fit, width), cls._kernel(unit_hold, unit_fit, width)
                for penalty in penalties:
                    cos = _mean_cosine((cross @ cls._solve(gram, y64, penalty)).numpy(), y_hold)
                    if cos > best_cos:
                        best, best_cos = (width, penalty), cos
        inputs = cls._unit(train.input_emb)
        dual = cls._solve(cls._kernel(inputs, inputs, best[0]), torch.from_numpy(train.target_emb.astype(np.float64)),
                          best[1])
        return cls(inputs, dual, *best)

    # ---- Nystroem ----------------------------------------------------------------------------

    @classmethod
    def _normal_equations(cls, x: np.ndarray, y: np.ndarray, landmarks: Tensor, width: float
                          ) -> tuple[Tensor, Tensor]:
        """(K_nL^T K_nL, K_nL^T Y) summed over row blocks, in float64."""
        m = len(landmarks)
        gram, cross = torch.zeros(m, m, dtype=torch.float64), torch.zeros(m, y.shape[1], dtype=torch.float64)
        for i in range(0, len(x), cls.BLOCK_ROWS):
            k = cls._kernel(cls._unit(x[i:i + cls.BLOCK_ROWS]), landmarks, width)
            gram += k.T @ k
            cross += k.T @ torch.from_numpy(np.asarray(y[i:i + cls.BLOCK_ROWS], np.float64))
        return gram, cross

    @classmethod
    def _landmark_solve(cls, gram: Tensor, cross: Tensor, k_landmarks: Tensor, penalty: float) -> Tensor:
        system = gram + penalty * k_landmarks
        # A tiny ridge on the diagonal: K_LL is only positive semi-definite in floating point.
        system += 1e-9 * system.diagonal().mean() * torch.eye(len(system), dtype=system.dtype)
        return torch.linalg.solve(system, cross)

    @classmethod
    def _landmarks(cls, x: np.ndarray, m: int) -> Tensor:
        """m rows of x, drawn without replacement by a fixed seed: the same rows for the same data."""
        rows = np.sort(np.random.default_rng(0).permutation(len(x))[:m])
        return cls._unit(x[rows])

    @classmethod
    def fit_nystroem(cls, train: Split, widths, penalties, max_landmarks: int = 8000) -> KernelRidge:
        x_fit, y_fit, x_hold, y_hold = _holdout(train)

        def holdout_fit(landmarks: Tensor, width: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            gram, cross = cls._normal_equations(x_fit, y_fit, landmarks, width)
            return gram, cross, cls._kernel(landmarks, landmarks, width), cls._kernel(cls._unit(x_hold), landmarks,
                                                                                       width)

        def score(parts, penalty: float) -> float:
            gram, cross, k_landmarks, k_hold = parts
            return _mean_cosine((k_hold @ cls._landmark_solve(gram, cross, k_landmarks, penalty)).numpy(), y_hold)

        m = min(cls.FIRST_LANDMARKS, max_landmarks, len(x_fit))
        landmarks = cls._landmarks(x_fit, m)
        best, best_cos = None, -2.0
        for width in widths:
            parts = holdout_fit(landmarks, width)
            for penalty in penalties:
                cos = score(parts, penalty)
                if cos > best_cos:
                    best, best_cos = (width, penalty), cos
        width, penalty = best
        # More landmarks fit more closely, and the penalty that suits them is chosen again (it is
        # only a solve per value once the products are summed).
        cap = min(max_landmarks, len(x_fit))
        while m < cap:
            more = min(2 * m, cap)
            wider = cls._landmarks(x_fit, more)
            parts = holdout_fit(wider, width)
            cos, wider_penalty = max((score(parts, p), p) for p in penalties)
            if cos < best_cos + cls.MIN_LANDMARK_GAIN:
                break
            m, landmarks, best_cos, penalty = more, wider, cos, wider_penalty
        gram, cross = cls._normal_equations(train.input_emb, train.target_emb, landmarks, width)
        dual = cls._landmark_solve(gram, cross, cls._kernel(landmarks, landmarks, width), penalty)
        return cls(landmarks, dual, width, penalty)

    @classmethod
    def fit(cls, train: Split, widths=(0.1, 0.2, 0.5, 1.0), penalties=(0.01, 0.1, 1.0, 10.0),
            nystroem: bool | None = None) -> KernelRidge:
        """Pick width and penalty (and, by Nystroem, the landmarks) on the training holdout, then refit
        on every training row. Exact up to EXACT_MAX_ROWS rows unless `nystroem` says otherwise."""
        if nystroem is None:
            nystroem = len(train) > cls.EXACT_MAX_ROWS
        if nystroem:
            return cls.fit_nystroem(train, widths, penalties)
        return cls.fit_exact(train, widths, penalties)


BASELINES_VERSION = 4  # bump when a baseline or its hyperparameter grid changes: it keys the cache


def baselines(train: Split, val: Split) -> dict[str, float]:
    """`compute_baselines`, cached on disk by the rows' contents: kernel ridge takes tens of seconds
    on 2 cores, and every run, trial and stage on the same split would otherwise repeat it."""
    key = hashlib.sha1(str(BASELINES_VERSION).encode())
    for array in (train.input_emb, train.target_emb, val.input_emb, val.target_emb):
        key.update(np.ascontiguousarray(array).tobytes())
    key.update("\n".join(val.target_texts).encode())  # top-1 and BLEU compare texts
    path = default_cache_dir() / "baselines" / f"{key.hexdigest()[:20]}.json"
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            return json.loads(path.read_text())
    out = compute_baselines(train, val)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(out)))
    return out


def compute_baselines(train: Split, val: Split) -> dict[str, float]:
    """What every run is measured against, on the validation rows (cosine, top-1, BLEU each):

    identity      the input embedding itself
    mean_target   the mean training target, the same for every row
    ridge         linear regression with a penalty
    kernel_ridge  the nonlinear reference (exp-cosine kernel)

    Hyperparameters are picked on the last 10% of the training rows, then refitted on all of them,
    so validation rows never choose them.
    """
    bank = F.normalize(torch.from_numpy(val.target_emb), dim=-1)
    target = torch.from_numpy(val.target_emb)
    started = time.perf_counter()
    ridge_weights, ridge_penalty = fit_ridge(train)
    ridge_seconds = time.perf_counter() - started
    kernel = KernelRidge.fit(train)
    kernel_seconds = time.perf_counter() - started - ridge_seconds
    predictions = {
        "identity": val.input_emb,
        "mean_target": np.broadcast_to(train.target_emb.mean(0), val.target_emb.shape).copy(),
        "ridge": _ridge_predict(ridge_weights, val.input_emb),
        "kernel_ridge": kernel.predict(val.input_emb),
    }
    out: dict[str, float] = {}
    for name, pred in predictions.items():
        d = decode(torch.from_numpy(pred), target, bank)
        out[f"baseline_{name}_cosine"] = float(d.cosine.mean())
        for key, value in text_metrics(d.texts(val), val).items():
            out[f"baseline_{name}_{key}"] = value
    out["baseline_val_rows"] = len(val)
    out["baseline_train_rows"] = len(train)
    out["baseline_ridge_lambda"] = ridge_penalty
    out["baseline_kernel_ridge_width"] = kernel.width
    out["baseline_kernel_ridge_lambda"] = kernel.penalty
    out["baseline_kernel_ridge_landmarks"] = kernel.n_landmarks  # all training rows when solved exactly
    out["baseline_ridge_fit_s"] = ridge_seconds
    out["baseline_kernel_ridge_fit_s"] = kernel_seconds
    return out
