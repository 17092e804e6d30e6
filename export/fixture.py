"""The parity fixture: real validation images, as the model takes them and as encoded files, with logits.

Export picks at least :data:`FIXTURE_IMAGES` images of the run's validation
data, stratified by class and including the lowest-margin ones (where a
changed head flips the class first), and stores, per model, what that model
takes and what PyTorch answered:

- classifier ``fixture.npz``: ``pixels`` (N, H, W, 3 uint8) and ``logits``;
- ``_tta``: ``sources`` (N, source H, source W, 3 uint8) and ``log_probabilities``
  (the TTA graph averages probabilities: their logarithm does not saturate);
- ``_preprocess``: the ``encoded`` file bytes and ``pixels``, their reference decoding;
- ``_ensemble``: the ``encoded`` bytes, ``dali_pixels`` (what the exported DALI
  pipeline made of them) and the PyTorch ``logits`` on those pixels.

A model with a features output (the spec's ``feature_layer``) also keeps
PyTorch's ``features`` of the same images in each fixture (for ``_tta`` the
mean over its views); a features-only model has features and no logits.

Logits are compared within a tolerance stated per precision; a top-1 flip on
an image whose margin exceeds that tolerance fails on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.errors import ExportInputError, FixtureError
from serving.core.spec import ModelSpec

FIXTURE_FILE = "fixture.npz"
FIXTURE_IMAGES = 32
# Images read from the data to pick the fixture from (the lowest margins among them).
CANDIDATES = 256
# An image whose top-2 logits are closer than this has no well-defined class:
# rounding alone could flip it, so the fixture does not pick it.
MIN_MARGIN = 1e-3
LOG_FLOOR = math.log(1e-30)
# The served _preprocess model against the reference decoding of the fixture's files (grey levels per pixel).
PREPROCESS_MAX_GREY_DIFF = 1
# Grey-scale equalised models: DALI's RGB-to-grey rounds a few pixels in 10,000 one level apart
# from the reference, and equalisation turns such a level into a step of the histogram's mapping.
# So for them: at most this fraction of pixels may differ by more than PREPROCESS_MAX_GREY_DIFF.
# A different pipeline (another resize, equalising after the resize) moves most pixels.
EQUALISED_MAX_OFF_FRACTION = 0.01


def preprocess_agreement(got: np.ndarray, want: np.ndarray, equalised: bool) -> tuple[bool, float, str]:
    """(passes, the measured value, what was measured) for decoded pixels against the reference decoding."""
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    worst = int(diff.max()) if diff.size else 0
    if not equalised:
        ok = worst <= PREPROCESS_MAX_GREY_DIFF
        return ok, worst, (f"max |pixel - reference decoding| {worst} grey level(s) "
                           f"{'<=' if ok else '>'} {PREPROCESS_MAX_GREY_DIFF}")
    off = float((diff > PREPROCESS_MAX_GREY_DIFF).mean()) if diff.size else 0.0
    ok = off <= EQUALISED_MAX_OFF_FRACTION
    return ok, off, (f"equalised model, max {worst}: share of pixels more than {PREPROCESS_MAX_GREY_DIFF} grey "
                     f"level(s) from the reference decoding {off:.4%} {'<=' if ok else '>'} "
                     f"{EQUALISED_MAX_OFF_FRACTION:.0%}")
# What each model's fixture holds (see the module docstring); fixture_keys() adapts it to a spec.
FIXTURE_KEYS = {"classifier": ("pixels", "logits"), "tta": ("sources", "log_probabilities"),
                "preprocess": ("encoded", "encoded_offsets", "pixels"),
                "ensemble": ("encoded", "encoded_offsets", "dali_pixels", "logits")}


def fixture_keys(role: str, spec: ModelSpec) -> tuple[str, ...]:
    """The arrays the fixture of ``role`` must hold for ``spec``: ``features`` with a feature_layer; no logits
    (or log-probabilities) for a features-only model."""
    keys = FIXTURE_KEYS[role]
    if role == "preprocess":
        return keys
    if spec.features_only:
        keys = tuple(k for k in keys if k not in ("logits", "log_probabilities"))
    return keys + (("features",) if spec.has_features else ())


@dataclass(frozen=True)
class LogitTolerance:
    """|got - want| <= atol + rtol * |want|, elementwise, on logits (or log-probabilities)."""

    atol: float
    rtol: float

    def limit(self, want: np.ndarray) -> np.ndarray:
        return self.atol + self.rtol * np.abs(want)


# fp32: ONNX Runtime and PyTorch on the CPU agree to ~1e-5 on ResNet logits; a
# changed bias or weight moves them by far more. fp16 (TensorRT plans) rounds
# activations to 11 bits. int8 (export --precision int8: QDQ graphs, uint8
# activations) is held to the fp32 PyTorch answers of the fixture: logits
# within about one unit; its uint8 probabilities cannot resolve the logarithm
# of a tiny probability (it rounds to 0), so an int8 TTA graph is compared on
# probabilities (``int8-probabilities``, export.quantize's stated |p - p_fp32|).
# A new precision adds its row here.
LOGIT_TOLERANCE: dict[str, LogitTolerance] = {
    "fp32": LogitTolerance(atol=1e-3, rtol=1e-3),
    "fp16": LogitTolerance(atol=5e-2, rtol=1e-2),
    "int8": LogitTolerance(atol=1.0, rtol=0.1),
    "int8-probabilities": LogitTolerance(atol=0.15, rtol=0.0),
}
INT8_PROBABILITIES = "int8-probabilities"


def tolerance(precision: str) -> LogitTolerance:
    try:
        return LOGIT_TOLERANCE[precision]
    except KeyError:
        raise FixtureError(f"precision {precision!r}: no logit tolerance stated; known: "
                           f"{', '.join(LOGIT_TOLERANCE)}") from None


@dataclass(frozen=True)
class Comparison:
    """The result of comparing answers with a fixture's expectations."""

    max_diff: float
    worst_excess: float  # max of |diff| - limit; > 0 means out of tolerance
    flips: int  # top-1 disagreements on images with a decisive margin
    count: int

    @property
    def passed(self) -> bool:
        return self.worst_excess <= 0 and self.flips == 0

    def describe(self, precision: str) -> str:
        tol = LOGIT_TOLERANCE[precision]
        text = f"{self.count} images: max |diff| {self.max_diff:.3g} (tolerance {precision}: {tol.atol:g} + " \
               f"{tol.rtol:g}*|want|)"
        if self.flips:
            text += f"; top-1 differs on {self.flips} image(s)"
        return text


def compare(got: np.ndarray, want: np.ndarray, precision: str) -> Comparison:
    """Logits (or log-probabilities) ``got`` against ``want``, with the precision's tolerance."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise FixtureError(f"answers have shape {got.shape}, the fixture {want.shape}")
    tol = tolerance(precision)
    diff = np.abs(got - want)
    excess = float((diff - tol.limit(want)).max()) if diff.size else 0.0
    top2 = np.sort(want, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * tol.limit(top2[:, 1])
    flips = int(((got.argmax(1) != want.argmax(1)) & decisive).sum())
    return Comparison(float(diff.max()) if diff.size else 0.0, excess, flips, len(want))


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    return np.maximum(np.log(np.maximum(np.asarray(probs, dtype=np.float64), 1e-300)), LOG_FLOOR)


def pack_encoded(encoded: list[bytes]) -> dict[str, np.ndarray]:
    offsets = np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64)
    return {"encoded": np.frombuffer(b"".join(encoded), dtype=np.uint8), "encoded_offsets": offsets}


def unpack_encoded(fixture: dict) -> list[np.ndarray]:
    data, offsets = fixture["encoded"], fixture["encoded_offsets"]
    return [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def save_fixture(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    from serving.core.atomic import atomic_write_bytes
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_fixture(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The fixture's arrays; FixtureError (never a skip) when it is missing, unreadable or incomplete."""
    if not path.is_file():
        raise FixtureError(f"{path.parent.name}/{path.name} is missing")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, OSError, BadZipFile...
        raise FixtureError(f"{path.parent.name}/{path.name} is unreadable ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise FixtureError(f"{path.parent.name}/{path.name} lacks {missing}")
    if len(arrays[keys[0]]) < 1:
        raise FixtureError(f"{path.parent.name}/{path.name} holds no images")
    return arrays


# ---- building the fixture at export time ----------------------------------------------------

_DECODABLE = (b"\x89PNG", b"\xff\xd8\xff")  # PNG and JPEG: what both PIL and DALI decode


def reference_pixels(encoded: bytes, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(source-size image, classifier input): the client's preprocessing of encoded bytes."""
    from export.patches import source_patch
    from serving.core.imageio import equalize_grey_u8, load_rgb_u8
    from serving.core.preprocess import reference_views

    image = load_rgb_u8(encoded, name="fixture image")
    # The reference preprocessing: equalisation (grey-scale models) at the decoded size, before any resize.
    crop = reference_views(image, spec, "none")[0]
    source = source_patch(equalize_grey_u8(image) if spec.grayscale_equalize else image, spec)
    return source, crop


def _candidates(data: Path, spec: ModelSpec) -> tuple[list[bytes], list[int | None], list[str], int]:
    """Encoded bytes and labels of up to CANDIDATES images, evenly spread, and how many lead from the val split."""
    from export.patches import encode
    from serving.core.errors import InputError
    from serving.inputs.datasets import discover, parse_hdf5_source, read_hdf5_rows

    samples, seen = [], set()
    first_split = 0
    # The validation split first; the test split, then the rest, when it is smaller than the fixture.
    for split in ("val", "test", None):
        if len(samples) >= CANDIDATES or (samples and len(samples) >= 2 * FIXTURE_IMAGES):
            break
        try:
            dataset = discover(data, split=split, strict=False)
        except InputError:
            continue
        step = max(1, len(dataset.samples) // CANDIDATES)
        for s in dataset.samples[::step]:
            if s.source not in seen:
                seen.add(s.source)
                samples.append(s)
        first_split = first_split or len(samples)
    if not samples:
        raise ExportInputError(f"--data: {data} holds no readable patches for the parity fixture")
    encoded, labels, skipped, leading = [], [], [], 0
    for k, s in enumerate(samples[:CANDIDATES]):
        try:
            pair = parse_hdf5_source(s.source)
            if pair:
                raw = encode(read_hdf5_rows(pair[0], np.array([pair[1]]))[0], "PNG")
            else:
                raw = Path(s.source).read_bytes()
                if not raw.startswith(_DECODABLE):
                    from serving.core.imageio import load_rgb_u8

                    raw = encode(load_rgb_u8(raw, name=s.source), "PNG")
            reference_pixels(raw, spec)
        except (InputError, OSError) as exc:
            skipped.append(f"{s.source}: {exc}")
            continue
        encoded.append(raw)
        labels.append(s.label)
        leading += int(k < first_split)
    return encoded, labels, skipped, leading


def _synthetic_candidates(spec: ModelSpec) -> list[bytes]:
    """Tissue-like images from the synthetic generator, for a run without data (benchmarks, random runs)."""
    import tempfile

    from serving.synth.dataset import synthesize

    with tempfile.TemporaryDirectory(prefix="patchserve-fixture-") as tmp:
        size = max(spec.source_height, spec.source_width)
        synthesize(Path(tmp), classes=2, per_class=FIXTURE_IMAGES, size=size, seed=0)
        return [p.read_bytes() for p in sorted(Path(tmp).rglob("*.png"))][:CANDIDATES]


def pick(logits: np.ndarray, labels: list[int | None], count: int) -> np.ndarray:
    """Indices of ``count`` images: per class (true label, else predicted) half the lowest margins, half spread."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    groups = np.array([lab if lab is not None else int(p) for lab, p in zip(labels, logits.argmax(1))])
    usable = margin > MIN_MARGIN
    classes = sorted(set(groups[usable].tolist()))
    chosen: list[int] = []
    if not classes or count < 1:
        return np.zeros(0, dtype=np.int64)
    for k, cls in enumerate(classes):
        share = count // len(classes) + int(k < count % len(classes))
        members = np.flatnonzero((groups == cls) & usable)
        by_margin = members[np.argsort(margin[members], kind="stable")]
        low = by_margin[:share // 2 + share % 2]
        rest = by_margin[len(low):]
        spread = rest[np.linspace(0, len(rest) - 1, min(share - len(low), len(rest))).astype(int)] if len(rest) else []
        chosen += [*low.tolist(), *list(np.asarray(spread).tolist())]
    return np.array(sorted(set(chosen)), dtype=np.int64)


def select_images(data: Path | None, spec: ModelSpec, served, notes: list[str]) -> tuple[list[bytes], np.ndarray]:
    """(encoded bytes, class-input pixels) of the fixture images."""
    from export.onnx_export import torch_outputs

    if data is not None:
        encoded, labels, skipped, leading = _candidates(data, spec)
        notes += [f"fixture: skipped unreadable patch {s}" for s in skipped[:5]]
    else:
        encoded = _synthetic_candidates(spec)
        labels, leading = [None] * len(encoded), len(encoded)
        notes.append(f"fixture: no data recorded by the run and no --data: {len(encoded)} synthetic tissue "
                     "images stand in for validation images")
    pixels = np.stack([reference_pixels(e, spec)[1] for e in encoded])
    if spec.features_only:
        # No class to be decisive about: images spread evenly over the candidates, validation ones first.
        first = np.linspace(0, leading - 1, min(FIXTURE_IMAGES, leading)).astype(int) if leading else []
        idx = np.array(sorted(set(np.asarray(first).tolist())), dtype=np.int64)
        if len(idx) < FIXTURE_IMAGES and leading < len(encoded):
            rest = np.arange(leading, len(encoded))
            more = rest[np.linspace(0, len(rest) - 1, min(FIXTURE_IMAGES - len(idx), len(rest))).astype(int)]
            idx = np.concatenate([idx, np.unique(more)])
        if len(idx) < FIXTURE_IMAGES:
            notes.append(f"fixture: {len(idx)} images (fewer than {FIXTURE_IMAGES} in the data)")
        return [encoded[i] for i in idx], pixels[idx]
    logits = np.concatenate([torch_outputs(served, pixels[i:i + 64])[1] for i in range(0, len(pixels), 64)])
    # Validation images first: all of them when they are too few, the rest picked from the other splits.
    idx = pick(logits[:leading], labels[:leading], FIXTURE_IMAGES)
    if len(idx) < FIXTURE_IMAGES and leading < len(encoded):
        more = pick(logits[leading:], labels[leading:], FIXTURE_IMAGES - len(idx)) + leading
        idx = np.concatenate([idx, more])
    if len(idx) < FIXTURE_IMAGES:
        notes.append(f"fixture: {len(idx)} images (fewer than {FIXTURE_IMAGES} usable ones in the data)")
    if len(idx) == 0:
        raise ExportInputError(f"--data: {data}: no image with a decisive class for the parity fixture")
    return [encoded[i] for i in idx], pixels[idx]
