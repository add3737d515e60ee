"""Pictures: History.plot, plots.confusion and plots.filters write real PNGs (signature, size,
not blank), never through pyplot; without matplotlib the error says how to install it."""

import sys

import numpy as np
import pytest

import fastcnn
from fastcnn import plots
from fastcnn.training import History

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def history(epochs=3, validation=True):
    h = History()
    for e in range(1, epochs + 1):
        h.append(
            epoch=e,
            train_loss=1.0 / e,
            train_accuracy=0.5 + 0.1 * e,
            val_loss=1.2 / e if validation else None,
            val_accuracy=0.45 + 0.1 * e if validation else None,
            seconds=1.0,
            val_seconds=0.1,
            images_per_second=1000.0,
            lr=0.1,
        )
    return h


def check_png(path, min_width=200, min_height=150):
    """A PNG of a reasonable size whose pixels are not all alike; returns (height, width)."""
    image_module = pytest.importorskip("matplotlib.image")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000
    pixels = image_module.imread(str(path))
    assert pixels.shape[0] >= min_height and pixels.shape[1] >= min_width
    assert float(pixels[..., :3].var()) > 0  # not blank
    return pixels.shape[:2]


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def test_history_plot_writes_the_curves(mpl, tmp_path):
    path = tmp_path / "curves.png"
    fig = history().plot(path)
    check_png(path, 600, 300)
    assert [ax.get_title() for ax in fig.axes] == ["loss per epoch", "accuracy per epoch"]
    lines = fig.axes[1].get_lines()
    assert [line.get_label() for line in lines] == ["training", "validation"]
    assert list(lines[0].get_ydata()) == pytest.approx([60, 70, 80])  # percent
    # without validation there is no validation line; without a path nothing is written
    fig = history(validation=False).plot()
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["training"]
    assert "matplotlib.pyplot" not in sys.modules or mpl.get_backend()  # no window either way
    with pytest.raises(ValueError, match="no epoch"):
        History().plot()


def test_confusion_picture(mpl, tmp_path):
    m = np.array([[50, 2, 0], [3, 40, 7], [0, 1, 60]])
    path = tmp_path / "confusion.png"
    fig = plots.confusion(m, path, class_names=["a", "b", "c"])
    check_png(path)
    ax = fig.axes[0]
    assert "accuracy 92.02%" in ax.get_title()  # 150 of 163
    assert [t.get_text() for t in ax.texts][:3] == ["50", "2", "0"]
    plots.confusion(m, tmp_path / "normalized.png", normalize=True)
    check_png(tmp_path / "normalized.png")
    with pytest.raises(ValueError, match="square"):
        plots.confusion(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class names"):
        plots.confusion(m, class_names=["a"])


def test_filters_picture(mpl, tmp_path):
    model = fastcnn.models.reference(seed=0)
    path = tmp_path / "filters.png"
    fig = plots.filters(model, path)
    check_png(path)
    assert fig._suptitle.get_text() == "first convolution: 32 filters 3x3 (1 channel)"
    assert len([ax for ax in fig.axes if ax.images]) == 32
    fig = plots.filters(fastcnn.Sequential(fastcnn.Conv2D(3, 4, 5, rng=0)), tmp_path / "rgb.png")
    check_png(tmp_path / "rgb.png", 100, 50)
    assert fig.axes[0].images[0].get_array().shape == (5, 5, 3)
    with pytest.raises(ValueError, match="no Conv2D"):
        plots.filters(fastcnn.Sequential(fastcnn.Dense(3, 2)))


def test_a_failed_write_leaves_the_old_picture(mpl, tmp_path, monkeypatch):
    path = tmp_path / "curves.png"
    history().plot(path)
    before = path.read_bytes()
    from matplotlib.figure import Figure

    def broken(self, *args, **kwargs):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer failed"):
        history(5).plot(path)
    assert path.read_bytes() == before
    with pytest.raises(FileNotFoundError, match="cannot write picture"):
        plots.save_png(None, tmp_path / "missing" / "x.png")


def test_without_matplotlib_the_error_says_how_to_install(monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"fastcnn\[plot\]"):
        history().plot()
