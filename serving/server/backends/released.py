"""Every Python-backend file patchserve has released, by sha256: what ``check-export`` accepts as a model.py.

Export copies ``onnx_model.py`` (classifier, ``_tta``) or ``dali_model.py``
(``_preprocess``) into each version folder as ``model.py``; the server runs
it. The gate holds every such file to this registry (export/check.py):

- this version's own file passes;
- a file an older patchserve released passes too, with a note to re-export
  (a repository does not break because patchserve was upgraded);
- a released file that is listed in :data:`WITHDRAWN` fails with its reason
  and "re-export with this version" (a fix the served code must have);
- anything else fails: it is code the server would run that no patchserve
  wrote, even with a manifest rewritten to match.

When a backend file changes, its new sha256 is added here under the version
that ships it, and the old one stays; a unit test fails while the file on
disk is not registered.
"""

RELEASED: dict[str, dict[str, str]] = {
    "onnx_model.py": {
        "80b1d28723256aca324807e864cd38c5e5296d3b83691ea0ce7210c9faddc782": "0.1.0",
        "5c66195611721bd68f1309d4da1464e0ac894a69bc289a0f2e947f1c9162100d": "0.3.0",
        "0a3839d389eb327b2670778a2bef959768648ab5e2dc147d24ad2910bc6b6aef": "0.4.0",
    },
    "dali_model.py": {
        "041f9e98f8c52c0149d2a2d3ee2aa4ac25c583e58f64e13dfcc388fa1a730d24": "0.1.0",
        "a6e3755d457d9b4f2874eedbc0c7b79129417baa6fa3597883fa401334fcae46": "0.2.0",
    },
}

# sha256 -> why it must not be served any more (re-export with a patchserve that has the fix).
WITHDRAWN: dict[str, str] = {
    "041f9e98f8c52c0149d2a2d3ee2aa4ac25c583e58f64e13dfcc388fa1a730d24": (
        "dali_model.py 0.1.0 runs DALI inside the backend's stub process: one undecodable image in a "
        "batch of many makes DALI 2.4's CPU decoder corrupt memory, and the stub dies (every request of the "
        "model fails, the server restarts); any client can do this"),
}
