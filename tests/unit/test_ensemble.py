"""The served ensemble: the registry's "demo" names two networks, the synthesizer splits a study's
samples between them and pools them, and every output names both weights.

Real weights (models/weights) on a real phantom case; one DDIM step keeps it to seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.registry import WEIGHTS_ROOT, resolve, resolve_members
from models.tmax_ddpm.inference import TmaxSynthesizer, split_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_samples_split_as_evenly_as_possible_primary_first() -> None:
    assert split_samples(8, 2) == [4, 4]
    assert split_samples(5, 2) == [3, 2]
    assert split_samples(1, 2) == [1, 0]  # one sample is the primary network's own
    assert split_samples(4, 1) == [4]
    with pytest.raises(ValueError, match="samples"):
        split_samples(0, 2)


def test_registry_names_two_networks_and_paths_join_with_plus() -> None:
    members = resolve_members("demo")
    assert members == [WEIGHTS_ROOT / "demo", WEIGHTS_ROOT / "scratch-8000"]
    assert resolve("demo") == members[0]
    joined = resolve_members(f"{members[1]}+{members[0]}")
    assert joined == [members[1], members[0]]
    assert resolve_members(str(members[0])) == [members[0]]
    with pytest.raises(FileNotFoundError, match="two or more"):
        resolve_members(f"{members[0]}+")


def test_ensemble_map_pools_each_networks_own_samples() -> None:
    from phantom.api import make_case

    case = make_case(7, matrix=64)
    args = (case.dwi, case.flair_on_dwi, case.core, case.brain)
    kw = {"adc": case.adc, "spacing_zyx": case.spacing_zyx, "steps": 1}
    ens = TmaxSynthesizer.load("demo", device="cpu", inference_path="fp32")
    first, second = (TmaxSynthesizer.load(str(d), device="cpu", inference_path="fp32") for d in resolve_members("demo"))
    assert len(ens.members) == 2 and ens.sources == [first.source, second.source]
    assert ens.model_id == f"{first.model_id}+{second.model_id}"

    alone = ens.synthesize(*args, samples=1, seed=3, **kw)  # fewer samples than networks: the primary's
    assert ens.members[1].runtime is None  # a network that draws nothing is not probed either
    pooled = ens.synthesize(*args, samples=2, seed=3, **kw)
    a = first.synthesize(*args, samples=1, seed=3, **kw)
    b = second.synthesize(*args, samples=1, seed=4, **kw)
    inside = case.brain > 0
    np.testing.assert_allclose(pooled.mean[inside], ((a.mean + b.mean) / 2)[inside], atol=2e-3)
    # the spread of two samples is half their difference: the networks' disagreement is in the SD
    np.testing.assert_allclose(pooled.sd[inside], (np.abs(a.mean - b.mean) / 2)[inside], atol=2e-3)
    assert pooled.samples == 2 and pooled.inference_path == "fp32"
    assert not np.allclose(a.mean[inside], b.mean[inside], atol=0.05)  # two networks, not one twice
    np.testing.assert_allclose(alone.mean, a.mean, atol=1e-5)


def test_model_version_names_every_network() -> None:
    from worker.pipeline.synthesize import model_version

    ens = TmaxSynthesizer.load("demo", device="cpu", inference_path="fp32")
    shas = [(d / "model.safetensors.sha256").read_text().split()[0][:12] for d in resolve_members("demo")]
    assert model_version(ens).endswith(f"sha256:{shas[0]}+{shas[1]}")
