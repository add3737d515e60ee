"""Sequential: a list of layers run in order (PyTorch's nn.Sequential), plus summary and config.

The layer list ``model.layers`` is the single source of truth: parameter names ("0.weight",
"3.bias", ... = index in the list + the layer's own name, as PyTorch), state dict keys, config and
summary are all derived from it.
"""
import numbers

import numpy as np

from .layers import Conv2D, Dense, Layer, MaxPool2D, ReLU, _check_state, layer_from_config
from .threads import compute_threads

__all__ = ["Sequential", "from_config"]


class Sequential:
    """Layers applied in order. ``Sequential([l0, l1, ...])`` or ``Sequential(l0, l1, ...)``."""

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = layers[0]
        layers = list(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: layer {i} is not a fastcnn Layer: {layer!r}")
        self.layers = layers
        self.training = True

    # -- container ------------------------------------------------------------------------
    def __len__(self):
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        lines = [f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers)]
        return "Sequential(\n" + "\n".join(lines) + "\n)"

    # -- computation ----------------------------------------------------------------------
    # Some runs of layers execute fused, in one kernel pass instead of two or three, with the
    # same results, bitwise, and each layer's state as its backward needs it:
    # - forward, Conv2D -> ReLU -> MaxPool2D with windows that tile (the reference network's
    #   2x2 pools): the convolution's rows are pooled as they are computed, never stored;
    # - forward, Conv2D -> ReLU otherwise, and Dense -> ReLU: the ReLU applied as the output is
    #   stored;
    # - backward, ReLU -> MaxPool2D: the pooling's backward applies the ReLU's mask (zero where
    #   the pooled maximum is <= 0), after which the ReLU's backward would change nothing;
    # - backward, Conv2D -> ReLU -> MaxPool2D with windows that tile: the convolution's
    #   gradients straight from the pooled gradient, summing only the selected cells' terms.
    def forward(self, x):
        layers = self.layers
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, Dense) and type(nxt) is ReLU:
                x = nxt.adopt_output(layer.forward_relu(x))
                i += 2
            elif isinstance(layer, Conv2D) and type(nxt) is ReLU:
                pool = layers[i + 2] if i + 2 < len(layers) else None
                if type(pool) is MaxPool2D and pool.tiles():
                    nxt.adopt_output(None)
                    x = layer.forward_relu_maxpool(x, pool)
                    i += 3
                else:
                    x = nxt.adopt_output(layer.forward_relu(x))
                    i += 2
            else:
                x = layer.forward(x)
                i += 1
        return x

    __call__ = forward

    def backward(self, dy, input_grad=True):
        """Backpropagate ``dy`` (gradient of the loss with respect to the output) through every
        layer, accumulating parameter gradients; returns the gradient to the input. With
        ``input_grad=False`` (what ``fit`` does) the first layer skips computing it and None is
        returned, as PyTorch skips it for an input that does not require a gradient."""
        layers = self.layers
        i = len(layers) - 1
        while i >= 0:
            layer = layers[i]
            if (type(layer) is MaxPool2D and i >= 2 and type(layers[i - 1]) is ReLU
                    and isinstance(layers[i - 2], Conv2D) and layer.tiles()):
                dy = layers[i - 2].backward_through_maxpool(layer, dy, input_grad=input_grad or i > 2)
                i -= 3
            elif type(layer) is MaxPool2D and i >= 1 and type(layers[i - 1]) is ReLU:
                dy = layer.backward_relu(dy)
                i -= 2
            elif i == 0 and not input_grad and isinstance(layer, (Conv2D, Dense)):
                dy = layer.backward(dy, input_grad=False)
                i -= 1
            else:
                dy = layer.backward(dy)
                i -= 1
        return dy

    def predict(self, x, batch_size=256):
        """Outputs for ``x`` computed in eval mode in batches of ``batch_size``; the previous
        mode is restored afterwards. Runs with the BLAS limited as in ``fit``/``evaluate``
        (``fastcnn.threads.compute_threads``): no BLAS pool spins against Numba's, and the logits
        equal ``evaluate``'s at the same batch size."""
        if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"Sequential.predict: expected batch_size to be an int, "
                            f"got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"Sequential.predict: expected batch_size >= 1, got {batch_size}")
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"Sequential.predict: expected a batch of inputs (N, ...), "
                             f"got shape {x.shape}")
        modes = [layer.training for layer in self.layers]
        was_training = self.training
        self.eval()
        try:
            with compute_threads():
                if x.shape[0] <= batch_size:
                    return self.forward(x)
                outs = [self.forward(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
                return np.concatenate(outs, axis=0)
        finally:
            self.training = was_training
            for layer, mode in zip(self.layers, modes):
                layer.train(mode)

    # -- mode -----------------------------------------------------------------------------
    def train(self, mode=True):
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- parameters -----------------------------------------------------------------------
    def named_parameters(self):
        return [(f"{i}.{name}", p) for i, layer in enumerate(self.layers)
                for name, p in layer.named_parameters()]

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # -- state ----------------------------------------------------------------------------
    def state_dict(self):
        """"<index>.<name>" -> a copy of each parameter and buffer (e.g. "0.weight",
        "2.running_mean")."""
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers)
                for k, v in layer.state_dict().items()}

    def load_state_dict(self, state, strict=True):
        """Copy ``state`` into the model in place. Every key, shape and dtype is validated before
        anything is assigned; with ``strict``, missing or unexpected keys are a ValueError listing
        them (without, they are skipped)."""
        targets = {f"{i}.{k}": v for i, layer in enumerate(self.layers)
                   for k, v in layer._state_targets().items()}
        pairs = _check_state(targets, state, strict, "", "Sequential")
        for target, value in pairs:
            np.copyto(target, value)

    def get_rng_state(self):
        """{"<index>": state} for every layer with its own generator (Dropout)."""
        return {str(i): layer.get_rng_state() for i, layer in enumerate(self.layers)
                if hasattr(layer, "get_rng_state")}

    def set_rng_state(self, states):
        for key, state in states.items():
            self.layers[int(key)].set_rng_state(state)

    # -- config ---------------------------------------------------------------------------
    def get_config(self):
        return {"class": "Sequential", "layers": [layer.get_config() for layer in self.layers]}

    # -- summary --------------------------------------------------------------------------
    def summary(self, input_shape, print_fn=print):
        """A table of each layer's output shape, parameter count and forward FLOPs, with totals,
        for an input of shape ``input_shape`` (batch dimension included, e.g. (1, 1, 28, 28)).
        Shapes are validated on the way, so this also checks that the layers fit together.
        Returns the table as a string and prints it (``print_fn=None`` to only return it)."""
        shape = tuple(int(s) for s in input_shape)
        rows = []
        total_params = total_flops = total_buffers = 0
        for i, layer in enumerate(self.layers):
            flops = layer.flops(shape)
            shape = layer.output_shape(shape)
            params = layer.num_parameters()
            total_buffers += sum(getattr(layer, b).size for b in layer._buffers)
            total_params += params
            total_flops += flops
            rows.append((str(i), repr(layer), str(shape), f"{params:,}", f"{flops:,}"))
        header = ("#", "Layer", "Output shape", "Params", "FLOPs")
        widths = [max(len(r[k]) for r in rows + [header]) for k in range(5)]

        def fmt(r):
            return "  ".join([r[0].rjust(widths[0]), r[1].ljust(widths[1]),
                              r[2].ljust(widths[2]), r[3].rjust(widths[3]),
                              r[4].rjust(widths[4])]).rstrip()

        width = len(fmt(tuple("x" * w for w in widths)))
        lines = [f"Sequential, input shape {tuple(int(s) for s in input_shape)}", "=" * width,
                 fmt(header), "-" * width]
        lines += [fmt(r) for r in rows]
        lines += ["=" * width,
                  f"Total params: {total_params:,}",
                  f"Trainable params: {total_params:,}",
                  f"Non-trainable buffers: {total_buffers:,}",
                  f"Forward FLOPs: {total_flops:,}",
                  f"Output shape: {shape}"]
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text


def from_config(config, rng=None):
    """Rebuild a Sequential from ``get_config()`` output (fresh parameters drawn from ``rng``, a
    Generator or seed; load weights with ``load_state_dict``)."""
    if not isinstance(config, dict) or config.get("class") != "Sequential" \
            or not isinstance(config.get("layers"), list):
        raise ValueError("from_config: expected {'class': 'Sequential', 'layers': [...]}, "
                         f"got {config!r}")
    rng = np.random.default_rng(rng)
    return Sequential([layer_from_config(c, rng=rng) for c in config["layers"]])
