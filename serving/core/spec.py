"""The model spec: the one contract between training, export and serving.

Training writes it into the checkpoint and beside it as JSON; export derives
tensor names, ``config.pbtxt``, labels and a copy of the spec from it; the
client reads it back from the server and refuses to score when it disagrees.
No mean, std, patch size, tensor name, class name or model name is written as
a literal anywhere else.

The spec format, and how it grows (README, "Compatibility"):

- ``format_version`` is the format's major version. It changes only when a
  field changes meaning or goes; a reader refuses a spec of a newer format
  ("upgrade patchserve") and reads every older one.
- A field is added with a default that means what specs without it meant, so
  a newer patchserve reads an older spec as it was written.
- An older patchserve reads a newer spec: fields it does not know are kept
  (``unknown``: written back unchanged, so both hash the spec alike) and
  ignored, unless the spec lists them in ``requires``: fields that change
  what a client must do to prepare the model's inputs. Those it refuses, in
  one line, naming them. A writer lists a field there by naming it in
  :data:`MUST_UNDERSTAND`; it is added to ``requires`` whenever the field is
  not at its default.
- A field added later may be written only when set (:data:`WRITTEN_WHEN_SET`),
  so specs without it keep their bytes and their hash.
- Nested values (a dict field) are compared by the gate path by path
  (``extra.grayscale_equalize``), so a change deep inside a field is named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.core.errors import SpecError

SPEC_FORMAT_VERSION = 1
# Fields a reader must understand to prepare a model's inputs right: listed in a spec's ``requires`` when they
# are not at their default, so an older patchserve refuses the model instead of feeding it the wrong pixels.
MUST_UNDERSTAND: tuple[str, ...] = ("trained_mpp",)
# Fields written only when they are not at their default, so a spec without them serialises (and hashes, for
# the job fingerprint) exactly as before they existed: a model exported before features keeps its spec.json,
# configs and fingerprints byte for byte.
WRITTEN_WHEN_SET: tuple[str, ...] = ("feature_layer", "feature_size", "features_name")
# Keys of the `parameters` map of every exported Triton config: the spec as
# JSON, and the sha256 of the run's weights the model serves (a client reads
# both from a live server).
SPEC_PARAMETER = "patchserve_spec"
WEIGHTS_PARAMETER = "weights_sha256"
# The views a server-side TTA model averages ("five" or "ten"), in its config.
TTA_VIEWS_PARAMETER = "tta_views"
# Triton uses the model name as a folder name and in URLs: keep it to a
# conservative character set, no path separators and no "..".
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
TTA_MODES = ("none", "flip", "five", "ten")
# What evaluation and serving do to a decoded image before its views are cut
# (serving/core/preprocess.py is the reference; the DALI pipelines follow it):
#   "resize_crop": an image of exactly the input size is used as it is; any
#   other size (smaller or larger) is resized (bilinear, antialiased) to the
#   source size, whose centre crop is the "none" view. Views are then cut from
#   that image: from an input-size image every crop is the whole image.
#   "crop": for models trained with --random-crop on images larger than the
#   model (150 px cropped to 128, 450 to 384): an image of the input size is
#   used as it is; any other size gives the source-size window at its centre,
#   without resampling, padded white where the image is smaller.
# New rules are added here and in serving/core/preprocess.py.
EVAL_GEOMETRIES = ("resize_crop", "crop")
# Flavours of an exported model: config.pbtxt is the python one (ONNX Runtime in
# Triton's Python backend, runs anywhere); a GPU server loads configs/NAME.pbtxt
# with --model-config-name. GPU_FLAVOURS: the GPU ones, fastest first.
FLAVOURS = ("python", "onnxruntime", "tensorrt")
GPU_FLAVOURS = ("tensorrt", "onnxruntime")
ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
)
# The features a model can output beside its probabilities (``feature_layer``): the global average pool of
# the output of a torchvision ResNet's last block ("layer4", what the classification head reads), or of its
# third block ("layer3", CLAM's truncated ResNet50). Their sizes per architecture: a client knows them from
# the spec without torch.
FEATURE_LAYERS = ("layer4", "layer3")
_WIDE = {"layer3": 1024, "layer4": 2048}
FEATURE_SIZES = {"resnet18": {"layer3": 256, "layer4": 512}, "resnet34": {"layer3": 256, "layer4": 512},
                 "resnet50": _WIDE, "resnet101": _WIDE, "resnet152": _WIDE, "wide_resnet50_2": _WIDE,
                 "resnext50_32x4d": _WIDE}
HEADS = ("linear", "mlp")  # the classification head after the pooled features
POOL_SIZES = (1, 2, 4, 8)  # adaptive average pooling output side before the head
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


STAIN_METHODS = ("macenko", "reinhard")


def _numbers(value: Any, shape: tuple[int, ...], what: str) -> list:
    try:
        arr = [[float(v) for v in row] for row in value] if len(shape) == 2 else [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise SpecError(f"stain_normalization.{what}: expected numbers of shape {shape}, got {value!r}") from exc
    flat = [v for row in arr for v in row] if len(shape) == 2 else arr
    rows_ok = len(arr) == shape[0] and (len(shape) == 1 or all(len(row) == shape[1] for row in arr))
    if not rows_ok or not all(math.isfinite(v) for v in flat):
        raise SpecError(f"stain_normalization.{what}: expected finite numbers of shape {shape}, got {value!r}")
    return arr


def check_stain_normalization(value: Any) -> dict:
    """A valid stain normalisation: ``{"method": "macenko", "stain_matrix": 2 x 3 (H and E's OD per R, G, B),
    "max_concentrations": 2}`` or ``{"method": "reinhard", "lab_mean": 3, "lab_std": 3}`` (plus free notes)."""
    if not isinstance(value, dict) or value.get("method") not in STAIN_METHODS:
        raise SpecError(f"stain_normalization: expected a mapping with method one of {', '.join(STAIN_METHODS)}, "
                        f"got {value!r}")
    out = dict(value)
    if value["method"] == "macenko":
        out["stain_matrix"] = _numbers(value.get("stain_matrix"), (2, 3), "stain_matrix")
        out["max_concentrations"] = _numbers(value.get("max_concentrations"), (2,), "max_concentrations")
        if min(out["max_concentrations"]) <= 0:
            raise SpecError("stain_normalization.max_concentrations: expected positive concentrations")
    else:
        out["lab_mean"] = _numbers(value.get("lab_mean"), (3,), "lab_mean")
        out["lab_std"] = _numbers(value.get("lab_std"), (3,), "lab_std")
        if min(out["lab_std"]) <= 0:
            raise SpecError("stain_normalization.lab_std: expected positive standard deviations")
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def check_model_name(name: str, flag: str = "name") -> str:
    """Return ``name`` if it is a safe Triton model name, else raise SpecError."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise SpecError(
            f"{flag}: {name!r} is not a safe Triton model name; expected 1-64 characters "
            "of letters, digits, '_', '.', '-', starting with a letter or digit, no '..'"
        )
    return name


def _three_in_unit_interval(values: Any, field_name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{field_name}: expected three numbers, got {values!r}") from exc
    if len(values) != 3:
        raise SpecError(f"{field_name}: expected three values (R, G, B), got {len(values)}")
    for v in values:
        if not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise SpecError(f"{field_name}: every value must be in (0, 1], got {values!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelSpec:
    """Everything downstream needs to know about a trained classifier."""

    name: str
    class_names: tuple[str, ...]
    input_height: int
    input_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arch: str = "resnet18"
    version: int = 1
    # Images not already at the input size are resized to source_* before the
    # centre crop (evaluation) or the TTA crops (see eval_geometry); 0 means
    # "input size / 0.875", torchvision's 224-of-256 ratio.
    source_height: int = 0
    source_width: int = 0
    input_dtype: str = "uint8"
    input_layout: str = "NHWC"
    input_name: str = "images_nhwc_u8"
    output_name: str = "probabilities"
    logits_name: str = "logits"
    encoded_name: str = "images_encoded"  # ensemble input: encoded JPEG/PNG bytes
    features_name: str = "features"  # the features output (float32 [feature_size]), when feature_layer is set
    max_batch_size: int = 64
    eval_geometry: str = "resize_crop"  # one of EVAL_GEOMETRIES: what happens to an image of any size
    tta_views: tuple[str, ...] = TTA_MODES
    # Microns per pixel of the patches the model was trained on (None: not known). Slides are read at it.
    trained_mpp: float | None = None
    # Stain normalisation computed inside the model, before mean/std (training/stain_norm.py): the method and
    # its target's parameters; None: none. The graph and the configs hold copies that the gate checks.
    stain_normalization: dict | None = None
    # The features output beside the probabilities (one of FEATURE_LAYERS), and its size (FEATURE_SIZES of the
    # arch; 0 with a layer: that size); None and 0: the model outputs none. A features-only model (no head) has no
    # class_names.
    feature_layer: str | None = None
    feature_size: int = 0
    format_version: int = SPEC_FORMAT_VERSION
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    # Fields a reader must understand (MUST_UNDERSTAND ones not at their default, and those of a newer spec).
    requires: tuple[str, ...] = ()
    # Fields of a newer spec format this patchserve does not know: kept and written back, never used.
    unknown: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        check_model_name(self.name, "name")
        names = tuple(self.class_names) if not isinstance(self.class_names, str) else None
        if names == () and self.feature_layer is not None:
            names = ()  # a features-only model: features, no head, no classes
        elif not names:
            raise SpecError("class_names: expected at least two class names, got none (a features-only model "
                            "names its feature_layer)")
        for c in names:
            if not isinstance(c, str) or not c.strip():
                raise SpecError(f"class_names: empty class name in {list(names)!r}")
            if any(ch in c for ch in "/\\,\n"):
                raise SpecError(f"class_names: {c!r} contains '/', '\\\\', ',' or a newline")
        dupes = sorted({c for c in names if names.count(c) > 1})
        if dupes:
            raise SpecError(f"class_names: duplicate names {dupes}")
        if len(names) == 1:
            raise SpecError(f"class_names: a classifier needs at least two classes, got {list(names)!r}")
        set_("class_names", names)
        for f in ("input_height", "input_width", "max_batch_size", "version"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpecError(f"{f}: expected a positive integer, got {v!r}")
        for f, base in (("source_height", self.input_height), ("source_width", self.input_width)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SpecError(f"{f}: expected a non-negative integer, got {v!r}")
            if v == 0:
                set_(f, int(round(base / 0.875)))
            elif v < base:
                raise SpecError(f"{f}: {v} is smaller than the input size {base}")
        set_("mean", _three_in_unit_interval(self.mean, "mean"))
        set_("std", _three_in_unit_interval(self.std, "std"))
        if self.arch not in ARCHITECTURES:
            raise SpecError(f"arch: invalid architecture {self.arch!r}. Only {', '.join(ARCHITECTURES)} are supported.")
        if self.input_dtype != "uint8":
            raise SpecError(f"input_dtype: only 'uint8' is supported, got {self.input_dtype!r}")
        if self.input_layout != "NHWC":
            raise SpecError(f"input_layout: only 'NHWC' is supported, got {self.input_layout!r}")
        tensor_fields = ("input_name", "output_name", "logits_name", "encoded_name", "features_name")
        tensor_names = tuple(getattr(self, f) for f in tensor_fields)
        for f, v in zip(tensor_fields, tensor_names):
            if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
                raise SpecError(f"{f}: {v!r} is not a valid tensor name (letters, digits, '_')")
        if len(set(tensor_names)) != len(tensor_names):
            raise SpecError(f"{'/'.join(tensor_fields)} must all differ, got {tensor_names}")
        if self.eval_geometry not in EVAL_GEOMETRIES:
            raise SpecError(f"eval_geometry: invalid rule {self.eval_geometry!r}. Only {', '.join(EVAL_GEOMETRIES)} "
                            "are supported.")
        if self.trained_mpp is not None:
            try:
                mpp = float(self.trained_mpp)
            except (TypeError, ValueError) as exc:
                raise SpecError(f"trained_mpp: expected microns per pixel, got {self.trained_mpp!r}") from exc
            if isinstance(self.trained_mpp, bool) or not (math.isfinite(mpp) and 0.01 <= mpp <= 100.0):
                raise SpecError(f"trained_mpp: expected microns per pixel between 0.01 and 100, got "
                                f"{self.trained_mpp!r}")
            set_("trained_mpp", mpp)
        if self.stain_normalization is not None:
            set_("stain_normalization", check_stain_normalization(self.stain_normalization))
        self._check_features()
        views = tuple(self.tta_views)
        bad = [v for v in views if v not in TTA_MODES]
        if bad or "none" not in views:
            raise SpecError(f"tta_views: expected a subset of {TTA_MODES} including 'none', got {views!r}")
        set_("tta_views", views)
        fmt = self.format_version
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
            raise SpecError(f"format_version: expected a positive integer, got {fmt!r}")
        if fmt > SPEC_FORMAT_VERSION:
            raise SpecError(f"format_version: the spec is of format {fmt}, written by a newer patchserve; this one "
                            f"reads formats up to {SPEC_FORMAT_VERSION}: upgrade patchserve")
        reqs = tuple(self.requires) if not isinstance(self.requires, str) else None
        if reqs is None or not all(isinstance(r, str) and r.isidentifier() for r in reqs):
            raise SpecError(f"requires: expected a list of spec field names, got {self.requires!r}")
        if not isinstance(self.unknown, dict):
            raise SpecError(f"unknown: expected a mapping of field names to values, got {self.unknown!r}")
        defaults = {f.name: f for f in dataclasses.fields(self)}
        derived = {n for n in MUST_UNDERSTAND if getattr(self, n) != _default(defaults[n])}
        if self.features_only:
            # No probabilities: a patchserve that ignores feature_layer would find no class to score. A
            # classifier's features need no such entry: its inputs and probabilities are what they were.
            derived.add("feature_layer")
        set_("requires", tuple(sorted(set(reqs) | derived)))

    def _check_features(self) -> None:
        layer, size = self.feature_layer, self.feature_size
        if layer is None:
            if size != 0:
                raise SpecError(f"feature_size: {size!r} without a feature_layer; a model without features has 0")
            return
        if layer not in FEATURE_LAYERS:
            raise SpecError(f"feature_layer: invalid layer {layer!r}. Only {', '.join(FEATURE_LAYERS)} are "
                            "supported.")
        want = FEATURE_SIZES[self.arch][layer]
        if size == 0 and not isinstance(size, bool):
            object.__setattr__(self, "feature_size", want)  # stated by the arch: a writer may leave it out
        elif isinstance(size, bool) or size != want:
            raise SpecError(f"feature_size: {self.arch}'s {layer} features have {want} values, the spec says "
                            f"{size!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_features(self) -> bool:
        """The model outputs features (``features_name``) beside its probabilities, or alone."""
        return self.feature_layer is not None

    @property
    def features_only(self) -> bool:
        """A features-only model: no head, no classes, no probabilities or logits."""
        return not self.class_names

    def with_features(self, layer: str | None) -> "ModelSpec":
        """This spec with the features output of ``layer`` (its size from the arch), or without features."""
        if layer is None:
            return self.replace(feature_layer=None, feature_size=0)
        if layer not in FEATURE_LAYERS:
            raise SpecError(f"feature_layer: invalid layer {layer!r}. Only {', '.join(FEATURE_LAYERS)} are "
                            "supported.")
        return self.replace(feature_layer=layer, feature_size=FEATURE_SIZES[self.arch][layer])

    @property
    def grayscale_equalize(self) -> bool:
        """Trained on grey-scale, histogram-equalised images (``--grayscale-equalize``)."""
        return bool(self.extra.get("grayscale_equalize"))

    # The models export writes beside the classifier, and the client asks for.
    @property
    def tta_model_name(self) -> str:
        return f"{self.name}_tta"

    @property
    def preprocess_model_name(self) -> str:
        return f"{self.name}_preprocess"

    @property
    def ensemble_model_name(self) -> str:
        return f"{self.name}_ensemble"

    @property
    def input_hw(self) -> tuple[int, int]:
        return (self.input_height, self.input_width)

    @property
    def source_hw(self) -> tuple[int, int]:
        return (self.source_height, self.source_width)

    def replace(self, **changes: Any) -> "ModelSpec":
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field (tuples as lists), and the fields of a newer format this patchserve kept unread."""
        d = dataclasses.asdict(self)
        unknown = d.pop("unknown")
        defaults = {f.name: f for f in dataclasses.fields(self)}
        for k in WRITTEN_WHEN_SET:
            if d[k] == _default(defaults[k]):
                del d[k]
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return {**unknown, **d}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        """A spec of this format or an older one; fields of a newer one are kept unread, unless required."""
        if not isinstance(data, dict):
            raise SpecError(f"spec: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"unknown"}
        unknown = {k: v for k, v in data.items() if k not in known}
        fmt = data.get("format_version", SPEC_FORMAT_VERSION)
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > SPEC_FORMAT_VERSION:
            raise SpecError(f"format_version: the spec is of format {fmt}, written by a newer patchserve; this one "
                            f"reads formats up to {SPEC_FORMAT_VERSION}: upgrade patchserve")
        required = data.get("requires", [])
        needed = sorted(set(required) & set(unknown)) if isinstance(required, (list, tuple)) else []
        if needed:
            raise SpecError(f"spec: the model needs a patchserve that understands the spec fields {needed} (they "
                            "change how its inputs must be prepared); upgrade patchserve")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in data]
        if missing:
            raise SpecError(f"spec: missing required fields {missing}")
        kwargs = {k: v for k, v in data.items() if k in known}
        for k in ("class_names", "mean", "std", "tta_views", "requires"):
            if k in kwargs and isinstance(kwargs[k], list):
                kwargs[k] = tuple(kwargs[k])
        return cls(**kwargs, unknown=unknown)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON through an atomic rename."""
        from serving.core.atomic import atomic_write_text

        return atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelSpec":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SpecError(f"{path}: cannot read spec ({exc.strerror})") from exc
        try:
            return cls.from_json(text)
        except SpecError as exc:
            raise SpecError(f"{path}: {exc}") from exc
