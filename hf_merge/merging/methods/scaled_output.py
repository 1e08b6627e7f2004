"""Methods whose merged tensor is θ0 + scale · (one merged task vector), with a state that does not
depend on the scale (Iso-C, TSV-M): the scale can be changed, or tried value after value by
``--tune``, without merging again."""

from __future__ import annotations

from abc import abstractmethod

import torch

from hf_merge.merging.methods.base import MergeMethod


class ScaledOutputMethod(MergeMethod):
    """A method whose output is ``θ0 + hyperparameters[scaled_output] · merged_task_vector(name)``."""

    scaled_output = "scaling_factor"

    @abstractmethod
    def merged_task_vector(self, name: str) -> torch.Tensor:
        """The unscaled merged task vector of ``name`` (compute device and precision)."""

    def scaled(self, name: str, task_vector: torch.Tensor, scale: float) -> torch.Tensor:
        """``θ0 + scale · task_vector`` for ``name``, computed and stored as :meth:`output` stores it."""
        return self._stored(name, self._math(self.context.base.get(name)).add_(task_vector, alpha=scale))

    def output(self, name: str) -> torch.Tensor:
        if self.step_count == 0:
            return self.context.base.get(name)
        scale = self.hyperparameters[self.scaled_output]
        return self.scaled(name, self.merged_task_vector(name), float(scale))
