"""The README quickstart end to end (slow: tens of minutes on 2 CPU cores).

Pretrain with quickstart.flags, finetune with quickstart_finetune.flags, sample ten of each
digit and check that a classifier trained on real digits recognises the asked class, and
that the few-shot probe of the pretrained encoder beats a randomly initialised one.
"""

import json

import pytest

from tests.e2e_helpers import run_binary

# Well below what the acceptance run measured (see gen README section), so the test checks
# "recognisable digits" rather than one run's exact number.
MIN_SAMPLE_ACCURACY = 0.6
MIN_PROBE_GAIN = 0.1


def _last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_quickstart_generates_recognisable_digits(tmp_path):
    pre, ft = tmp_path / "quickstart", tmp_path / "quickstart_finetune"
    run_binary("pretrain.py", ["--flagfile=experiments/configs/quickstart.flags",
                               f"--workdir={pre}"], timeout=6 * 3600)
    run_binary("finetune.py", ["--flagfile=experiments/configs/quickstart_finetune.flags",
                               f"--init_from={pre}", f"--workdir={ft}"], timeout=6 * 3600)
    out = tmp_path / "samples.png"
    run_binary("sample.py", [f"--workdir={ft}", "--labels=0,1,2,3,4,5,6,7,8,9",
                             "--num_samples=100", "--guidance=2", f"--out={out}"],
               timeout=3600)
    quality = _last_json(run_binary("digits_sample_quality.py",
                                    [f"--samples={tmp_path / 'samples.npz'}"]))
    assert quality["sample_accuracy"] >= MIN_SAMPLE_ACCURACY, quality

    trained = _last_json(run_binary("probe.py", [f"--workdir={pre}"]))
    random = _last_json(run_binary("probe.py", [f"--workdir={pre}", "--random_init"]))
    assert trained["top1"] >= random["top1"] + MIN_PROBE_GAIN, (trained, random)
