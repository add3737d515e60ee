"""A PyTorch copy of a fastcnn module tree (same structure, same weights), for the tests that
compare against PyTorch when it is installed (it is optional, never a dependency)."""

import numpy as np


def twin(model, torch):
    """An ``nn.Module`` computing what ``model`` computes, with its weights copied, in float64;
    its ``named_parameters()`` names are those PyTorch gives the same tree."""
    nn = torch.nn

    class Residual(nn.Module):
        def __init__(self, body, shortcut):
            super().__init__()
            self.body = body
            self.shortcut = shortcut

        def forward(self, x):
            return self.body(x) + (x if self.shortcut is None else self.shortcut(x))

    class Concat(nn.Module):
        def __init__(self, branches):
            super().__init__()
            for i, b in enumerate(branches):
                self.add_module(str(i), b)

        def forward(self, x):
            return torch.cat([b(x) for b in self.children()], dim=1)

    def t(a):
        return torch.tensor(np.asarray(a, dtype=np.float64))

    def build(m):
        cfg = m.get_config()
        kind = cfg["class"]
        if kind == "Sequential":
            return nn.Sequential(*[build(c) for c in m.children()])
        if kind == "Residual":
            return Residual(build(m.body), None if m.shortcut is None else build(m.shortcut))
        if kind == "Concat":
            return Concat([build(c) for c in m.children()])
        if kind == "Conv2D":
            pad = cfg["padding"] if isinstance(cfg["padding"], str) else tuple(cfg["padding"])
            out = nn.Conv2d(
                cfg["in_channels"],
                cfg["out_channels"],
                tuple(cfg["kernel_size"]),
                tuple(cfg["stride"]),
                pad,
                tuple(cfg["dilation"]),
                bias=cfg["bias"],
                dtype=torch.float64,
            )
        elif kind == "Dense":
            out = nn.Linear(
                cfg["in_features"], cfg["out_features"], bias=cfg["bias"], dtype=torch.float64
            )
        elif kind == "BatchNorm2D":
            out = nn.BatchNorm2d(
                cfg["num_features"], cfg["eps"], cfg["momentum"], dtype=torch.float64
            )
            out.running_mean.copy_(t(m.running_mean))
            out.running_var.copy_(t(m.running_var))
        elif kind == "GlobalAvgPool2D":
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif kind == "MaxPool2D":
            return nn.MaxPool2d(
                tuple(cfg["kernel_size"]), tuple(cfg["stride"]), tuple(cfg["padding"])
            )
        elif kind == "AvgPool2D":
            return nn.AvgPool2d(
                tuple(cfg["kernel_size"]), tuple(cfg["stride"]), tuple(cfg["padding"])
            )
        else:
            return {"ReLU": nn.ReLU, "Tanh": nn.Tanh, "Flatten": nn.Flatten}[kind]()
        with torch.no_grad():
            out.weight.copy_(t(m.weight.data))
            if getattr(m, "bias", None) is not None:
                out.bias.copy_(t(m.bias.data))
        return out

    net = build(model)
    net.train(model.training)
    return net
