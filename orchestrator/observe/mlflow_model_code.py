"""The code MLflow runs to build a registered `energy-lattice` model when it loads one (MLflow's
"models from code"; see orchestrator/observe/mlflow_model.py). It is copied into every model version and
run there as a script, so its imports are absolute."""
import mlflow

from orchestrator.observe.mlflow_model import LatticeModel

mlflow.models.set_model(LatticeModel())
