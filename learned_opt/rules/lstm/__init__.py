"""The coordinate-wise LSTM update rule of Andrychowicz et al. (2016).

One small LSTM, its weights shared by every coordinate, reads each coordinate's preprocessed
gradient and emits that coordinate's step. All coordinates of a param group are processed in
batched tensor ops: small tensors are packed together and large ones split, so each LSTM call sees
at most ``chunk_size`` coordinates and the extra memory beyond the new state stays bounded.

Zero gradient, zero step. The LSTM's raw output at a zero gradient is not zero (its biases and
the preprocessed input ``(-1, 0)`` see to that), so the rule subtracts a *reference*: the output
of the same LSTM on the same number of all-zero gradients from a fresh state. The reference is
one coordinate's trajectory, kept in the group state (``ref_h``, ``ref_c``). A coordinate at rest
(zero gradient and exactly the reference state) is pinned to the reference's new state and output,
so a coordinate whose gradients have all been zero since its state was fresh moves exactly nothing,
by construction and for any θ (batched matmuls alone would leave float noise of ~1e-9, as they are
not bitwise batch-size invariant); once it has seen a gradient it may keep moving (as momentum
does). Small gradients give small steps: the input is then close to the reference's.

State: per parameter ``h`` and ``c`` shaped ``param.shape + (num_layers, hidden_size)`` (for the
default 2 x 20 that is 80 numbers, 320 bytes per float32 parameter); per group ``ref_h``/``ref_c``
of shape ``(num_layers, hidden_size)``. The per-parameter state is stored feature-major (see
:mod:`~learned_opt.rules.lstm.layout`), so the fused paths' element-wise work runs over contiguous rows.

One math, three execution paths, chosen per step by :meth:`LSTMRule.update`:

- :mod:`~learned_opt.rules.lstm.reference`: autograd op by op (second-order meta-training);
- :mod:`~learned_opt.rules.lstm.first_order`: the fused chunk step with its written-out backward
  (first-order meta-training, unless the config's ``fused_training`` is off);
- :mod:`~learned_opt.rules.lstm.fast`: no graph, fused and in place (the optimizer, evaluation).

:mod:`~learned_opt.rules.lstm.core` holds θ, the config and the math,
:mod:`~learned_opt.rules.lstm.layout` what the paths share (state layout, at-rest test, pinning),
:mod:`~learned_opt.rules.lstm.kernels` the fused kernels. Timings and the gate-matmul efficiency
are in ``docs/speed.md`` (``scripts/bench_speed.py``).
"""

from learned_opt.rules.lstm.core import DEFAULT_CHUNK_SIZE, PREPROCESSINGS, LSTMCore, preprocess_log_sign
from learned_opt.rules.lstm.rule import LSTMRule

__all__ = ["DEFAULT_CHUNK_SIZE", "PREPROCESSINGS", "LSTMCore", "LSTMRule", "preprocess_log_sign"]
