"""Ray Train, Ray Tune and MLflow glue around the lattice model: data, training loop, checkpoints, CLI."""
