"""Output folders recorded before the DP settings existed still continue: a missing key reads as DP off."""

from __future__ import annotations

import json

import pytest

from copra.experiments.federated import FederatedConfig, resume_settings
from copra.federated.resume import RECORDED_BEFORE, Progress
from copra.utils.atomic import write_json
from copra.utils.errors import UserError

DP_KEYS = ("dp_noise_multiplier", "dp_clip_norm")
DP_ON = {"dp_noise_multiplier": 1.0, "dp_clip_norm": 0.5, "norm_factor": 0.0}


def without_dp(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in DP_KEYS}


def fed(tmp_path, **overrides) -> FederatedConfig:
    return FederatedConfig(methods=["copra"], seeds=[0], output_dir=str(tmp_path), progress=False, **overrides)


def test_the_dp_keys_are_what_the_configs_call_them_and_off_by_default(tmp_path):
    pytest.importorskip("flwr")
    from copra.federated.app.settings import DeploySettings

    for defaults in (resume_settings(fed(tmp_path)), DeploySettings().to_dict()):
        assert {k: defaults[k] for k in DP_KEYS} == RECORDED_BEFORE


def test_copra_federated_progress_without_the_dp_keys_resumes_and_refuses_dp_on(tmp_path):
    progress = Progress(tmp_path / "progress")
    old = without_dp(resume_settings(fed(tmp_path)))
    write_json(progress.folder / "settings.json", old)
    progress.start(resume_settings(fed(tmp_path)))  # DP off now: the same run
    assert json.loads((progress.folder / "settings.json").read_text()) == old  # left as it was recorded
    with pytest.raises(UserError, match=r"holds a federated run with dp_clip_norm=0\.0, now 0\.5; continue"):
        progress.check(resume_settings(fed(tmp_path, **DP_ON)))


def test_a_server_history_without_the_dp_keys_resumes_and_refuses_dp_on(tmp_path):
    pytest.importorskip("flwr")
    from copra.federated.app.server_app import RunRecord
    from copra.federated.app.settings import DeploySettings

    settings = DeploySettings(output_dir=str(tmp_path / "out"))
    out = settings.output(1)
    rounds = [{"round": 1, "answered": [], "rejected": [], "failed": []}]
    old = {"run_id": 1, "status": "failed", "error": "killed", "settings": without_dp(settings.to_dict())}
    write_json(out / "history.json", old | {"rounds": rounds})
    again = RunRecord(settings, out, run_id=2)
    assert again.done == 1 and again.data["resumes"][0]["after_round"] == 1
    before = (out / "history.json").read_bytes()
    dp = DeploySettings(**(settings.to_dict() | DP_ON))
    with pytest.raises(UserError, match=r"dp_clip_norm=0\.0, now 0\.5"):
        RunRecord(dp, out, run_id=3)
    assert (out / "history.json").read_bytes() == before
