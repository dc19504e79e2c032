"""Convert the standard FID Inception weights (pytorch-fid's .pth) to unidiff's Haiku ``.npz``.

Run on a machine with torch installed (torch is NOT a unidiff dependency; it is imported
only when this script runs), with a weights file you obtained yourself; nothing downloads::

    python -m unidiff.eval.convert_inception_weights \\
        --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

Name mapping (torch state dict -> flat Haiku key, see ``unidiff/eval/inception.py``):

* ``<block>.conv.weight`` (O, I, kh, kw)   -> ``<block>/conv/w`` (kh, kw, I, O)
* ``<block>.bn.weight`` / ``.bn.bias``      -> ``<block>/bn/scale`` / ``<block>/bn/offset``
* ``<block>.bn.running_mean`` / ``_var``    -> ``<block>/bn/mean`` / ``<block>/bn/var``
* ``fc.weight`` (1008, 2048) / ``fc.bias``  -> ``fc/w`` (2048, 1008) / ``fc/b``

where ``<block>`` is the torch module path with ``.`` replaced by ``/`` (e.g.
``Mixed_7c.branch3x3dbl_3a``). A missing BN ``weight`` (the TF graph has no BN scale) is
filled with ones; ``num_batches_tracked`` and any ``AuxLogits.*`` entries are dropped. The
result is checked key by key and shape by shape against the network before it is written.

Without torch, ``--input`` may also be an ``.npz`` holding the state dict's arrays under
their torch names (e.g. written elsewhere with
``np.savez(f, **{k: v.numpy() for k, v in state_dict.items()})``).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping

import numpy as np

from unidiff.outputs import atomic_write, check_output_file

_BN_RENAMES = {
    "weight": "scale",
    "bias": "offset",
    "running_mean": "mean",
    "running_var": "var",
}


def torch_key_to_haiku(name: str) -> tuple[str, bool] | None:
    """Map one torch state-dict key to ``(haiku_key, transpose)``, or None to drop it.

    Raises ValueError for a key that belongs to no known layer kind.
    """
    parts = name.split(".")
    if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
        return None
    if parts[:1] == ["fc"] and len(parts) == 2 and parts[1] in ("weight", "bias"):
        return ("fc/w", True) if parts[1] == "weight" else ("fc/b", False)
    if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
        return "/".join(parts[:-1]) + "/w", True
    if len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_RENAMES:
        return "/".join(parts[:-1]) + "/" + _BN_RENAMES[parts[-1]], False
    raise ValueError(f"unexpected key {name!r} in the torch Inception state dict")


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torch-style ``{name: array}`` (numpy arrays or anything ``np.asarray`` takes) -> flat Haiku dict."""
    flat: dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        mapped = torch_key_to_haiku(name)
        if mapped is None:
            continue
        key, transpose = mapped
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"state dict entry {name!r} is not an array of numbers ({e})") from None
        if transpose:
            arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T
        flat[key] = np.ascontiguousarray(arr)
    # The TF graph's batch norms have no learned scale; some exports omit it entirely.
    for key in list(flat):
        if key.endswith("/bn/offset"):
            scale_key = key[: -len("offset")] + "scale"
            flat.setdefault(scale_key, np.ones_like(flat[key]))
    return flat


def _load_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch ``.pth`` (needs torch) or an ``.npz`` of the state dict's arrays under torch names."""
    if path.endswith(".npz"):
        try:
            # numpy guesses a pickle for anything else and suggests allow_pickle.
            if not zipfile.is_zipfile(path):
                raise ValueError("not a zip archive: a single .npy array, or another kind of file")
            data = np.load(path, allow_pickle=False)
            with data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"--input {path!r} is not a readable .npz of the state dict's "
                             f"arrays ({e})") from None
    try:
        import torch  # noqa: PLC0415  (optional, only for this conversion)
    except ImportError as e:
        raise ImportError(
            f"reading --input {path!r} needs torch (pip install torch), or pass an .npz holding "
            "the state dict's arrays under their torch names"
        ) from e
    obj = torch.load(path, map_location="cpu")
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"--input {path!r} does not hold a state dict (got {type(obj).__name__})")
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def convert_file(input_path: str, output_path: str) -> None:
    """Read a torch ``.pth`` (or torch-named ``.npz``), convert, validate, write the ``.npz``."""
    from unidiff.eval import inception  # noqa: PLC0415  (keeps the mapping importable without JAX)

    if not os.path.isfile(input_path):
        raise ValueError(f"--input {input_path!r} not found")
    # Before reading ~100 MB of weights: a bad --output would otherwise fail only at the end.
    check_output_file("output", output_path, {"input": input_path})
    state_dict = _load_state_dict(input_path)  # its errors name --input already
    try:
        flat = convert_state_dict(state_dict)
    except ValueError as e:
        raise ValueError(f"--input {input_path!r}: {e}") from None
    num_classes = flat["fc/b"].shape[0] if "fc/b" in flat else inception.NUM_CLASSES
    inception.validate_flat_params(flat, input_path, num_classes)
    # Atomic: a write that dies part way leaves an existing weights file as it was.
    with atomic_write(output_path) as f:
        np.savez(f, **flat)


def _main() -> None:
    from absl import app, flags  # noqa: PLC0415

    flags.DEFINE_string("input", None, "torch .pth of the FID Inception (pt_inception-2015-12-05).")
    flags.DEFINE_string("output", None, "Where to write the Haiku .npz.")
    flags.mark_flags_as_required(["input", "output"])

    def main(argv: list[str]) -> None:
        del argv
        try:
            convert_file(flags.FLAGS.input, flags.FLAGS.output)
        except (ValueError, ImportError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"wrote {flags.FLAGS.output}")

    app.run(main)


if __name__ == "__main__":
    _main()
