"""How recognisable are generated digits? A classifier trained on the real digits, applied to samples.

    python experiments/digits_sample_quality.py --samples=workdirs/quickstart_finetune/samples.npz

Trains scikit-learn's multinomial logistic regression on the 16x16 pixels of the real
digits train split (``unidiff.data`` digits, 1,438 images), then reports

* its top-1 accuracy on the real digits test split (359 images), for reference, and
* on the samples: the fraction classified as the label they were generated for
  (sample.py's ``labels``), overall and per class.

A sampler that ignored the label would score about 10%; samples as recognisable as real
digits would score about the test accuracy. Prints a table and one line of JSON.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile

from absl import app, flags

flags.DEFINE_string("samples", None, "sample.py .npz with 'images' uint8 (N, 16, 16, 1) and 'labels'.")
flags.DEFINE_float("C", 1.0, "Inverse L2 strength of the logistic regression.")
FLAGS = flags.FLAGS


def fail(msg: str) -> int:
    print(f"digits_sample_quality.py: error: {msg}", file=sys.stderr)
    return 2


def load(path: str):
    import numpy as np

    if not path or not os.path.isfile(path):
        raise ValueError(f"--samples {path}: file not found")
    if not zipfile.is_zipfile(path):
        # np.load would try a .png as a pickle and say so, and return a bare .npy as an
        # array that is no context manager: neither points at the real mistake.
        raise ValueError(f"--samples {path}: not an .npz archive; give the .npz that "
                         "sample.py writes beside its --out .png")
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
    except KeyError as e:
        raise ValueError(f"--samples {path}: missing {e}; expected sample.py's images and labels") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"--samples {path}: not a readable .npz ({e})") from None
    if images.dtype != np.uint8 or images.shape[1:] != (16, 16, 1):
        raise ValueError(f"--samples {path}: images must be uint8 (N, 16, 16, 1) digits, got "
                         f"{images.dtype} {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"--samples {path}: holds no images")
    # Float labels (2.5) would match no prediction and count as misses without a word.
    if labels.dtype.kind not in "iu" or labels.shape != (images.shape[0],) or labels.min() < 0 \
            or labels.max() > 9:
        raise ValueError(f"--samples {path}: labels must be (N,) integer class ids 0..9 (a "
                         f"class-conditional model's samples), got {labels.dtype} {labels.shape}")
    return images, labels


def split_arrays(split: str):
    import numpy as np

    from unidiff import data as ud

    src = ud.build_source("digits", None, split)
    ex = [src[i] for i in range(len(src))]
    return np.stack([e["image"] for e in ex]), np.asarray([e["label"] for e in ex])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    try:
        images, labels = load(FLAGS.samples)
    except ValueError as e:
        return fail(str(e))

    def flat(x):
        return x.reshape(x.shape[0], -1).astype(np.float64) / 255.0

    tr_x, tr_y = split_arrays("train")
    te_x, te_y = split_arrays("test")
    clf = LogisticRegression(C=FLAGS.C, max_iter=5000).fit(flat(tr_x), tr_y)
    test_acc = float(np.mean(clf.predict(flat(te_x)) == te_y))
    pred = clf.predict(flat(images))
    sample_acc = float(np.mean(pred == labels))
    per_class = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
    print(f"logistic regression on real 16x16 digits: test accuracy {100 * test_acc:.1f}% "
          f"({len(te_y)} real test images)")
    print(f"samples classified as their asked label: {100 * sample_acc:.1f}% "
          f"({len(labels)} samples, chance 10%)")
    print("per class: " + "  ".join(f"{c}: {100 * a:.0f}%" for c, a in per_class.items()))
    print(json.dumps({"samples": FLAGS.samples, "num_samples": int(len(labels)),
                      "sample_accuracy": sample_acc, "real_test_accuracy": test_acc,
                      "per_class": per_class}, sort_keys=True))
    return 0


if __name__ == "__main__":
    app.run(main)
