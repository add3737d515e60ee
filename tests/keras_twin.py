"""A Keras copy of a fastcnn module tree (same layers, same weights), channels-last: the
TensorFlow peer of the end-to-end benchmark (bench/e2e_tensorflow.py) and its test. TensorFlow is
optional, never a dependency: nothing here imports it; the caller passes ``keras`` in.

The twin takes NHWC inputs, as Keras's convolutions do on the CPU. Where fastcnn pads a
convolution symmetrically and Keras's 'same' would not pad the same way (stride 2, or an even
kernel), an explicit ZeroPadding2D precedes a 'valid' convolution. fastcnn's Flatten orders the
features as NCHW (c, h, w); Keras's as NHWC (h, w, c): the Dense layer after a Flatten gets its
input rows permuted, so that the two networks compute the same function.
"""

from __future__ import annotations

import numpy as np


def _conv_padding(cfg):
    """Keras's padding for a fastcnn Conv2D config: ('same' | 'valid', explicit pad or None)."""
    pad = cfg["padding"]
    if isinstance(pad, str):  # fastcnn's 'same' pads as Keras/TensorFlow does, at any stride
        return pad, None
    ph, pw = pad
    if ph == 0 and pw == 0:
        return "valid", None
    kh, kw = cfg["kernel_size"]
    dh, dw = cfg["dilation"]
    same = (
        tuple(cfg["stride"]) == (1, 1)
        and (dh * (kh - 1)) % 2 == 0
        and (dw * (kw - 1)) % 2 == 0
        and (ph, pw) == (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    )
    return ("same", None) if same else ("valid", (ph, pw))


def twin(model, keras, input_shape, copy_weights=True):
    """A ``keras.Model`` computing what ``model`` (a fastcnn module tree) computes, for NHWC
    inputs of ``input_shape`` = (C, H, W) (fastcnn's), float32, with fastcnn's weights copied
    (``copy_weights``). BatchNorm: momentum 1 - fastcnn's, the same epsilon."""
    layers = keras.layers
    copies = []  # (keras layer, [arrays]) set after the model is built

    def build(m, x, flat_from=None):
        """Apply ``m``'s twin to the Keras tensor ``x``; returns (output, flat_from) where
        flat_from is the (H, W, C) a Flatten just turned into features (for the next Dense)."""
        cfg = m.get_config()
        kind = cfg["class"]
        if kind == "Sequential":
            for c in m.children():
                x, flat_from = build(c, x, flat_from)
            return x, flat_from
        if kind == "Residual":
            body, _ = build(m.body, x)
            short = x if m.shortcut is None else build(m.shortcut, x)[0]
            return layers.Add()([body, short]), None
        if kind == "Concat":
            outs = [build(c, x)[0] for c in m.children()]
            return layers.Concatenate(axis=-1)(outs), None
        if kind == "Conv2D":
            padding, explicit = _conv_padding(cfg)
            if explicit is not None:
                x = layers.ZeroPadding2D(explicit)(x)
            layer = layers.Conv2D(
                cfg["out_channels"],
                tuple(cfg["kernel_size"]),
                strides=tuple(cfg["stride"]),
                padding=padding,
                dilation_rate=tuple(cfg["dilation"]),
                use_bias=cfg["bias"],
            )
            w = [m.weight.data.transpose(2, 3, 1, 0)]  # (F, C, kh, kw) -> (kh, kw, C, F)
            if cfg["bias"]:
                w.append(m.bias.data)
            copies.append((layer, w))
            return layer(x), None
        if kind == "Dense":
            layer = layers.Dense(cfg["out_features"], use_bias=cfg["bias"])
            kernel = m.weight.data.T  # (out, in) -> (in, out), rows in fastcnn's feature order
            if flat_from is not None:  # rows in NHWC order: row (h, w, c) <- fastcnn c*H*W+h*W+w
                h, w_, c = flat_from
                kernel = kernel.reshape(c, h, w_, -1).transpose(1, 2, 0, 3).reshape(h * w_ * c, -1)
            w = [kernel]
            if cfg["bias"]:
                w.append(m.bias.data)
            copies.append((layer, w))
            return layer(x), None
        if kind == "BatchNorm2D" or kind == "BatchNorm1D":
            layer = layers.BatchNormalization(
                axis=-1, momentum=1.0 - cfg["momentum"], epsilon=cfg["eps"]
            )
            copies.append((layer, [m.weight.data, m.bias.data, m.running_mean, m.running_var]))
            return layer(x), None
        if kind == "Flatten":
            shape = tuple(x.shape[1:])
            return layers.Flatten()(x), (shape if len(shape) == 3 else None)
        if kind in ("MaxPool2D", "AvgPool2D"):
            if any(cfg["padding"]):
                raise NotImplementedError(f"keras_twin: {kind} with padding {cfg['padding']}")
            cls = layers.MaxPooling2D if kind == "MaxPool2D" else layers.AveragePooling2D
            return cls(tuple(cfg["kernel_size"]), tuple(cfg["stride"]), padding="valid")(x), None
        if kind == "GlobalAvgPool2D":
            return layers.GlobalAveragePooling2D()(x), None
        if kind == "ReLU":
            return layers.ReLU()(x), None
        if kind == "LeakyReLU":
            return layers.LeakyReLU(negative_slope=cfg["negative_slope"])(x), None
        if kind in ("Tanh", "Sigmoid"):
            return layers.Activation(kind.lower())(x), None
        if kind == "Softmax":  # fastcnn's axis 1 is the channels: the last axis in NHWC
            if cfg["dim"] not in (1, -1) and len(x.shape) != 2:
                raise NotImplementedError(f"keras_twin: Softmax over dim {cfg['dim']}")
            return layers.Softmax(axis=-1)(x), None
        if kind == "Dropout":
            return layers.Dropout(cfg["p"], seed=cfg.get("seed"))(x), flat_from
        raise NotImplementedError(f"keras_twin: no Keras twin for {kind}")

    c, h, w = input_shape
    inputs = keras.Input((h, w, c), dtype="float32")
    outputs, _ = build(model, inputs)
    net = keras.Model(inputs, outputs)
    if copy_weights:
        for layer, arrays in copies:
            layer.set_weights([np.asarray(a, dtype=np.float32) for a in arrays])
    return net


def trainable_count(net):
    """Trainable parameters of a Keras model (fastcnn's ``parameters()`` are the trainable
    ones; BatchNorm's moving statistics are buffers in both)."""
    return int(sum(np.prod(v.shape) for v in net.trainable_weights))
