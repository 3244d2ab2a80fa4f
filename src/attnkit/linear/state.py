"""The fixed-size state of linear attention, and its values at chunk boundaries.

Every state-based mechanism of ``attnkit.linear`` (linear attention, Lightning Attention,
retention, GLA, the linear half of BASED) carries, per key/value head, a matrix

    S_t = diag(alpha_t) S_(t-1) + k_t^T v_t          S: [Dk, Dv]

and, when its output is normalised, a vector ``z_t = diag(alpha_t) z_(t-1) + k_t`` (the
denominator ``q_t . z_t``). ``alpha_t`` is 1 (plain linear attention), a per-head constant
(RetNet, Lightning Attention) or a data-dependent vector (GLA).

LASP-2 ("LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid", Sun et
al., 2025) splits the sequence across ranks and all-gathers these states instead of keys and
values: each rank computes the contribution of its own chunk (``ChunkStates.update_*``) and the
chunk's total decay (``log_decay``), gathers everyone's, and ``combine_states`` turns them into
the state entering each chunk. The chunked form then runs each chunk from that state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LinearState:
    """State of a state-based linear mechanism after some tokens.

    Attributes:
        kv: ``S = sum_j decay_j k_j^T v_j``, ``[B, Hkv, Dk, Dv]`` (float32, or float64 for
            float64 inputs), ``Dk`` being the feature dimension after any feature map.
        z: the normaliser ``sum_j decay_j k_j``, ``[B, Hkv, Dk]``, for normalised mechanisms;
            None otherwise.
    """

    kv: Tensor
    z: Tensor | None = None

    def augmented(self) -> Tensor:
        """``[B, Hkv, Dk, Dv (+1)]``: ``kv`` with ``z`` as an extra value column (internal)."""
        return self.kv if self.z is None else torch.cat([self.kv, self.z.unsqueeze(-1)], -1)

    @classmethod
    def from_augmented(cls, S: Tensor, normalized: bool) -> LinearState:
        if normalized:
            return cls(S[..., :-1], S[..., -1])
        return cls(S)


@dataclass(frozen=True)
class ChunkStates:
    """The state of a linear mechanism at every chunk boundary (``chunk_states``).

    Chunk ``n`` covers tokens ``[n C, (n + 1) C)`` (the last one may be short). Shapes use the
    ``[B, N, H, ...]`` layout of the rest of the library:

    Attributes:
        kv: ``[B, N + 1, Hkv, Dk, Dv]``, the state entering chunk ``n`` (``kv[:, 0]`` is the
            initial state, ``kv[:, N]`` the final state).
        z: ``[B, N + 1, Hkv, Dk]`` normalisers, or None.
        update_kv: ``[B, N, Hkv, Dk, Dv]``, chunk ``n``'s own contribution from a zero state.
        update_z: ``[B, N, Hkv, Dk]`` or None.
        log_decay: ``[B, N, Hkv, 1 or Dk]``, the log of each chunk's total decay (the product
            of its ``alpha_t``), or None for mechanisms without decay.
    """

    kv: Tensor
    z: Tensor | None
    update_kv: Tensor
    update_z: Tensor | None
    log_decay: Tensor | None

    @property
    def num_chunks(self) -> int:
        return self.update_kv.shape[1]

    def state(self, n: int) -> LinearState:
        """The state entering chunk ``n`` (``n = num_chunks``: the final state)."""
        return LinearState(self.kv[:, n], None if self.z is None else self.z[:, n])


def combine_states(updates: Tensor, log_decay: Tensor | None, initial: Tensor | None) -> Tensor:
    """The state entering every chunk from each chunk's own contribution and decay.

    ``S_(n+1) = exp(log_decay_n) S_n + updates_n`` with ``S_0 = initial`` (zeros if None).

    Args:
        updates: ``[B, N, H, Dk, Dv]`` per-chunk contributions (e.g. all-gathered across ranks).
        log_decay: ``[B, N, H, 1 or Dk]`` (rows of ``S`` decay), or None (no decay).
        initial: ``[B, H, Dk, Dv]`` or None.

    Returns:
        ``[B, N + 1, H, Dk, Dv]`` in the dtype of ``updates``.
    """
    S0 = torch.zeros_like(updates[:, 0]) if initial is None else initial.to(updates.dtype)
    if log_decay is None:
        # Without decay the recurrence is a prefix sum.
        prefix = torch.cumsum(updates, dim=1) + S0.unsqueeze(1)
        return torch.cat([S0.unsqueeze(1), prefix], dim=1)
    decay = torch.exp(log_decay.to(updates.dtype)).unsqueeze(-1)
    states = [S0]
    for n in range(updates.shape[1]):
        states.append(decay[:, n] * states[-1] + updates[:, n])
    return torch.stack(states, dim=1)
