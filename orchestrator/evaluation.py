"""Validation, decoding for monitoring, and the baselines every run is measured against.

Decoding is nearest-neighbour retrieval: a predicted embedding decodes to the validation target
text whose teacher embedding is closest. Top-1 is "decoded text == true target"; BLEU compares the
decoded texts with the true targets (sacrebleu, corpus level).

Baselines on the same validation rows: identity (the input embedding as the prediction) and ridge
regression from input to target embedding fitted on the training rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from torch import Tensor

from model import EnergyLattice, lattice_loss

from .data import Split


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
    targets = val.target_texts[:len(decoded_texts)]
    top1 = float(np.mean([d == t for d, t in zip(decoded_texts, targets)])) if targets else 0.0
    bleu = sacrebleu.corpus_bleu(decoded_texts, [targets]).score if targets else 0.0
    return {"top1": top1, "bleu": bleu}


def example_rows(decoded_texts: list[str], val: Split, n: int) -> list[dict[str, str]]:
    return [{"input": val.input_texts[i], "decoded": decoded_texts[i], "target": val.target_texts[i]}
            for i in range(min(n, len(decoded_texts)))]


@torch.no_grad()
def evaluate(model: EnergyLattice, val: Split, *, batch_size: int, device: torch.device, seed: int,
             rows: slice = slice(None)) -> tuple[dict[str, float], Decoded]:
    """Model metrics on validation rows `rows` (a worker's share); decoding searches every row's target.

    Flow noise is drawn from a forked RNG seeded with `seed`, so evaluation neither depends on nor
    disturbs the training RNG stream.
    """
    was_training = model.training
    model.eval()
    inputs = torch.from_numpy(val.input_emb[rows]).to(device)
    targets = torch.from_numpy(val.target_emb[rows]).to(device)
    bank = F.normalize(torch.from_numpy(val.target_emb).to(device), dim=-1)
    preds, losses, steps, completion, spawned = [], [], [], [], []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(inputs), batch_size):
            x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
            out = model(x)
            preds.append(out.embedding.float())
            losses.append(float(lattice_loss(out, y, model.cfg)) * len(x))
            steps.append(out.stats.steps_used * len(x))
            completion.append(out.stats.completion * len(x))
            spawned.append(float(out.stats.spawned.float().sum()))
    model.train(was_training)
    n = max(len(inputs), 1)
    decoded = decode(torch.cat(preds), targets, bank)
    metrics = {"loss": sum(losses) / n, "cosine": float(decoded.cosine.mean()),
               "steps_used": sum(steps) / n, "completion": sum(completion) / n,
               "spawned_per_sample": sum(spawned) / n}
    return metrics, decoded


def _ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    x1 = np.hstack([x, np.ones((len(x), 1), x.dtype)]).astype(np.float64)
    reg = lam * np.eye(x1.shape[1])
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(x1.T @ x1 + reg, x1.T @ y.astype(np.float64))


def _ridge_predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (np.hstack([x, np.ones((len(x), 1), x.dtype)]) @ w).astype(np.float32)


def baselines(train: Split, val: Split) -> dict[str, float]:
    """Identity and ridge baselines on the validation rows (cosine, top-1, BLEU).

    Ridge's penalty is picked on the last 10% of the training rows, then refitted on all of them,
    so validation rows never choose it.
    """
    bank = F.normalize(torch.from_numpy(val.target_emb), dim=-1)
    target = torch.from_numpy(val.target_emb)
    out: dict[str, float] = {}

    cut = max(1, int(len(train) * 0.9))
    x_fit, y_fit = train.input_emb[:cut], train.target_emb[:cut]
    x_hold, y_hold = train.input_emb[cut:], train.target_emb[cut:]
    best_lam, best_cos = 1.0, -2.0
    if len(x_hold):
        for lam in (0.01, 0.1, 1.0, 10.0, 100.0):
            pred = torch.from_numpy(_ridge_predict(_ridge_fit(x_fit, y_fit, lam), x_hold))
            cos = float(F.cosine_similarity(pred, torch.from_numpy(y_hold), dim=-1).mean())
            if cos > best_cos:
                best_lam, best_cos = lam, cos
    ridge_pred = _ridge_predict(_ridge_fit(train.input_emb, train.target_emb, best_lam), val.input_emb)

    for name, pred in (("identity", val.input_emb), ("ridge", ridge_pred)):
        d = decode(torch.from_numpy(pred), target, bank)
        texts = d.texts(val)
        out[f"baseline_{name}_cosine"] = float(d.cosine.mean())
        for key, value in text_metrics(texts, val).items():
            out[f"baseline_{name}_{key}"] = value
    out["baseline_ridge_lambda"] = best_lam
    return out
