"""The `dcmfg` command: answers without importing torch, one-line user errors with exit 2, checks before work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)


def test_help_and_argument_errors_do_not_import_torch():
    done = _python(
        "import sys\n"
        "from dcmfg.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "rc = main(['train', '--set', 'train.epochs=0'])\n"
        "assert rc == 2, rc\n"
        "rc = main(['evaluate', '--checkpoint', 'x', '--device', 'gpu'])\n"
        "assert rc == 2, rc\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("dcmfg:")]
    assert lines == ["dcmfg: error: config train.epochs=0 must be >= 1",
                     "dcmfg: error: device 'gpu' is not one of auto (CUDA when present, else CPU), cpu, cuda or cuda:N"]


def test_bad_config_values_fail_before_any_data_is_read(tmp_path, capsys):
    from dcmfg.cli import main

    out = tmp_path / "run"
    cases = {
        "train.epochs=0": "config train.epochs=0 must be >= 1",
        "train.batch_size=0": "config train.batch_size=0 must be >= 2",
        "model.heads=0": "config model.heads=0 must be >= 1",
        "train.lr=-1": "config train.lr=-1.0 must be > 0.0",
        "train.lr=.nan": "config train.lr=nan must be a finite number",
        "loss.contrastive=-1": "config loss.contrastive=-1.0 must be a finite number >= 0",
        "data.query=0": "config data.query=0 leaves the query part empty (a count must be >= 1)",
        "data.val=1.0": "config data.val=1.0 takes the whole training pool and leaves no training item (a fraction must be in (0, 1))",
        "train.select_metric=val_map_i2t": "config train.select_metric='val_map_i2t' is not one of map_mean, map_i2t, map_t2i",
    }
    for setting, message in cases.items():
        # the data root does not exist: reaching the data would give another message
        rc = main(["train", "--set", "data.root=/nonexistent", "--set", setting, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err == f"dcmfg: error: {message}", (setting, err)
    assert not out.exists()  # nothing was created for a run that could not start


def test_default_config_is_the_shipped_dcmfg_yaml():
    from dcmfg.config import Config, load_config

    assert Config().to_dict() == load_config(REPO / "configs" / "dcmfg.yaml").to_dict()
