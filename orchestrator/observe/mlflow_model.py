"""A registered version of `energy-lattice` as an MLflow model (the pyfunc flavour):

    model = mlflow.pyfunc.load_model("models:/energy-lattice@stage-scale-24")
    model.predict(embeddings)            # (n, E) float32 teacher embeddings -> (n, E) float32 predictions

Why pyfunc rather than MLflow's pytorch flavour: the pytorch flavour saves the nn.Module object
itself and its predict expects `model(x)` to return a tensor, while EnergyLattice returns a
LatticeOutput (embedding, planes, flow statistics) and draws flow noise that predict has to seed.
A pyfunc model keeps the project's own checkpoint (`state.pt`: weights, configs, optimizer state;
loadable with `weights_only=True`) as the file inside it (`artifacts/checkpoint/`), so resume and
weight transfer read the same file they always did, and MLflow adds the signature, an input
example, pinned requirements and a copy of `model/` and `orchestrator/` (code paths), so a process
without this project installed loads it too.

`predict` is `predict_embeddings`: one forward pass on the CPU with the flow noise drawn from a
forked RNG seeded with the `seed` param (default PREDICT_SEED), so it returns what the project's
own loader's model gives for that seed (`load_registered_model`, then `predict_embeddings`), and
calls do not disturb the caller's RNG.
"""
from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from ..checkpoint import load_checkpoint, load_model, model_config_of

CHECKPOINT_ARTIFACT = "checkpoint"  # the project's checkpoint folder, under the model's artifacts/
PREDICT_SEED = 0
REQUIREMENTS = ("torch", "numpy")  # what loading and predicting import besides MLflow (pinned as installed)


def seeded_forward(model: torch.nn.Module, embeddings: np.ndarray | torch.Tensor, seed: int = PREDICT_SEED):
    """The model's output (a LatticeOutput) for teacher embeddings (n, E) on the CPU, its flow noise
    drawn from a forked RNG seeded with `seed`: the same rows give the same prediction every time."""
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model(x)


def predict_embeddings(model: torch.nn.Module, embeddings: np.ndarray | torch.Tensor,
                       seed: int = PREDICT_SEED) -> np.ndarray:
    """The predicted target embeddings (n, E) float32: what a registered model's `predict` returns."""
    return seeded_forward(model, embeddings, seed).embedding.float().numpy()


class LatticeModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a checkpoint: loads it with the project's loader, predicts embeddings.
    MLflow builds it from `mlflow_model_code.py` (models from code: nothing is unpickled on load)."""

    def load_context(self, context):
        self.model = load_model(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        return predict_embeddings(self.model, model_input, int((params or {}).get("seed", PREDICT_SEED)))


def signature(embed_dim: int):
    """float32 (n, E) in, float32 (n, E) out, and the flow-noise seed as a parameter."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))])
    return ModelSignature(inputs=spec, outputs=spec, params=ParamSchema([ParamSpec("seed", "long", PREDICT_SEED)]))


def _pinned_requirements() -> list[str]:
    # A local build label (torch's "+cpu") names no release a registry has.
    return [f"{name}=={version(name).split('+')[0]}" for name in ("mlflow", *REQUIREMENTS)]


def log_model(client, run_id: str, checkpoint_dir: str | Path, *, input_example: np.ndarray | None,
              step: int = 0):
    """Save `checkpoint_dir` as a pyfunc model and log it as a LoggedModel of `run_id` (its output at
    `step`, on the run's page under Logged models); return the LoggedModel, ready to register.

    This is what `mlflow.pyfunc.log_model` does, step by step through the client: log_model logs
    into the process's active run with the global tracking URI, and a launcher here logs into runs
    by id, in stores it names itself."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    import model as model_package
    from .. import __file__ as orchestrator_init
    embed_dim = model_config_of(load_checkpoint(checkpoint_dir)).embed_dim
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name="energy-lattice", source_run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path, python_model=str(Path(__file__).with_name("mlflow_model_code.py")), artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_dir)},
            signature=signature(embed_dim),
            input_example=None if input_example is None else np.asarray(input_example, dtype=np.float32),
            pip_requirements=_pinned_requirements(),
            code_paths=[str(Path(model_package.__file__).parent), str(Path(orchestrator_init).parent)])
        client.log_model_artifacts(logged.model_id, str(path))
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def checkpoint_in(model_dir: str | Path) -> Path:
    """The project's checkpoint folder inside a downloaded MLflow model; a version registered before
    versions were MLflow models is the checkpoint folder itself."""
    from mlflow.models import Model
    model_dir = Path(model_dir)
    if not (model_dir / "MLmodel").exists():
        return model_dir
    artifacts = Model.load(model_dir).flavors["python_function"]["artifacts"]
    return model_dir / artifacts[CHECKPOINT_ARTIFACT]["path"]
