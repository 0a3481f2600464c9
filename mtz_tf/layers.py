"""Keras layers that hold neurons shared by all tasks next to each task's own neurons."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from mtz_tf import activations

LOADING_NOTE = "import mtz_tf before keras.saving.load_model (it registers this layer)"
"""Written first into every mtz_tf layer's config: when a ``.keras`` file is loaded without
``import mtz_tf``, Keras's "Could not locate class" error prints the config, and with it
this note on what to do (Keras has no hook that could import the package itself)."""


def _replicated() -> bool:
    """Whether the layer is built under a strategy of several replicas: its BatchNorms then
    normalise with the global batch's moments (``synchronized=True``, an all-reduce of the
    replicas' sums), so that retraining under ``MirroredStrategy`` or
    ``MultiWorkerMirroredStrategy`` computes what one device computes on the whole batch."""
    import tensorflow as tf  # the TensorFlow backend's strategies

    return tf.distribute.get_strategy().num_replicas_in_sync > 1


def common_output(common_input: bool, batch_norm, sharing, units, shared_units: int) -> bool:
    """Whether a zipped layer gives all tasks one and the same output tensor: its input is
    common, it has no per-task BatchNorm, and every task uses only the shared neurons."""
    return (
        common_input
        and batch_norm is None
        and all(sharing)
        and all(n == shared_units for n in units)
    )


class _ZippedLayer(keras.layers.Layer):
    """Shared machinery of :class:`ZippedDense` and :class:`ZippedConv2D`.

    Task t's input x_t is laid out along its last axis as [inputs at shared positions
    (k_in); task t's specific inputs (m_t)]; its output as [shared neurons (k); its own
    (n_t − k)]. With ∗ the layer's linear map (matmul or convolution):

        shared_t   = x_t[..., :k_in] ∗ W_s + x_t[..., k_in:] ∗ W_{c,t} + b_s
        specific_t = x_t ∗ W_t + b_t
        output_t   = act(BN_t(concat(shared_t, specific_t)))      (BN_t only with BN)

    W_s, b_s are shared (the merged weights); a shared neuron's weights from task t's
    specific inputs W_{c,t} stay task-specific (DESIGN.md, "Zipped topology"). When every
    task receives the same tensor (``common_input``: the model input, or a fully shared
    previous layer) the layer takes that one tensor and computes the shared neurons once; if
    it is fully shared too (k = n_t for all t) and has no per-task BatchNorm, it returns
    one tensor, else a list of T tensors.

    A task with ``sharing[t] = False`` (one being added to an already zipped model, before
    it reaches this layer) uses none of the shared neurons: output_t = act(BN_t(x_t ∗ W_t +
    b_t)) with all n_t neurons its own.
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
        batch_norm: dict | None = None,
        sharing: Sequence[bool] | None = None,
        **kwargs,
    ):
        kwargs.pop("loading_note", None)
        super().__init__(**kwargs)
        self.sharing = [True] * len(task_names) if sharing is None else [bool(s) for s in sharing]
        self.task_names = [str(t) for t in task_names]
        self.units = [int(n) for n in units]
        self.shared_units = int(shared_units)
        self.input_units = [int(n) for n in input_units]
        self.input_shared_units = int(input_shared_units)
        self.common_input = bool(common_input)
        self.activation = activations.resolve(activation)
        self.activation_name = activation
        self.use_bias = bool(use_bias)
        self.batch_norm = dict(batch_norm) if batch_norm else None
        num_tasks = len(self.task_names)
        if num_tasks < 1 or len(set(self.task_names)) != num_tasks:
            raise ValueError(f"`task_names` must be distinct and non-empty: {self.task_names}")
        if (
            len(self.units) != num_tasks
            or len(self.input_units) != num_tasks
            or len(self.sharing) != num_tasks
        ):
            raise ValueError(
                f"`units`, `input_units` and `sharing` need one entry per task ({num_tasks}). "
                f"Received units={self.units}, input_units={self.input_units}, "
                f"sharing={self.sharing}"
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

    # Subclasses define the kernel's leading shape and the linear map.
    kernel_prefix: tuple = ()

    def _linear(self, x, kernel):
        raise NotImplementedError

    @property
    def common_output(self) -> bool:
        """Whether all tasks get one and the same output tensor."""
        return common_output(
            self.common_input, self.batch_norm, self.sharing, self.units, self.shared_units
        )

    def shared_count(self, t: int) -> int:
        """Shared neurons that task ``t`` uses (k, or 0 while it does not share)."""
        return self.shared_units if self.sharing[t] else 0

    def _weight(self, name, shape, initializer):
        # Kernels are given as (rows, columns) and get the kernel's leading shape; biases
        # are 1-D. Empty weights (nothing shared yet, or no specific neurons) are not
        # trainable, so optimizers do not warn that they get no gradient.
        shape = self.kernel_prefix + tuple(shape) if len(shape) == 2 else tuple(shape)
        return self.add_weight(
            name=name, shape=shape, initializer=initializer, trainable=0 not in shape
        )

    def build(self, input_shape=None):
        k, k_in = self.shared_units, self.input_shared_units
        self.shared_kernel = self._weight("shared_kernel", (k_in, k), "glorot_uniform")
        self.shared_bias = self._weight("shared_bias", (k,), "zeros") if self.use_bias else None
        self.cross_kernels, self.task_kernels, self.task_biases, self.norms = [], [], [], []
        for t, (name, n, width) in enumerate(zip(self.task_names, self.units, self.input_units)):
            k_t = self.shared_count(t)
            self.cross_kernels.append(
                self._weight(f"{name}_cross_kernel", (width - k_in, k_t), "zeros")
            )
            self.task_kernels.append(
                self._weight(f"{name}_kernel", (width, n - k_t), "glorot_uniform")
            )
            self.task_biases.append(
                self._weight(f"{name}_bias", (n - k_t,), "zeros") if self.use_bias else None
            )
            if self.batch_norm is not None:
                norm = keras.layers.BatchNormalization(
                    **self.batch_norm, synchronized=_replicated(), name=f"{name}_bn"
                )
                norm.build((None,) * (len(self.kernel_prefix) + 1) + (n,))
                self.norms.append(norm)

    def _affine(self, x, kernel, bias):
        y = self._linear(x, kernel)
        return y if bias is None else y + bias

    def call(self, inputs, training=None):
        k = self.shared_units
        per_task = [inputs] * len(self.task_names) if self.common_input else list(inputs)
        if len(per_task) != len(self.task_names):
            raise ValueError(
                f"Layer {self.name!r} expects {len(self.task_names)} inputs, one per task. "
                f"Received {len(per_task)}."
            )
        shared_common = (
            self._shared_part(0, inputs)
            if self.common_input and k > 0 and any(self.sharing)
            else None
        )
        if self.common_output:
            return self.activation(shared_common)
        return [self._task_output(t, x, shared_common, training) for t, x in enumerate(per_task)]

    def _shared_part(self, t: int, x):
        """Task t's pre-activation shared neurons from its input x."""
        k_in = self.input_shared_units
        terms = []  # skip empty parts: convolutions reject 0 input channels
        if k_in:
            terms.append(self._linear(x[..., :k_in], self.shared_kernel))
        if self.input_units[t] > k_in:
            terms.append(self._linear(x[..., k_in:], self.cross_kernels[t]))
        shared = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        return shared if self.shared_bias is None else shared + self.shared_bias

    def _own_part(self, t: int, x):
        """Task t's pre-activation own neurons from its input x."""
        return self._affine(x, self.task_kernels[t], self.task_biases[t])

    def pre_normalization(self, t: int, x, shared_common=None):
        """Task t's output before its BatchNorm and activation, [shared; own], from its input
        x (``shared_common``: the shared part, if computed already)."""
        pieces = []  # [shared; own], skipping empty parts
        if self.shared_count(t):
            pieces.append(self._shared_part(t, x) if shared_common is None else shared_common)
        if self.units[t] > self.shared_count(t):
            pieces.append(self._own_part(t, x))
        return pieces[0] if len(pieces) == 1 else ops.concatenate(pieces, axis=-1)

    def _task_output(self, t: int, x, shared_common, training):
        """Task t's output from its input x (``shared_common``: shared part, if computed)."""
        pre = self.pre_normalization(t, x, shared_common)
        if self.norms:
            pre = self.norms[t](pre, training=training)
        return self.activation(pre)

    def call_task(self, x, task: str, training=False):
        """Task ``task``'s output alone, from its own input x (one tensor), with this
        layer's variables: what a per-task endpoint computes."""
        return self._task_output(self.task_names.index(task), x, None, training)

    def get_config(self):
        config = {"loading_note": LOADING_NOTE, **super().get_config()}
        config.update(
            task_names=self.task_names,
            units=self.units,
            shared_units=self.shared_units,
            input_units=self.input_units,
            input_shared_units=self.input_shared_units,
            common_input=self.common_input,
            activation=self.activation_name,
            use_bias=self.use_bias,
            batch_norm=self.batch_norm,
            sharing=self.sharing,
        )
        return config

    def task_weights(self, task: str) -> tuple:
        """Task ``task``'s view as one ordinary layer: (kernel (..., d_t, n_t), bias (n_t,)).

        Output channels are [shared neurons; the task's own], input rows the task's input
        layout, so applying the plain layer to x_t gives this layer's pre-BN output.
        """
        t = self.task_names.index(task)
        if not self.shared_count(t):
            return self.task_kernels[t], self.task_biases[t]
        shared = ops.concatenate([self.shared_kernel, self.cross_kernels[t]], axis=-2)
        kernel = ops.concatenate([shared, self.task_kernels[t]], axis=-1)
        bias = (
            ops.concatenate([self.shared_bias, self.task_biases[t]], axis=0)
            if self.use_bias
            else None
        )
        return kernel, bias

    def _plain_layer(self, units: int) -> keras.layers.Layer:
        raise NotImplementedError

    def _plain_kernel(self, kernel):
        """A task's kernel (:meth:`task_weights`) in the plain layer's layout."""
        return kernel

    def _plain_input_channels(self, t: int, kernel) -> int:
        """Input channels of task ``t``'s plain layer."""
        return kernel.shape[-2]

    def task_layers(self, task: str) -> list[keras.layers.Layer]:
        """Built plain Keras layers computing only task ``task``'s output, in call order."""
        t = self.task_names.index(task)
        kernel, bias = self.task_weights(task)
        layer = self._plain_layer(self.units[t])
        layer.build(
            (None,) * (len(self.kernel_prefix) + 1) + (self._plain_input_channels(t, kernel),)
        )
        kernel = self._plain_kernel(kernel)
        layer.set_weights([kernel] if bias is None else [kernel, bias])
        if not self.norms:
            return [layer]
        norm = keras.layers.BatchNormalization(**self.batch_norm, name=f"{self.name}_bn")
        norm.build((None,) * (len(self.kernel_prefix) + 1) + (self.units[t],))
        norm.set_weights(self.norms[t].get_weights())
        return [layer, norm, keras.layers.Activation(self.activation, name=f"{self.name}_act")]

    def parameter_counts(self) -> tuple[int, int]:
        """(shared, task-specific) parameter counts; shared ones are stored once.

        Per-task BatchNorm parameters (γ, β, moving mean and variance) count as specific.
        """

        def size(v):
            return 0 if v is None else int(ops.size(v))

        shared = size(self.shared_kernel) + size(self.shared_bias)
        specific = sum(
            size(c) + size(k) + size(b)
            for c, k, b in zip(self.cross_kernels, self.task_kernels, self.task_biases)
        )
        specific += sum(sum(size(w) for w in norm.weights) for norm in self.norms)
        return shared, specific


@keras.saving.register_keras_serializable(package="mtz_tf")
class ZippedDense(_ZippedLayer):
    """A dense layer of T tasks whose first ``shared_units`` neurons are shared by all.

    See :class:`_ZippedLayer` for the computation. Kernels are (d, n).

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
        batch_norm: dict or None, ``BatchNormalization`` arguments (epsilon, momentum) of a
            per-task BatchNorm between the linear map and the activation.

    Call arguments:
        inputs: one tensor (batch, k_in) if ``common_input``, else a list of T tensors.
        training: bool, for the per-task BatchNorm.

    Returns:
        One tensor (batch, k) if ``common_output``, else a list of T tensors (batch, n_t).

    Example:
        >>> layer = ZippedDense(["a", "b"], units=[4, 5], shared_units=3,
        ...                     input_units=[8, 8], input_shared_units=8, common_input=True)
        >>> outputs = layer(keras.ops.ones((2, 8)))  # [(2, 4), (2, 5)]

    Reference: He, Zhou, Thiele, "Multi-Task Zipping via Layer-wise Neuron Sharing",
    NeurIPS 2018.
    """

    def _linear(self, x, kernel):
        return ops.matmul(x, kernel)

    def _plain_layer(self, units):
        return keras.layers.Dense(
            units,
            use_bias=self.use_bias,
            name=self.name,
            activation=None if self.norms else self.activation,
        )

    def compute_output_shape(self, input_shape):
        batch = input_shape[0] if self.common_input else input_shape[0][0]
        if self.common_output:
            return (batch, self.shared_units)
        return [(batch, n) for n in self.units]


@keras.saving.register_keras_serializable(package="mtz_tf")
class ZippedConv2D(_ZippedLayer):
    """A 2-D convolution of T tasks whose first ``shared_units`` filters are shared by all.

    See :class:`_ZippedLayer` for the computation (∗ is the convolution); kernels are
    (kh, kw, c_in, n), inputs and outputs channels-last.

    Args:
        kernel_size: (kh, kw).
        strides: (sh, sw).
        padding: ``"valid"`` or ``"same"``.
        Other arguments as :class:`ZippedDense`, counted in channels.

    Example:
        >>> layer = ZippedConv2D(["a", "b"], units=[4, 4], shared_units=4, input_units=[3, 3],
        ...                      input_shared_units=3, common_input=True, kernel_size=(3, 3))
        >>> y = layer(keras.ops.ones((2, 8, 8, 3)))  # one (2, 6, 6, 4) tensor: fully shared

    Reference: He, Zhou, Thiele, "Multi-Task Zipping via Layer-wise Neuron Sharing",
    NeurIPS 2018.
    """

    def __init__(self, *args, kernel_size=(3, 3), strides=(1, 1), padding="valid", **kwargs):
        if str(padding).lower() not in ("valid", "same"):
            raise ValueError(f"`padding` must be 'valid' or 'same'. Received: {padding!r}")
        super().__init__(*args, **kwargs)
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.strides = tuple(int(s) for s in strides)
        self.padding = str(padding).lower()
        self.kernel_prefix = self.kernel_size

    def _linear(self, x, kernel):
        return ops.conv(x, kernel, strides=self.strides, padding=self.padding)

    def _plain_layer(self, units):
        return keras.layers.Conv2D(units, self.kernel_size, **self._plain_options())

    def _plain_options(self) -> dict:
        """Arguments of the plain convolution holding one task's view of this layer."""
        return dict(
            strides=self.strides,
            padding=self.padding,
            use_bias=self.use_bias,
            name=self.name,
            activation=None if self.norms else self.activation,
        )

    def compute_output_shape(self, input_shape):
        shape = input_shape if self.common_input else input_shape[0]
        spatial = []
        for size, k, s in zip(shape[1:3], self.kernel_size, self.strides):
            if size is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append(-(-size // s))
            else:
                spatial.append((size - k) // s + 1)
        if self.common_output:
            return (shape[0], *spatial, self.shared_units)
        return [(shape[0], *spatial, n) for n in self.units]

    def get_config(self):
        config = super().get_config()
        config.update(kernel_size=self.kernel_size, strides=self.strides, padding=self.padding)
        return config


@keras.saving.register_keras_serializable(package="mtz_tf")
class ZippedDepthwiseConv2D(ZippedConv2D):
    """A depthwise convolution of T tasks whose first ``shared_units`` channels are shared.

    Channel c of the output reads only channel c of the input, so a task's input is laid
    out like its output, [shared channels (k); its own (n_t − k)], and

        shared_t   = dw(x_t[..., :k], W_s) + b_s,   specific_t = dw(x_t[..., k:], W_t) + b_t
        output_t   = act(BN_t(concat(shared_t, specific_t)))      (BN_t only with BN)

    with dw the depthwise convolution. Kernels are (kh, kw, 1, n): one input row per
    channel (its own), so the layer has no cross-weights, and a channel's weights are its
    kh·kw patch (plus bias), merged from per-channel Hessians (DESIGN.md, "Depthwise
    convolutions"). A standalone BatchNorm zips as this layer with a 1×1 kernel.

    Args:
        units: list of int, n_t, each task's channels (its input's too).
        Other arguments as :class:`ZippedConv2D`; ``input_units`` and
        ``input_shared_units`` are implied (one row per channel) and not taken.
    """

    rows_per_channel = 1
    """Kernel rows (axis −2) per channel: its own input channel."""

    def __init__(self, task_names, units, shared_units, common_input, **kwargs):
        kwargs.pop("input_units", None)
        kwargs.pop("input_shared_units", None)
        super().__init__(
            task_names,
            units,
            shared_units,
            input_units=[self.rows_per_channel] * len(task_names),
            input_shared_units=self.rows_per_channel,
            common_input=common_input,
            **kwargs,
        )

    def _linear(self, x, kernel):
        return ops.depthwise_conv(
            x, ops.swapaxes(kernel, -1, -2), strides=self.strides, padding=self.padding
        )

    def _shared_part(self, t: int, x):
        return self._affine(x[..., : self.shared_units], self.shared_kernel, self.shared_bias)

    def _own_part(self, t: int, x):
        own = x[..., self.shared_count(t) :]
        return self._affine(own, self.task_kernels[t], self.task_biases[t])

    def _plain_layer(self, units):
        return keras.layers.DepthwiseConv2D(self.kernel_size, **self._plain_options())

    def _plain_kernel(self, kernel):
        return ops.swapaxes(kernel, -1, -2)

    def _plain_input_channels(self, t: int, kernel) -> int:
        return self.units[t]

    def get_config(self):
        config = super().get_config()
        del config["input_units"], config["input_shared_units"]
        return config


@keras.saving.register_keras_serializable(package="mtz_tf")
class ZippedBatchNormalization(ZippedDepthwiseConv2D):
    """Each task's own BatchNorm (and activation) of zipped channels: output_t =
    act(BN_t(x_t)), x_t laid out [shared channels (k); the task's own].

    A standalone BatchNorm (one that does not follow a Dense/Conv2D layer, e.g. a
    pre-activation BatchNorm after an ``Add``) kept per task (``batch_norm="task"``). It
    has no weights of its own: its kernels are empty (1, 1, 0, n), so it costs nothing to
    share and its channels follow their coupled group's order. With
    ``batch_norm="fold"`` such a BatchNorm becomes its affine map instead, a 1×1
    :class:`ZippedDepthwiseConv2D` with bias.

    Args:
        batch_norm: dict, the ``BatchNormalization`` arguments (epsilon, momentum).
        Other arguments as :class:`ZippedDepthwiseConv2D`, without the convolution's.
    """

    rows_per_channel = 0

    def __init__(self, task_names, units, shared_units, common_input, **kwargs):
        for key in ("kernel_size", "strides", "padding", "use_bias"):
            kwargs.pop(key, None)
        if not kwargs.get("batch_norm"):
            raise ValueError("ZippedBatchNormalization needs `batch_norm` arguments.")
        super().__init__(
            task_names,
            units,
            shared_units,
            common_input,
            kernel_size=(1, 1),
            use_bias=False,
            **kwargs,
        )

    def _linear(self, x, kernel):
        return x  # no weights: the channels go to the BatchNorm as they are

    def task_layers(self, task: str) -> list[keras.layers.Layer]:
        t = self.task_names.index(task)
        norm = keras.layers.BatchNormalization(**self.batch_norm, name=self.name)
        norm.build((None, None, None, self.units[t]))
        norm.set_weights(self.norms[t].get_weights())
        return [norm, keras.layers.Activation(self.activation, name=f"{self.name}_act")]


@keras.saving.register_keras_serializable(package="mtz_tf")
class ChannelMajorFlatten(keras.layers.Layer):
    """Flattens (batch, H, W, C) in channel-major order (c, h, w) -> (batch, C·H·W).

    Zipped models flatten this way so that the features of the shared channels form a
    prefix of the flat vector, as the next :class:`ZippedDense` requires.
    """

    def call(self, inputs):
        x = ops.transpose(inputs, (0, 3, 1, 2))
        return ops.reshape(x, (ops.shape(x)[0], -1))

    def __init__(self, **kwargs):
        kwargs.pop("loading_note", None)
        super().__init__(**kwargs)

    def get_config(self):
        return {"loading_note": LOADING_NOTE, **super().get_config()}

    def compute_output_shape(self, input_shape):
        size = 1
        for dim in input_shape[1:]:
            size = None if dim is None or size is None else size * dim
        return (input_shape[0], size)


@keras.saving.register_keras_serializable(package="mtz_tf")
class SharedFirstConcatenate(keras.layers.Layer):
    """Concatenates on the channel axis with every input's shared channels first.

    Input i is laid out [shared channels (k_i); the task's own], as zipped layers write
    them; the output is

        [x_1[..., :k_1], ..., x_m[..., :k_m], x_1[..., k_1:], ..., x_m[..., k_m:]]

    so that the shared channels of all inputs form one prefix of Σ k_i channels, which is
    what the zipped layer reading the concatenation takes as its shared inputs (a DenseNet
    block's concatenation of its earlier layers' outputs). For each task it is a fixed
    permutation of the plain concatenation's channels; readers' kernel rows are kept in
    this order.

    Args:
        shared_counts: list of int, k_i, the shared channels leading input i.
        axis: int, the channel axis as the source ``Concatenate`` gave it (the last one).
    """

    def __init__(self, shared_counts, axis=-1, **kwargs):
        kwargs.pop("loading_note", None)
        super().__init__(**kwargs)
        self.shared_counts = [int(k) for k in shared_counts]
        self.axis = axis
        if any(k < 0 for k in self.shared_counts):
            raise ValueError(f"`shared_counts` must be non-negative. Received {shared_counts}")

    def call(self, inputs):
        if len(inputs) != len(self.shared_counts):
            raise ValueError(
                f"Layer {self.name!r} joins {len(self.shared_counts)} inputs (one shared count "
                f"each). Received {len(inputs)}."
            )
        shared = [x[..., :k] for x, k in zip(inputs, self.shared_counts) if k]
        own = [x[..., k:] for x, k in zip(inputs, self.shared_counts) if x.shape[-1] != k]
        return ops.concatenate(shared + own, axis=-1)

    def get_config(self):
        config = {"loading_note": LOADING_NOTE, **super().get_config()}
        config.update(shared_counts=self.shared_counts, axis=self.axis)
        return config

    def compute_output_shape(self, input_shapes):
        widths = [shape[-1] for shape in input_shapes]
        total = None if None in widths else sum(widths)
        return tuple(input_shapes[0][:-1]) + (total,)
