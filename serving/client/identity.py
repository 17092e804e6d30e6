"""What a server serves under a model name: name, version, weights' hash, spec hash; servers compared."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from serving.client.model_info import ModelInfo
from serving.core.errors import FeaturesMissingError, ServerMismatchError, SpecError, SpecMismatchError
from serving.core.hashing import canonical_json, sha256_text
from serving.core.spec import SPEC_PARAMETER, WEIGHTS_PARAMETER, ModelSpec


def spec_sha256(spec: ModelSpec) -> str:
    """Hash of the spec's canonical JSON: equal specs hash equal whatever their key order."""
    return sha256_text(canonical_json(spec.to_dict()))


@dataclass(frozen=True)
class ServedIdentity:
    """What one server serves under the job's model name."""

    model: str
    version: int
    weights_sha256: str  # from the config's parameters; "" for a repository exported without it
    spec_sha256: str

    def differences(self, other: "ServedIdentity") -> list[str]:
        return [f"{f.name} {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def check_servers(identities: dict[str, ServedIdentity]) -> ServedIdentity:
    """The identity all servers share; ServerMismatchError naming each disagreeing server and field."""
    urls = list(identities)
    first = identities[urls[0]]
    bad = [f"{u} differs from {urls[0]}: {'; '.join(identities[u].differences(first))}"
           for u in urls[1:] if identities[u] != first]
    if bad:
        raise ServerMismatchError("--url: the servers do not serve the same model, so their rows cannot be mixed: "
                                  + " / ".join(bad) + ". Nothing was written")
    return first


def read_spec(info: ModelInfo) -> ModelSpec:
    """The spec a served model carries in its config (parameter ``patchserve_spec``), validated."""
    text = info.parameters.get(SPEC_PARAMETER)
    if not text:
        raise SpecMismatchError(f"--model {info.name}: the server's config has no {SPEC_PARAMETER!r} parameter; "
                                "was the repository written by 'patchserve export'?")
    try:
        return ModelSpec.from_json(text)
    except SpecError as exc:
        raise SpecMismatchError(f"--model {info.name}: the server's spec is invalid: {exc}") from exc


def check_input(info: ModelInfo, spec: ModelSpec, features: bool = False) -> None:
    """The classifier's config input must be the spec's uint8 NHWC tensor; a features-only model is refused
    unless its features are asked for (it serves no probabilities: its first output would be read as such)."""
    if spec.features_only and not features:
        raise SpecMismatchError(
            f"--model {info.name}: a features-only model (its {spec.feature_layer} features, no classes): it "
            "serves no probabilities to score; pass --features for its features, or score a model exported "
            "from a run with classes")
    want = (*spec.input_hw, 3)
    if info.datatype != "UINT8" or info.dims != want or info.input_name != spec.input_name:
        raise SpecMismatchError(
            f"--model {info.name}: config input {info.input_name} {info.datatype} {list(info.dims)} disagrees "
            f"with its spec ({spec.input_name} UINT8 {list(want)})")


def check_features(info: ModelInfo, spec: ModelSpec) -> None:
    """FeaturesMissingError unless the served model ``info`` outputs the spec's features."""
    if not spec.has_features or spec.features_name not in info.outputs:
        why = ("its spec names no feature_layer" if not spec.has_features
               else f"its config lists no {spec.features_name!r} output")
        raise FeaturesMissingError(
            f"--features: model {info.name!r} outputs no features ({why}); re-export with --features layer4 "
            "(or layer3)")


def served_identity(model: str, spec: ModelSpec, info: ModelInfo) -> ServedIdentity:
    """Name, version, weights' hash (from the config, written by export) and spec hash of a served model."""
    return ServedIdentity(model, int(spec.version), info.parameters.get(WEIGHTS_PARAMETER, ""), spec_sha256(spec))


def identity_change(url: str, before: ModelInfo, now: ModelInfo) -> ServerMismatchError | None:
    """The error to raise when a model's config changed weights or spec (a server came back as another)."""
    for key in (WEIGHTS_PARAMETER, SPEC_PARAMETER):
        if now.parameters.get(key, "") != before.parameters.get(key, ""):
            what = "weights" if key == WEIGHTS_PARAMETER else "spec"
            return ServerMismatchError(
                f"--url {url}: the server came back serving model {before.name!r} with other {what} "
                f"({key} {before.parameters.get(key, '')[:16]!r}... before, "
                f"{now.parameters.get(key, '')[:16]!r}... now); no more work is sent to it")
    return None
