"""Task arithmetic (Ilharco et al., arXiv:2212.04089).

θ = θ_base + λ Σ_i w_i τ_i with τ_i = θ_i − θ_base.

Defaults: λ = 1 and w_i = 1, the plain sum of task vectors (the paper's addition before λ is tuned on
validation data; MergeBench, arXiv:2505.10833, uses λ = 0.4 in its scripts). A negative weight subtracts a
task, the paper's forgetting by negation. ``normalize: true`` divides the sum by Σ_i w_i (mergekit's option).
"""
import torch

from mergeplug.merging import Merger, TensorInputs, summed_task_vectors


class TaskArithmeticMerger(Merger):
    needs_base = True
    stored_dtype_inputs = True  # one weighted sum of the inputs (summed_task_vectors): no converted copies

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        return summed_task_vectors(
            inputs, normalize=bool(inputs.parameters["normalize"]),
            scale=float(inputs.parameters["lambda"]),
        )
