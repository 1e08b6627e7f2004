"""Methods whose merged tensor is θ0 + scale · (one merged task vector), with a state that does not
depend on the scale (Iso-C, TSV-M): the scale can be changed, or tried value after value by
``--tune``, without merging again. The merged task vector is derived from the state (never the
weights themselves) by decompositions that run through the resolved linear-algebra backend."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from hf_merge.merging.methods.base import MergeMethod, Parameter
from hf_merge.merging.methods.linalg_backend import resolve as resolve_linalg

#: The scales ``--tune`` tries (Iso-C's and TSV-M's optimum on the zoo's validation splits lay at
#: 1.2-1.8; FusionBench's published figures used 1.0 and 1.5).
SCALE_GRID = (0.6, 0.8, 1.0, 1.2, 1.5, 1.8, 2.0)


def scaling_parameter(help: str) -> Parameter:
    """The ``scaling_factor`` of a scaled-output method: default 1.0 (FusionBench's), set by
    ``--scaling`` / ``--lambda``, tuned over :data:`SCALE_GRID`."""
    return Parameter("scaling_factor", 1.0, help, flags=("--scaling", "--lambda"), tune_grid=SCALE_GRID)


class ScaledOutputMethod(MergeMethod):
    """A method whose output is ``θ0 + hyperparameters[scaled_output] · merged_task_vector(name)``."""

    scaled_output = "scaling_factor"
    buffer_is_output = False  # the buffer is the state the merged task vector is derived from

    def __init__(self, **hyperparameters: Any):
        super().__init__(**hyperparameters)
        self.linalg = resolve_linalg()  # how, not what: HF_MERGE_LINALG, never part of the recipe

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
