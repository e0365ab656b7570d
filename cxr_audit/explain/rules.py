"""Project-specific zennit rules."""

from __future__ import annotations

from zennit.core import BasicHook, Stabilizer
from zennit.rules import ClampMod


class NonNegativeInputZPlus(BasicHook):
    """The z+ rule (Montavon et al., 2017, "Explaining nonlinear classification decisions with deep
    Taylor decomposition", Pattern Recognition 65:211) for layers whose input is non-negative:
    ``R_i = x_i * sum_j w+_ij R_j / z+_j``.

    zennit's ``ZPlus`` also evaluates a second term for negative inputs; after a ReLU that term is
    exactly zero, so this rule gives the same relevance with one modified forward/backward
    instead of two. Only use it where inputs are ReLU/pooling outputs.
    """

    def __init__(self, stabilizer=1e-6, zero_params=None):
        stabilizer_fn = Stabilizer.ensure(stabilizer)
        super().__init__(
            input_modifiers=[lambda input: input.clamp(min=0)],
            param_modifiers=[ClampMod(min=0.0, zero_params=zero_params)],
            output_modifiers=[lambda output: output],
            gradient_mapper=lambda out_grad, outputs: [out_grad / stabilizer_fn(outputs[0])],
            reducer=lambda inputs, gradients: inputs[0] * gradients[0],
        )
        self._stabilizer = stabilizer
        self._zero_params = zero_params

    def copy(self):
        return NonNegativeInputZPlus(self._stabilizer, self._zero_params)
