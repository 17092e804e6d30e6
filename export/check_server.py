"""check-export's server stage: load the python flavours into the real embedded
Triton server and feed every model its fixture; answers must match the
fixture's logits (or reference decoding) within the stated tolerance."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from export.check_fixture import feature_output_of, inputs_of, judge, judge_features, output_of
from export.check_report import FAIL, OK, CheckRow
from serving.core.errors import PatchserveError


def _infer(client, model: str, name: str, array: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
    return [result.as_numpy(o) for o in outputs]


def _link_repo(repo: Path, needs: list[dict], workdir: Path) -> Path:
    """A repository of links to the checked models (and the steps of a checked ensemble)."""
    linked = workdir / "repo"
    linked.mkdir()
    names = {n["name"] for n in needs}
    for need in needs:
        if need["role"] == "ensemble":
            names |= {s.model_name for s in need["config"].ensemble_scheduling.step}
    for name in sorted(names):
        if (repo / name).is_dir():
            (linked / name).symlink_to((repo / name).resolve(), target_is_directory=True)
    return linked


def server_rows(repo: Path, needs: list[dict]) -> list[CheckRow]:
    """Start the embedded server on the checked models and feed each its fixture."""
    import tritonclient.grpc as grpcclient

    from serving.server.embedded import EmbeddedTriton

    rows = []
    with tempfile.TemporaryDirectory(prefix="patchserve-check-") as tmp:
        linked = _link_repo(repo, needs, Path(tmp))
        try:
            server = EmbeddedTriton(linked, workdir=Path(tmp) / "work", startup_timeout_s=180).start()
        except PatchserveError as exc:
            return [CheckRow("server", "*", FAIL, f"the embedded Triton server did not load the repository: {exc}")]
        try:
            client = grpcclient.InferenceServerClient(server.urls.grpc)
            rows.append(CheckRow("server", "*", OK, f"embedded Triton loaded {len(list(linked.iterdir()))} models"))
            for need in needs:
                rows += _serve_one(client, need)
            client.close()
        finally:
            server.close()
    return rows


def _serve_one(client, need: dict) -> list[CheckRow]:
    """The fixture through the served model: pixel models at batch 1 and in batches of max_batch_size,
    encoded-bytes models one file per request; a row for the logits (or pixels), one for the features."""
    name, spec, role = need["name"], need["spec"], need["role"]
    want, want_features = need["expected"], need.get("expected_features")
    feature_out = feature_output_of(role, spec) if want_features is not None else None
    outputs = ([output_of(role, spec)] if want is not None else []) + ([feature_out] if feature_out else [])
    try:
        if not client.is_model_ready(name):
            return [CheckRow("serve", name, FAIL, "not ready on the server")]
        x = inputs_of(role, need["fixture"])
        in_name = spec.encoded_name if role in ("preprocess", "ensemble") else spec.input_name
        if role in ("preprocess", "ensemble"):
            parts = [_infer(client, name, in_name, row[None], outputs) for row in x]
            where = "served, one file per request"
        else:
            # The first image alone, then every image in batches of the maximum batch size.
            step = spec.max_batch_size
            parts = [_infer(client, name, in_name, x[:1], outputs)]
            parts += [_infer(client, name, in_name, x[i:i + step], outputs) for i in range(0, len(x), step)]
            first = lambda a: np.concatenate([a[:1], a])  # noqa: E731 - the answers in the order asked
            want = first(want) if want is not None else None
            want_features = first(want_features) if feature_out else None
            where = f"served at batch 1 and {min(step, len(x))}"
        got = [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]
    except Exception as exc:  # noqa: BLE001 - report the model, check the others
        return [CheckRow("serve", name, FAIL, f"{type(exc).__name__}: {str(exc)[:300]}")]
    rows = [judge("serve", need, got[0], want, where)] if want is not None else []
    if feature_out:
        rows.append(judge_features("features-serve", need, got[-1], want_features, where))
    return rows
