"""Single-cell CNN classifier, its metadata, and pickle-free persistence.

The model looks at one single-cell crop of shape ``(C, S, S)`` (``C`` = 1 for the
brightfield image alone or 2 for image + segmentation mask) and returns one logit for
the positive class (higher metastatic potential). The probability reported downstream
is ``sigmoid(logit / temperature)`` with the temperature stored in the metadata.

Weights are stored as safetensors (no pickle, so loading a file never executes code);
the metadata travels as JSON inside the safetensors header and in a sidecar ``.json``
for people and tools that do not parse safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from metascreen.files import atomic_path
from metascreen.versions import package_versions

__all__ = [
    "CellCNN",
    "ModelMetadata",
    "autocast_dtype",
    "file_sha256",
    "load_model",
    "runtime_versions",
    "save_model",
    "select_device",
]

#: Key of the metadata JSON inside the safetensors header.
METADATA_KEY = "metascreen"
#: Architecture name recorded in (and required from) the metadata.
ARCHITECTURE = "CellCNN"
#: Smallest crop side the default network is meant for.
MIN_CROP_SIZE = 16


class _ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CellCNN(nn.Module):
    """Compact residual CNN that maps single-cell crops to one positive-class logit.

    Layout: 3x3 stem conv (``width`` channels, BN, ReLU), then ``depth`` stages of one
    residual block each; every stage after the first doubles the channels and halves
    the resolution (stride 2). Global average pooling and one linear layer give the
    logit, so any crop side ``S >= 16`` works (the pooling removes the spatial size).

    Parameters
    ----------
    in_channels : int
        Channels per crop, ``C`` (1 = image, 2 = image + mask).
    width : int, default 16
        Channels of the stem and first stage; stage ``i`` has ``width * 2**i``.
    depth : int, default 4
        Number of stages. Each 3x3 layer widens what one output sees by twice the
        spacing of its input's pixels (1 px in the stem, up to 8 px in stage 4): four
        stages see 49 px, most of a 64 px crop and so a whole elongated cell, where three
        see 25 px, too little to judge a cell's outline.
    """

    def __init__(self, in_channels: int, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("width", width), ("depth", depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CellCNN {name} must be a positive integer, got {value!r}.")
        self.in_channels = in_channels
        self.width = width
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages = []
        channels = width
        for stage in range(depth):
            out_channels = width * 2**stage
            stages.append(_ResidualBlock(channels, out_channels, stride=1 if stage == 0 else 2))
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Positive-class logits.

        Parameters
        ----------
        x : torch.Tensor
            Crops, shape ``(N, C, S, S)``, float.

        Returns
        -------
        torch.Tensor
            Logits, shape ``(N,)``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CellCNN expects crops of shape (N, {self.in_channels}, S, S), got "
                f"{tuple(x.shape)}; pass one crop per row with the channels the model "
                "was built for."
            )
        features = self.stages(self.stem(x))
        return self.head(features.mean(dim=(2, 3))).squeeze(1)


def runtime_versions() -> dict[str, str]:
    """Versions of Python and the packages that define a trained model's behaviour."""
    return package_versions(("torch", "numpy", "safetensors", "metascreen"))


@dataclass
class ModelMetadata:
    """Everything needed to rebuild, apply and audit a trained :class:`CellCNN`.

    Attributes
    ----------
    classes : dict[str, str]
        ``{"negative": <class name>, "positive": <class name>}``; the logit is for
        ``positive``.
    crop_size : int
        Crop side ``S`` in pixels the model was trained on.
    channels : list[str]
        Channel names in order, e.g. ``["image", "mask"]``; ``len(channels)`` = ``C``.
    normalisation : str
        How crops were normalised before training (inference must do the same).
    width, depth : int
        :class:`CellCNN` architecture parameters.
    temperature : float
        Temperature ``T > 0``; calibrated probability = ``sigmoid(logit / T)``.
    training_wells : list[str]
        ``"plate/well"`` keys of the wells whose cells were used for fitting.
    training_data_sha256 : str
        Hash of the training arrays (see ``training.dataset_sha256``).
    metrics : dict
        Evaluation metrics (validation/test/baseline), JSON-serialisable.
    package_versions : dict[str, str]
        Versions at training time; defaults to :func:`runtime_versions`.
    seed : int or None
        Seed used for splitting, initialisation and shuffling.
    architecture : str
        Always ``"CellCNN"``; lets loaders refuse files of another architecture.
    """

    classes: dict[str, str]
    crop_size: int
    channels: list[str]
    normalisation: str
    width: int
    depth: int
    temperature: float = 1.0
    training_wells: list[str] = field(default_factory=list)
    training_data_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    package_versions: dict[str, str] = field(default_factory=runtime_versions)
    seed: int | None = None
    architecture: str = ARCHITECTURE

    def __post_init__(self) -> None:
        if set(self.classes) != {"negative", "positive"}:
            raise ValueError(
                "ModelMetadata.classes must have exactly the keys 'negative' and "
                f"'positive' (class names as values), got keys {sorted(self.classes)}."
            )
        # Coerce numpy scalars to plain Python so the metadata stays JSON-serialisable.
        for name, minimum in (("crop_size", MIN_CROP_SIZE), ("width", 1), ("depth", 1)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"ModelMetadata.{name} must be an integer >= {minimum}, got {value!r}.")
            setattr(self, name, int(value))
        if self.seed is not None:
            self.seed = int(self.seed)
        if not self.channels or not all(isinstance(c, str) for c in self.channels):
            raise ValueError(
                "ModelMetadata.channels must be a non-empty list of channel names, "
                f"e.g. ['image', 'mask'], got {self.channels!r}."
            )
        self.channels = list(self.channels)
        temperature = float(self.temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(
                f"ModelMetadata.temperature must be a finite number > 0, got {self.temperature!r}."
            )
        self.temperature = temperature
        if self.architecture != ARCHITECTURE:
            raise ValueError(
                f"Model architecture {self.architecture!r} is not supported; this version "
                f"of metascreen reads {ARCHITECTURE!r} models only."
            )

    @property
    def in_channels(self) -> int:
        """Number of crop channels ``C``."""
        return len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats (e.g. a NaN AUC) become ``None``."""
        return _json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"Unknown model metadata fields {unknown}; the model was written by a "
                "newer metascreen version, upgrade to read it."
            )
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"Incomplete model metadata: {error}.") from error


def _json_safe(value: Any) -> Any:
    """Recursively make ``value`` strict JSON: numpy -> Python, NaN/inf -> None."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks.

    Parameters
    ----------
    path : str or Path
        File to hash.

    Returns
    -------
    str
        64-character hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(path: str | Path, model: CellCNN, metadata: ModelMetadata) -> str:
    """Save weights (safetensors) with the metadata in the header and a sidecar JSON.

    The sidecar ``path.with_suffix(".json")`` holds the same metadata plus
    ``weights_file`` and ``weights_sha256``. It is replaced first and the weights file
    last, so a complete weights file always has its matching sidecar.

    Parameters
    ----------
    path : str or Path
        Destination, e.g. ``results/model/model.safetensors``; parents are created.
    model : CellCNN
        Model to save (any device; tensors are copied to CPU).
    metadata : ModelMetadata
        Must agree with the model's architecture.

    Returns
    -------
    str
        SHA-256 hex digest of the written weights file.
    """
    path = Path(path)
    if (model.in_channels, model.width, model.depth) != (
        metadata.in_channels,
        metadata.width,
        metadata.depth,
    ):
        raise ValueError(
            f"Metadata (channels={metadata.in_channels}, width={metadata.width}, "
            f"depth={metadata.depth}) does not describe the model (channels="
            f"{model.in_channels}, width={model.width}, depth={model.depth}); build the "
            "metadata from the same settings as the model."
        )
    meta_dict = metadata.to_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(meta_dict)})
    sha256 = hashlib.sha256(weights).hexdigest()
    sidecar = {**meta_dict, "weights_file": path.name, "weights_sha256": sha256}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path.with_suffix(".json")) as partial:
        partial.write_text(json.dumps(sidecar, indent=2, allow_nan=False) + "\n")
    with atomic_path(path) as partial:
        partial.write_bytes(weights)
    return sha256


def autocast_dtype(device: torch.device, *, cpu: bool = False) -> torch.dtype | None:
    """The mixed-precision dtype a network runs in on ``device``, or None for float32.

    CUDA: bfloat16 where supported, else float16. CPU, only where ``cpu`` is set: bfloat16
    on processors with native bfloat16 arithmetic (AMX matrix units or AVX512-BF16) whose
    oneDNN is not capped below them (:func:`_cpu_has_native_bfloat16`), where it runs the
    segmentation U-Net 1.6-2.1 times as fast in bfloat16 as in float32 (training and
    inference, measured on each kind); elsewhere bfloat16 is emulated and slower, so float32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cpu and device.type == "cpu" and _cpu_has_native_bfloat16():
        return torch.bfloat16
    return None


#: oneDNN instruction-set caps (``ONEDNN_MAX_CPU_ISA``) that turn its AVX512-BF16 and AMX
#: kernels off, whatever the processor has: under AVX2 bfloat16 takes a path 10 times
#: slower than float32 (the segmentation U-Net on an AMD Zen 4 core: 0.095 Mpx/s against
#: 0.93). AVX2_VNNI_2 has bfloat16 kernels of its own, not measured: float32 there too.
_ONEDNN_CAPS_WITHOUT_BFLOAT16 = frozenset(
    ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
)


def _cpu_has_native_bfloat16() -> bool:
    """Whether convolutions here compute in bfloat16 natively: the processor has AMX tiles
    (Intel Sapphire Rapids and later) or AVX512-BF16 (AMD Zen 4 and later, Intel Cooper
    Lake), by torch's own CPU probes, and oneDNN may use them (``ONEDNN_MAX_CPU_ISA``, or
    its older name ``DNNL_MAX_CPU_ISA``, does not cap it below them)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", ""))
    if cap.strip().upper() in _ONEDNN_CAPS_WITHOUT_BFLOAT16:
        return False
    names = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(probe and probe()) for probe in (getattr(torch.cpu, name, None) for name in names))


def select_device(preference: str | torch.device = "auto") -> torch.device:
    """Pick the torch device.

    Parameters
    ----------
    preference : str or torch.device, default "auto"
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:<index>"``.

    Returns
    -------
    torch.device
    """
    text = str(preference).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"Device {preference!r} was requested but CUDA is not available (CPU-only "
                "torch build or no GPU visible); use device 'auto' or 'cpu'."
            )
        return torch.device(text)
    raise ValueError(f"Unknown device {preference!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")


def read_metadata(path: str | Path) -> ModelMetadata:
    """A model file's metadata from its safetensors header, without reading the weights.

    Raises
    ------
    FileNotFoundError, ValueError
        If the file is missing, not safetensors, or not written by :func:`save_model`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Model file {path} does not exist; train a model first.")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}); metascreen only loads "
            "models saved by metascreen.model.save_model (pickled checkpoints are refused)."
        ) from error
    if METADATA_KEY not in header:
        raise ValueError(
            f"{path} has no '{METADATA_KEY}' metadata in its safetensors header; it was not "
            "written by metascreen.model.save_model."
        )
    return ModelMetadata.from_dict(json.loads(header[METADATA_KEY]))


def load_model(
    path: str | Path,
    *,
    expected_crop_size: int | None = None,
    expected_channels: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CellCNN, ModelMetadata]:
    """Load a model written by :func:`save_model`, without unpickling anything.

    Parameters
    ----------
    path : str or Path
        Safetensors weights file.
    expected_crop_size : int, optional
        Crop side ``S`` of the data to classify; must equal the model's.
    expected_channels : int, optional
        Channel count ``C`` of the data to classify; must equal the model's.
    device : str or torch.device, default "cpu"
        Passed to :func:`select_device` (``"auto"`` allowed).

    Returns
    -------
    model : CellCNN
        In eval mode, on ``device``.
    metadata : ModelMetadata
    """
    path = Path(path)
    metadata = read_metadata(path)
    if expected_crop_size is not None and expected_crop_size != metadata.crop_size:
        raise ValueError(
            f"Crop size mismatch: the data has {expected_crop_size}x{expected_crop_size} "
            f"crops but the model {path} was trained on {metadata.crop_size}x"
            f"{metadata.crop_size}; extract crops with crop_size={metadata.crop_size} or "
            "use a model trained at this crop size."
        )
    if expected_channels is not None and expected_channels != metadata.in_channels:
        raise ValueError(
            f"Channel mismatch: the data has {expected_channels} channel(s) but the model "
            f"{path} expects {metadata.in_channels} {metadata.channels}; extract crops with "
            "these channels or use a model trained on the data's channels."
        )
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    model = CellCNN(metadata.in_channels, width=metadata.width, depth=metadata.depth)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"Weights in {path} do not fit the architecture its metadata describes: {error}"
        ) from error
    return model.to(select_device(device)).eval(), metadata
