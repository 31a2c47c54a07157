"""The energy-flow lattice model. Runs in a plain Python process: no Ray, no MLflow here."""
from .config import PRESETS, ConfigError, ModelConfig, preset
from .flow import FlowStats, FlowTrace, run_flows
from .lattice import (Collector, EnergyCarrier, EnergyLattice, InputMapper, LatticeOutput, SimpleNeuron,
                      count_parameters, flow_step_flops, lattice_loss)

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "preset", "FlowStats", "FlowTrace", "run_flows",
           "Collector", "EnergyCarrier", "EnergyLattice", "InputMapper", "LatticeOutput", "SimpleNeuron",
           "count_parameters", "flow_step_flops", "lattice_loss"]
