"""Device selection: spec strings checked before any work, `auto` = CUDA when present, a CUDA request on a machine
without one refused in one sentence, and mixed precision that never acts on the CPU."""

from __future__ import annotations

import pytest
import torch

from dcmfg.device import check_device_spec, resolve_device
from dcmfg.errors import ConfigError
from dcmfg.features import amp_dtype

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@pytest.mark.parametrize("spec,norm", [("auto", "auto"), ("cpu", "cpu"), (" CUDA ", "cuda"), ("cuda:1", "cuda:1")])
def test_valid_specs(spec, norm):
    assert check_device_spec(spec) == norm


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "mps0", ""])
def test_malformed_specs_are_refused(spec):
    with pytest.raises(ConfigError, match="auto .* cpu, cuda or cuda:N"):
        check_device_spec(spec)


def test_auto_and_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_clear_error(spec):
    with pytest.raises(ConfigError, match="no CUDA device here; use --device cpu or auto"):
        resolve_device(spec)


@no_cuda
def test_extraction_on_missing_cuda_fails_before_any_work(tmp_path):
    from dcmfg.data import load_dataset
    from dcmfg.features import extract_features

    ds = load_dataset("synthetic", n=4)
    with pytest.raises(ConfigError, match="no CUDA device"):
        extract_features(ds, cache_root=tmp_path, device="cuda")
    assert not any(tmp_path.iterdir())  # no cache folder made, no encoder built


def test_mixed_precision_only_on_cuda():
    assert amp_dtype(True, torch.device("cpu")) is None  # CPU runs stay float32 (and deterministic)
    assert amp_dtype(False, torch.device("cuda")) is None
    if torch.cuda.is_available():
        assert amp_dtype(True, torch.device("cuda")) in (torch.bfloat16, torch.float16)
