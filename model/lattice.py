"""The energy-flow lattice model, top to bottom.

    embedding (B, E)
      -> InputMapper       e energies per surface cell (e = energy_channels, 1 by default)  (B, e, H, W)
      -> flows             one per (sample, cell), run by flow.run_flows through
           SimpleNeuron    (position, energy) -> features             shared, ~1k parameters
           EnergyCarrier   GRU: features, energy [, field read] -> state, energy, move [, message]
      -> two output planes deposited at z = -1 and z = +1, e channels each      (B, 2e, H, W)
      -> Collector         planes -> embedding                        (B, E)

With `interaction="field"` flows also meet while they travel: each writes a message into a coarse
3D field at its cell and reads the field (its cell, and the sample's mean) at the next step.

Coordinates are normalized to [-1, 1] on every axis before anything sees them. The mapper and the
collector are rank-K separable maps, so a 300x300 surface costs K x (300 + 300) parameters plus a
bias, not a dense E x S matrix; their per-axis factors are what progressive scaling interpolates.
Neuron, carrier and heads do not depend on the lattice shape and carry over between sizes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .flow import FlowStats, FlowTrace, run_flows

_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


class InputMapper(nn.Module):
    """energy[b, c, y, x] = sum_k a[b, c, k] * U[k, y] * V[k, x] + bias[y, x], with a = f(embedding),
    for each of the flows' energy channels c (one by default).

    f is a linear map of the (by default layer-normalised) embedding, initialised so the
    input-dependent part of the grid has std `init_spread`: flows start from energies that differ
    between inputs, whatever the teacher's embedding norm. The channels share the spatial factors
    U and V (parameters stay O(K(H+W))) and differ by their coefficients.
    """

    def __init__(self, embed_dim: int, height: int, width: int, rank: int, dropout: float,
                 init_spread: float = 0.5, layer_norm: bool = True, channels: int = 1):
        super().__init__()
        self.layer_norm, self.channels, self.rank = layer_norm, channels, rank
        self.dropout = nn.Dropout(dropout)
        self.coefficients = nn.Linear(embed_dim, channels * rank)
        # a_k ~ N(0, spread^2) for a layer-normalised input; U ~ N(0, 1/K) and V ~ N(0, 1), so the
        # grid, a sum of K such products, has std `init_spread`.
        nn.init.normal_(self.coefficients.weight, std=init_spread / embed_dim ** 0.5)
        nn.init.zeros_(self.coefficients.bias)
        self.row_factors = nn.Parameter(torch.randn(rank, height) / rank ** 0.5)   # U
        self.col_factors = nn.Parameter(torch.randn(rank, width))                  # V
        self.bias = nn.Parameter(torch.zeros(height, width))

    def forward(self, embedding: Tensor) -> Tensor:
        """(B, channels, H, W)."""
        x = F.layer_norm(embedding, embedding.shape[-1:]) if self.layer_norm else embedding
        a = self.coefficients(self.dropout(x)).view(len(x), self.channels, self.rank)
        return torch.einsum("bck,ky,kx->bcyx", a, self.row_factors, self.col_factors) + self.bias


class SimpleNeuron(nn.Module):
    """A small shared MLP from (position, energy) to features. Positions arrive in [-1, 1]."""

    def __init__(self, hidden: int, features: int, energy_channels: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 + energy_channels, hidden), nn.GELU(), nn.Linear(hidden, features))

    def forward(self, pos: Tensor, energy: Tensor) -> Tensor:
        return self.net(torch.cat([pos, energy], dim=1))


class StepGRU(nn.Module):
    """A stacked GRU advanced by one time step: nn.GRU's equations, parameter names, shapes and init
    (so checkpoints load either way), for inputs (N, in) and state (L, N, Hc) -> new state (L, N, Hc):

        r, z = sigmoid(W_i[rz] x + b_i[rz] + W_h[rz] h + b_h[rz])
        n    = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h'   = n + z * (h - n)

    Why not nn.GRU: on CPU it runs the gate math as many unfused kernels and its autograd graph
    slices the gate tensors, which in backward zero-fills a full (N, 3Hc) tensor per slice. Here each
    layer is three matmuls (input; state r/z accumulated onto it; state n) and five elementwise
    kernels, and the gates are taken apart with split/unbind, whose backward is one concatenation.
    The flow step is where all the compute is: every (N, Hc) kernel saved here is saved L times per
    flow step, and at small batches (and on a GPU) the count of kernels weighs as much as FLOPs.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        for layer in range(num_layers):
            fan_in = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, fan_in)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(3 * hidden_size)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(3 * hidden_size)))
        bound = hidden_size ** -0.5
        for p in self.parameters():  # nn.GRU's init, in nn.GRU's order
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(new state (L, N, Hc), its top layer (N, Hc)). The top layer is also returned apart, so
        that what reads it (the carrier's heads) does not take it out of the stacked state: that
        select's backward would zero-fill and add a whole (L, N, Hc) gradient every step."""
        hc, layers = self.hidden_size, []
        for layer, h in enumerate(hidden.unbind(0)):
            w_ih, w_hh = getattr(self, f"weight_ih_l{layer}"), getattr(self, f"weight_hh_l{layer}")
            b_ih, b_hh = getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}")
            (w_hrz, w_hn), (b_hrz, b_hn) = w_hh.split([2 * hc, hc]), b_hh.split([2 * hc, hc])
            # The state's r and z terms are accumulated onto the input's by the matmul itself
            # (addmm's beta = 1), with both r/z biases in the input's bias: no (N, 2Hc) add, and one
            # bias broadcast fewer (addmm copies its bias into the output before multiplying).
            b_x = torch.cat([b_ih[:2 * hc] + b_hrz, b_ih[2 * hc:]])
            x_rz, x_n = torch.addmm(b_x, x, w_ih.t()).split([2 * hc, hc], dim=1)
            # The state's n-gate gets its own matmul: backward keeps h_n, and a view of one (N, 3Hc)
            # result would keep all of it alive until then.
            h_n = torch.addmm(b_hn, h, w_hn.t())
            r, z = torch.sigmoid(torch.addmm(x_rz, h, w_hrz.t())).chunk(2, dim=1)
            # x_n + r * h_n as two kernels, not addcmul: addcmul's backward multiplies both of
            # its gradients by its scalar `value` too, two more (N, Hc) kernels per layer.
            n = torch.tanh(x_n + r * h_n)
            x = torch.lerp(n, h.to(n.dtype), z)  # n + z * (h - n); autocast may have lowered n
            layers.append(x)
        return torch.stack(layers), x


class EnergyCarrier(nn.Module):
    """A shared GRU that carries a flow: new state, new energy (e channels), a move in [-1, 1]^3,
    with a learned plane split the share of each energy channel that goes to the plane z = +1, and
    with an interaction field the message the flow writes into it (it reads the field as input).

    The energy is updated, not replaced (unless `energy_update="replace"`): the residual head starts
    at zero, so at initialisation every flow delivers exactly the energy the mapper gave it and the
    carrier learns a change from there. The move is scaled to the lattice's per-axis maximum step
    by the flow processor, which keeps these weights independent of the lattice shape.
    """

    def __init__(self, in_features: int, hidden: int, layers: int, energy_update: str = "residual",
                 plane_split: str = "learned", split_energy_gain: float = 0.0, energy_channels: int = 1,
                 field_channels: int = 0):
        super().__init__()
        e = energy_channels
        self.energy_update, self.energy_channels = energy_update, e
        # The GRU reads the neuron's features, the energy and, with a field, what the flow reads there
        # (its cell and the sample's mean: 2 x field_channels).
        self.gru = StepGRU(in_features + e + 2 * field_channels, hidden, layers)
        self.energy_head = nn.Linear(hidden, e)
        self.move_head = nn.Linear(hidden, 3)
        self.gate_head = nn.Linear(hidden, e) if energy_update == "gated" else None
        self.split_head = nn.Linear(hidden, e) if plane_split == "learned" else None
        self.message_head = nn.Linear(hidden, field_channels) if field_channels else None
        # The split also sees the energy it splits, through a learned gain: with the head alone the
        # split stayed near 1/2 and the two planes near-identical halves of one map.
        self.split_energy_gain = (nn.Parameter(torch.tensor(float(split_energy_gain)))
                                  if plane_split == "learned" and split_energy_gain else None)
        if energy_update == "residual":
            nn.init.zeros_(self.energy_head.weight)
            nn.init.zeros_(self.energy_head.bias)
        if self.gate_head is not None:  # a gate of ~0.05: most of the energy is kept each step
            nn.init.constant_(self.gate_head.bias, -3.0)

    def forward(self, features: Tensor, energy: Tensor, hidden: Tensor, context: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        inputs = [features, energy.to(features.dtype)] + ([context.to(features.dtype)] if context is not None else [])
        x = torch.cat(inputs, dim=1)
        hidden, h = self.gru(x, hidden.to(x.dtype))
        # All heads as one matmul over their stacked weights (their parameters stay apart, so
        # checkpoints keep their names): one (N, Hc) x (Hc, outputs) product instead of one per head,
        # and in backward one gradient for h instead of one per head, added up.
        heads = [head for head in (self.energy_head, self.move_head, self.gate_head, self.split_head,
                                   self.message_head) if head is not None]
        out = F.linear(h, torch.cat([head.weight for head in heads]), torch.cat([head.bias for head in heads]))
        e = self.energy_channels
        bounded, *logits = out.split([e + 3] + [head.out_features for head in heads[2:]], dim=1)  # backward: one cat
        energy_out, move = torch.tanh(bounded).split([e, 3], dim=1)
        head = energy_out.float()
        if self.energy_update == "residual":
            new_energy = energy + head
        elif self.energy_update == "gated":
            new_energy = torch.lerp(energy, head, torch.sigmoid(logits.pop(0)).float())
        else:
            new_energy = head
        split = None
        if self.split_head is not None:
            logit = logits.pop(0).float()
            if self.split_energy_gain is not None:
                logit = logit + self.split_energy_gain * new_energy
            split = torch.sigmoid(logit)
        message = torch.tanh(logits.pop(0)) if self.message_head is not None else None
        return hidden, new_energy, move, split, message


class Collector(nn.Module):
    """The mirror of the mapper, with the planes kept apart (two, z = -1 and z = +1, times the energy
    channels): c[b, p, k] = mean_{y,x} planes[b, p, y, x] * U[p, k, y] * V[p, k, x];
    embedding = Linear(LN(c)).

    A mean rather than a sum keeps the features' scale independent of the surface size.
    """

    def __init__(self, embed_dim: int, height: int, width: int, rank: int, planes: int = 2):
        super().__init__()
        self.row_factors = nn.Parameter(torch.randn(planes, rank, height))
        self.col_factors = nn.Parameter(torch.randn(planes, rank, width))
        self.norm = nn.LayerNorm(planes * rank)
        self.out = nn.Linear(planes * rank, embed_dim)
        # Start with outputs of norm ~1, a unit embedding's: beside a skip path the lattice begins as
        # a correction of the input rather than drowning it (the default init gives norm ~sqrt(E/3)).
        nn.init.normal_(self.out.weight, std=(planes * rank * embed_dim) ** -0.5)
        nn.init.zeros_(self.out.bias)

    def forward(self, planes: Tensor) -> Tensor:
        B, _, H, W = planes.shape
        c = torch.einsum("bpyx,pky,pkx->bpk", planes, self.row_factors, self.col_factors) / (H * W)
        return self.out(self.norm(c.reshape(B, -1)))


@dataclass
class LatticeOutput:
    embedding: Tensor          # (B, E) predicted target embedding
    planes: Tensor             # (B, 2e, H, W) energy deposited on z = -1 (its e channels first) and z = +1
    stats: FlowStats
    trace: FlowTrace | None
    lattice_only: Tensor       # (B, E) the collector's output: the prediction without the skip path
    skip_only: Tensor | None   # (B, E) skip_scale * embedding (None without a skip path)


class EnergyLattice(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg = cfg.resolved()
        e = cfg.energy_channels
        self.mapper = InputMapper(cfg.embed_dim, cfg.height, cfg.width, cfg.mapper_rank, cfg.mapper_dropout,
                                  cfg.energy_init_spread, cfg.mapper_layer_norm, channels=e)
        self.neuron = SimpleNeuron(cfg.neuron_hidden, cfg.neuron_features, energy_channels=e)
        self.carrier = EnergyCarrier(cfg.neuron_features, cfg.carrier_hidden, cfg.carrier_layers,
                                     cfg.energy_update, cfg.plane_split, cfg.split_energy_gain, energy_channels=e,
                                     field_channels=cfg.field_channels if cfg.interaction == "field" else 0)
        self.collector = Collector(cfg.embed_dim, cfg.height, cfg.width, cfg.collector_rank, planes=2 * e)
        if cfg.freeze_carrier:  # an optimizer skips parameters that never get a gradient
            for p in [*self.neuron.parameters(), *self.carrier.parameters()]:
                p.requires_grad_(False)
        # pred = skip_scale * embedding + collector(planes). The scale is a single learned number, so
        # the skip path alone can never be better than the identity baseline.
        self.skip_scale = nn.Parameter(torch.ones(())) if cfg.skip else None
        self.hidden_dtype = torch.bfloat16 if cfg.saved_state_dtype == "bf16" else torch.float32

    def _autocast(self, device_type: str):
        dtype = _AUTOCAST_DTYPES.get(self.cfg.precision)
        return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()

    def _dense_step(self, pos: Tensor, energy: Tensor, hidden: Tensor, context: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        with self._autocast(pos.device.type):
            features = self.neuron(pos, energy)
            hidden, new_energy, move, split, message = self.carrier(features, energy, hidden, context)
        # Positions, energies, splatting and the field stay fp32 whatever the autocast dtype.
        return (hidden.to(self.hidden_dtype), new_energy.float(), move.float(),
                None if split is None else split.float(), None if message is None else message.float())

    def _step(self, pos: Tensor, energy: Tensor, hidden: Tensor, context: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        if self.cfg.activation_checkpointing and torch.is_grad_enabled():
            # The dense step has no randomness, so there is no RNG state to stash and restore.
            return checkpoint(self._dense_step, pos, energy, hidden, context, use_reentrant=False,
                              preserve_rng_state=False)
        return self._dense_step(pos, energy, hidden, context)

    def forward(self, embedding: Tensor, *, trace: bool = False) -> LatticeOutput:
        embedding = embedding.float()
        energy_grid = self.mapper(embedding)
        planes, stats, flow_trace = run_flows(energy_grid, self._step, self.cfg,
                                              hidden_dtype=self.hidden_dtype, trace=trace)
        lattice_only = self.collector(planes)
        skip_only = self.skip_scale * embedding if self.skip_scale is not None else None
        prediction = lattice_only if skip_only is None else skip_only + lattice_only
        return LatticeOutput(prediction, planes, stats, flow_trace, lattice_only, skip_only)


def flow_step_flops(cfg: ModelConfig) -> int:
    """Matmul FLOPs of one active flow in one flow step: the carrier's GRU layers and its heads.

    A GRU layer computes three gates, each from its input and its state: 3 matmuls of (in + Hc) x Hc,
    i.e. 2 * 3 * Hc * (in + Hc) FLOPs (2 per multiply-add), with in = neuron_features + e (features
    and energy; + 2 x field_channels read from the interaction field) for layer 0 and in = Hc above
    it. The heads (energy, move, and the gate, split and message heads where on) add 2 * Hc per output.
    Left out: the SimpleNeuron (~1k FLOPs, under 0.1% at debug size), all elementwise gate math and
    the field's scatter, mix and gather (elementwise, O(field_channels) per flow).
    A forward pass costs this times the sum of FlowStats.active_per_step; a training step about
    three times that (backward computes a gradient for both operands of every matmul).
    """
    e, field = cfg.energy_channels, cfg.field_channels if cfg.interaction == "field" else 0
    hc, inputs = cfg.carrier_hidden, cfg.neuron_features + e + 2 * field
    gru = sum(2 * 3 * hc * ((inputs if layer == 0 else hc) + hc) for layer in range(cfg.carrier_layers))
    heads = e + 3 + e * (cfg.energy_update == "gated") + e * (cfg.plane_split == "learned") + field
    return gru + 2 * hc * heads


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lattice_loss(output: LatticeOutput, target: Tensor, cfg: ModelConfig) -> Tensor:
    """1 - cosine to the target embedding, plus the optional MSE and travel terms."""
    pred = output.embedding.float()
    loss = 1 - F.cosine_similarity(pred, target.float(), dim=-1).mean()
    if cfg.loss_mse_weight:
        loss = loss + cfg.loss_mse_weight * F.mse_loss(pred, target.float())
    if cfg.travel_loss_weight:
        loss = loss + cfg.travel_loss_weight * output.stats.remaining_distance
    return loss
