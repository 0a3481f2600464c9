"""Keras layers that hold neurons shared by all tasks next to each task's own neurons."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mtz_tf")
class ZippedDense(keras.layers.Layer):
    """A dense layer of T tasks whose first ``shared_units`` neurons are shared by all.

    Task t's input x_t (batch, k_in + m_t) is laid out as [inputs at shared positions (k_in);
    task t's specific inputs (m_t)]; its output is [shared neurons (k); specific (n_t − k)]:

        shared_t   = act(x_t[:, :k_in] @ W_s + x_t[:, k_in:] @ W_{c,t} + b_s)
        specific_t = act(x_t @ W_t + b_t)
        output_t   = concat(shared_t, specific_t)

    W_s (k_in, k) and b_s are shared (the merged weights); a shared neuron's weights from
    task t's specific inputs W_{c,t} (m_t, k) stay task-specific (DESIGN.md, "Zipped
    topology"). When every task receives the same tensor (``common_input``: the model input,
    or a fully shared previous layer) the layer takes that one tensor, the shared neurons are
    computed once, and if the layer is fully shared too (k = n_t for all t) it returns one
    tensor; otherwise it returns a list of T tensors.

    Args:
        task_names: list of str, the T tasks, in order.
        units: list of int, n_t, each task's number of neurons (>= ``shared_units``).
        shared_units: int, k, number of neurons shared by all tasks.
        input_units: list of int, each task's input width k_in + m_t (all equal to the
            common width when ``common_input``).
        input_shared_units: int, k_in, number of leading input positions that are shared.
        common_input: bool, whether all tasks receive one and the same input tensor.
        activation: str, element-wise activation.
        use_bias: bool, whether neurons have a bias.

    Call arguments:
        inputs: one tensor (batch, k_in) if ``common_input``, else a list of T tensors.

    Returns:
        One tensor (batch, k) if ``common_output``, else a list of T tensors (batch, n_t).

    Example:
        >>> layer = ZippedDense(["a", "b"], units=[4, 5], shared_units=3,
        ...                     input_units=[8, 8], input_shared_units=8, common_input=True)
        >>> outputs = layer(keras.ops.ones((2, 8)))  # [(2, 4), (2, 5)]

    Reference: He, Zhou, Thiele, "Multi-Task Zipping via Layer-wise Neuron Sharing",
    NeurIPS 2018.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        units: Sequence[int],
        shared_units: int,
        input_units: Sequence[int],
        input_shared_units: int,
        common_input: bool,
        activation: str = "linear",
        use_bias: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.task_names = [str(t) for t in task_names]
        self.units = [int(n) for n in units]
        self.shared_units = int(shared_units)
        self.input_units = [int(n) for n in input_units]
        self.input_shared_units = int(input_shared_units)
        self.common_input = bool(common_input)
        self.activation = keras.activations.get(activation)
        self.activation_name = activation
        self.use_bias = bool(use_bias)
        num_tasks = len(self.task_names)
        if num_tasks < 1 or len(set(self.task_names)) != num_tasks:
            raise ValueError(f"`task_names` must be distinct and non-empty: {self.task_names}")
        if len(self.units) != num_tasks or len(self.input_units) != num_tasks:
            raise ValueError(
                f"`units` and `input_units` need one entry per task ({num_tasks}). Received "
                f"units={self.units}, input_units={self.input_units}"
            )
        if not 0 <= self.shared_units <= min(self.units):
            raise ValueError(
                f"`shared_units` must be in [0, min(units)={min(self.units)}]. Received: "
                f"shared_units={self.shared_units}"
            )
        if not 0 <= self.input_shared_units <= min(self.input_units):
            raise ValueError(
                f"`input_shared_units` must be in [0, min(input_units)]. Received: "
                f"{self.input_shared_units} with input_units={self.input_units}"
            )
        if self.common_input and any(n != self.input_shared_units for n in self.input_units):
            raise ValueError(
                "With `common_input`, every input width must equal `input_shared_units`. "
                f"Received input_units={self.input_units}, "
                f"input_shared_units={self.input_shared_units}"
            )

    @property
    def common_output(self) -> bool:
        """Whether all tasks get one and the same output tensor."""
        return self.common_input and all(n == self.shared_units for n in self.units)

    def _weight(self, name, shape, initializer):
        # Empty weights (nothing shared yet, or no specific neurons) are not trainable, so
        # optimizers do not warn that they get no gradient.
        return self.add_weight(
            name=name, shape=shape, initializer=initializer, trainable=0 not in shape
        )

    def build(self, input_shape=None):
        k, k_in = self.shared_units, self.input_shared_units
        self.shared_kernel = self._weight("shared_kernel", (k_in, k), "glorot_uniform")
        self.shared_bias = self._weight("shared_bias", (k,), "zeros") if self.use_bias else None
        self.cross_kernels, self.task_kernels, self.task_biases = [], [], []
        for name, n, width in zip(self.task_names, self.units, self.input_units):
            self.cross_kernels.append(
                self._weight(f"{name}_cross_kernel", (width - k_in, k), "zeros")
            )
            self.task_kernels.append(
                self._weight(f"{name}_kernel", (width, n - k), "glorot_uniform")
            )
            self.task_biases.append(
                self._weight(f"{name}_bias", (n - k,), "zeros") if self.use_bias else None
            )

    def _affine(self, x, kernel, bias):
        y = ops.matmul(x, kernel)
        return y if bias is None else y + bias

    def call(self, inputs):
        k, k_in = self.shared_units, self.input_shared_units
        per_task = [inputs] * len(self.task_names) if self.common_input else list(inputs)
        if len(per_task) != len(self.task_names):
            raise ValueError(
                f"Layer {self.name!r} expects {len(self.task_names)} inputs, one per task. "
                f"Received {len(per_task)}."
            )
        shared_common = (
            self.activation(self._affine(inputs, self.shared_kernel, self.shared_bias))
            if self.common_input
            else None
        )
        if self.common_output:
            return shared_common
        outputs = []
        for t, x in enumerate(per_task):
            if shared_common is not None:
                shared = shared_common
            else:
                pre = ops.matmul(x[:, k_in:], self.cross_kernels[t])
                shared = self.activation(
                    self._affine(x[:, :k_in], self.shared_kernel, self.shared_bias) + pre
                )
            specific = self.activation(self._affine(x, self.task_kernels[t], self.task_biases[t]))
            outputs.append(specific if k == 0 else ops.concatenate([shared, specific], axis=-1))
        return outputs

    def compute_output_shape(self, input_shape):
        batch = input_shape[0] if self.common_input else input_shape[0][0]
        if self.common_output:
            return (batch, self.shared_units)
        return [(batch, n) for n in self.units]

    def get_config(self):
        config = super().get_config()
        config.update(
            task_names=self.task_names,
            units=self.units,
            shared_units=self.shared_units,
            input_units=self.input_units,
            input_shared_units=self.input_shared_units,
            common_input=self.common_input,
            activation=self.activation_name,
            use_bias=self.use_bias,
        )
        return config

    def task_weights(self, task: str) -> tuple:
        """Task ``task``'s view as one ordinary dense layer: (kernel (d_t, n_t), bias (n_t,)).

        Columns are [shared neurons; the task's own], rows the task's input layout, so
        ``act(x_t @ kernel + bias)`` equals this layer's output for the task.
        """
        t = self.task_names.index(task)
        shared = ops.concatenate([self.shared_kernel, self.cross_kernels[t]], axis=0)
        kernel = ops.concatenate([shared, self.task_kernels[t]], axis=1)
        bias = (
            ops.concatenate([self.shared_bias, self.task_biases[t]], axis=0)
            if self.use_bias
            else None
        )
        return kernel, bias

    def task_layer(self, task: str) -> keras.layers.Dense:
        """A built ``keras.layers.Dense`` computing only task ``task``'s output."""
        kernel, bias = self.task_weights(task)
        layer = keras.layers.Dense(
            self.units[self.task_names.index(task)],
            activation=self.activation_name,
            use_bias=self.use_bias,
            name=self.name,
        )
        layer.build((None, kernel.shape[0]))
        layer.set_weights([kernel] if bias is None else [kernel, bias])
        return layer

    def parameter_counts(self) -> tuple[int, int]:
        """(shared, task-specific) parameter counts; shared ones are stored once."""
        k, k_in = self.shared_units, self.input_shared_units
        shared = k_in * k + (k if self.use_bias else 0)
        specific = sum(
            (width - k_in) * k + width * (n - k) + ((n - k) if self.use_bias else 0)
            for n, width in zip(self.units, self.input_units)
        )
        return shared, specific
