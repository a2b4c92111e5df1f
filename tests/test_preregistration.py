"""copra.experiments.runner.preregistration: the spec's hash, registering once, refusing a change after results exist."""

from __future__ import annotations

import hashlib
import json

import pytest

from copra.experiments.runner.preregistration import FILENAME, check, fingerprint, has_results, register
from copra.utils.errors import UserError

SPEC = {
    "primary_endpoints": ["merged_accuracy", "pruned_accuracy"],
    "correction": "holm",
    "alpha": 0.05,
    "seeds": [0, 1, 2, 3],
    "tasks": ["sst2", "mrpc"],
}


def _changed(**overrides):
    return {**SPEC, **overrides}


def test_fingerprint_is_the_sha256_of_the_canonical_json():
    canonical = '{"a":1,"b":[2,"é"]}'
    assert fingerprint({"b": [2, "é"], "a": 1}) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_key_order_does_not_change_the_hash_but_list_order_does():
    reordered = dict(reversed(list(SPEC.items())))
    assert list(reordered) != list(SPEC) and fingerprint(reordered) == fingerprint(SPEC)
    assert fingerprint({"x": {"b": 1, "a": 2}}) == fingerprint({"x": {"a": 2, "b": 1}})  # nested dicts too
    swapped = _changed(primary_endpoints=["pruned_accuracy", "merged_accuracy"])  # the endpoints' order counts
    assert fingerprint(swapped) != fingerprint(SPEC)
    assert fingerprint(_changed(alpha=0.1)) != fingerprint(SPEC)


@pytest.mark.parametrize("spec", [{"alpha": float("nan")}, {"when": object()}, ["not", "a", "dict"]])
def test_a_spec_that_is_not_plain_json_is_a_user_error(spec):
    with pytest.raises(UserError) as error:
        fingerprint(spec)
    assert "\n" not in str(error.value)


def test_register_writes_the_spec_its_hash_and_the_time(tmp_path):
    digest = register(tmp_path / "suite", SPEC)
    saved = json.loads((tmp_path / "suite" / FILENAME).read_text())
    assert saved["spec"] == SPEC and saved["sha256"] == digest == fingerprint(SPEC)
    assert saved["registered_at"].endswith("+00:00")  # ISO time, UTC
    assert [p.name for p in (tmp_path / "suite").iterdir()] == [FILENAME]  # no temporary left behind


def test_the_same_spec_twice_is_fine_and_keeps_the_first_time(tmp_path):
    first = register(tmp_path, SPEC)
    before = (tmp_path / FILENAME).read_bytes()
    (tmp_path / "landscape.json").write_text('{"experiment": "landscape"}')  # results exist: still fine
    assert register(tmp_path, dict(reversed(list(SPEC.items())))) == first
    assert (tmp_path / FILENAME).read_bytes() == before


def test_a_changed_spec_after_results_is_refused_and_the_file_is_unchanged(tmp_path):
    old = register(tmp_path, SPEC)
    before = (tmp_path / FILENAME).read_bytes()
    (tmp_path / "runs" / "lora-0").mkdir(parents=True)
    (tmp_path / "runs" / "lora-0" / "result.json").write_text("{}")  # a result at any depth counts
    new = _changed(alpha=0.1, seeds=[0, 1])
    with pytest.raises(UserError) as error:
        register(tmp_path, new)
    message = str(error.value)
    assert message.startswith("refused") and old in message and fingerprint(new) in message
    assert "changed: alpha, seeds" in message and "\n" not in message
    assert (tmp_path / FILENAME).read_bytes() == before


def test_a_changed_spec_before_any_result_replaces_it(tmp_path):
    register(tmp_path, SPEC)
    (tmp_path / ".landscape.json.tmp-1a2b3c4d").write_text("{}")  # a temporary being written is no result
    (tmp_path / ".suite.copra-lock").write_text("")
    new = _changed(correction="bonferroni")
    assert register(tmp_path, new) == fingerprint(new)
    assert json.loads((tmp_path / FILENAME).read_text())["spec"] == new


def test_what_counts_as_a_result(tmp_path):
    assert not has_results(tmp_path / "missing") and not has_results(tmp_path)
    (tmp_path / FILENAME).write_text("{}")
    (tmp_path / "notes.md").write_text("not JSON")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.json").write_text("{}")
    assert not has_results(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / FILENAME).write_text("{}")  # only the folder's own registration is exempt
    assert has_results(tmp_path)


def test_a_hand_edited_or_broken_registration_is_a_user_error(tmp_path):
    register(tmp_path, SPEC)
    saved = json.loads((tmp_path / FILENAME).read_text())
    saved["spec"]["alpha"] = 0.2  # edited without a new hash
    (tmp_path / FILENAME).write_text(json.dumps(saved))
    with pytest.raises(UserError, match="was edited"):
        register(tmp_path, SPEC)
    (tmp_path / FILENAME).write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        register(tmp_path, SPEC)


def test_the_report_check_flags_a_mismatch(tmp_path):
    assert check(tmp_path, SPEC) == {
        "sha256": None,
        "current": fingerprint(SPEC),
        "matches": False,
        "registered_at": None,
        "problem": f"not pre-registered: no {FILENAME} in {tmp_path}",
    }
    digest = register(tmp_path, SPEC)
    ok = check(tmp_path, SPEC)
    assert (ok["sha256"], ok["matches"], ok["problem"]) == (digest, True, None) and ok["registered_at"]
    changed = check(tmp_path, _changed(tasks=["sst2"]))
    assert changed["sha256"] == digest and changed["matches"] is False and changed["current"] != digest
    assert "spec changed" in changed["problem"] and "(tasks)" in changed["problem"]
    (tmp_path / FILENAME).write_text("{not json")
    broken = check(tmp_path, SPEC)  # the report never fails on a bad file: it says so
    assert broken["matches"] is False and broken["problem"].startswith("cannot read")
