"""What a run leaves for a person to read: the trackers, MLflow (`tracking`, `mlflow_model`), the
console lines and the plots."""
