"""Property tests (hypothesis): malformed configs, adapter folders and arguments never slip through.

For every generated bad input the CLI (in-process `copra.cli.main`) must exit with code 2 and exactly
one error line, print no traceback, and leave no output folder (nor a hidden temporary one). Nothing
here trains: a malformed config is refused before any model loads, and inputs that turn out valid
are skipped. `pytest --hypothesis-show-statistics` shows how many inputs of each kind were tried.
"""

import dataclasses
import json
import math
import struct
import tempfile
import typing
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from copra.cli import main
from copra.core.config import TrainConfig, load_config
from copra.utils.errors import UserError

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ----------------------------------------------------------------------------- shared oracle


def _assert_refused(capsys, argv: list[str], out: Path) -> str:
    code = main(argv)  # anything but a UserError propagates and fails the test with its traceback
    captured = capsys.readouterr()
    assert code == 2, f"exit code {code} for {argv}: {captured.err}"
    assert captured.err.startswith("copra: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists(), f"partial output {out}"
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary output left behind"
    return captured.err


# ----------------------------------------------------------------------------- configs

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)
SCALARS = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _fits(value, hint) -> bool:
    """Whether `value` has a type field annotation `hint` accepts (strings count as numbers and lists)."""
    args = typing.get_args(hint)
    if value is None:
        return type(None) in args
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, str):
            try:
                float(value)
                return True
            except ValueError:
                return False
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _wrong_type(name: str):
    """Values of the wrong type for field `name`."""
    return SCALARS.filter(lambda v: not _fits(v, HINTS[name]))


COUNTS = ("shots", "steps", "batch_size", "grad_accum", "rank", "max_length")
OUT_OF_RANGE = {
    **{name: st.integers(-(10**9), 0) for name in COUNTS},
    "eval_examples": st.integers(-(10**6), 0),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32, max_value=2**80)),
    "checkpoint_every": st.integers(max_value=-1),
    **{
        name: st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, -math.inf]))
        for name in ("lr", "lora_alpha", "logit_scale")
    },
    **{
        name: st.one_of(st.floats(max_value=-1e-9), st.sampled_from([math.nan, math.inf]))
        for name in ("weight_decay", "min_lr")
    },
    **{
        name: st.one_of(st.floats(min_value=1.0 + 1e-9), st.floats(max_value=-1e-9), st.just(math.nan))
        for name in ("lora_dropout", "backbone_dropout", "initial_p", "final_p")
    },
    "ramp_fraction": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0 + 1e-9), st.just(math.nan)),
    **{
        name: st.text(max_size=10).filter(lambda v, n=name: v not in _choices(n))
        for name in ("method", "backbone", "ramp", "granularity")
    },
    "target_modules": st.one_of(st.just([]), st.lists(st.sampled_from(["", " ", "\t"]), min_size=1, max_size=2)),
    **{name: st.sampled_from(["", "  ", "\n"]) for name in ("task", "model", "output_dir")},
}


def _choices(name: str) -> tuple:
    from copra.core.config import BACKBONES, METHODS
    from copra.core.gates import GRANULARITIES
    from copra.core.schedule import RAMPS

    return {"method": METHODS, "backbone": BACKBONES, "ramp": tuple(RAMPS), "granularity": GRANULARITIES}[name]


CONFIG_KINDS = [
    "wrong type",
    "out of range",
    "unknown key",
    "non-string key",
    "garbage text",
    "garbage bytes",
    "not a mapping",
    "bad preset",
]


@st.composite
def bad_config_files(draw, kind: str):
    """Bytes of a malformed YAML config file of this kind."""
    values = {"shots": 2, "steps": 2, "max_length": 16, "progress": False}
    if kind == "wrong type":
        name = draw(st.sampled_from(sorted(FIELDS)))
        values[name] = draw(_wrong_type(name))
    elif kind == "out of range":
        name = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
        values[name] = draw(OUT_OF_RANGE[name])
    elif kind == "unknown key":
        name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=15))
        assume(name not in FIELDS and name != "preset")
        values[name] = draw(SCALARS)
    elif kind == "non-string key":
        values[draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()))] = 1
    elif kind == "bad preset":
        values["preset"] = draw(SCALARS.filter(lambda v: v not in ("minilm", "clip-lora")))
    if kind == "garbage text":
        return draw(st.text(max_size=60)).encode("utf-8")
    if kind == "garbage bytes":
        return draw(st.binary(min_size=1, max_size=60))
    if kind == "not a mapping":
        return yaml.safe_dump(
            draw(
                st.one_of(
                    st.lists(st.integers(), min_size=1, max_size=3), st.integers(), st.text(min_size=1, max_size=10)
                )
            )
        ).encode()
    return yaml.safe_dump(values, allow_unicode=True).encode("utf-8")


@pytest.mark.parametrize("kind", CONFIG_KINDS)
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_malformed_config_files_are_refused(capsys, tmp_path, tiny_text_model, kind, data):
    content = data.draw(bad_config_files(kind))
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    config, out = folder / "config.yaml", folder / "out"
    config.write_bytes(content)
    sets = ["--set", f"model={tiny_text_model}", "--set", f"output_dir={out}"]
    try:
        load_config(config, sets[1::2])
    except UserError:
        pass
    else:
        assume(False)  # the generator happened to produce a valid config: not this test's business
    event("config file: " + kind)
    _assert_refused(capsys, ["train", "--config", str(config), *sets], out)


@settings(max_examples=20, **SETTINGS)
@given(
    items=st.lists(st.text(min_size=0, max_size=20), min_size=1, max_size=3),
    name=st.sampled_from(sorted(OUT_OF_RANGE)),
    data=st.data(),
)
def test_malformed_set_arguments_are_refused(capsys, tmp_path, tiny_text_model, items, name, data):
    """Random `--set` text, plus one out-of-range `--set key=value` so the whole line is malformed."""
    value = data.draw(OUT_OF_RANGE[name])
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / "out"
    argv = ["train", "--set", f"model={tiny_text_model}", "--set", f"output_dir={out}"]
    for item in items:
        argv += ["--set", item]
    argv += ["--set", f"{name}={_yaml_scalar(value)}"]
    try:
        load_config(None, argv[2::2])
    except UserError:
        pass
    else:
        assume(False)
    event("--set: random text + an out-of-range value")
    _assert_refused(capsys, argv, out)


def _yaml_scalar(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


# ----------------------------------------------------------------------------- adapter folders

MODULES = (
    "base_model.model.encoder.layer.0.attention.self.query",
    "base_model.model.encoder.layer.1.attention.self.value",
)
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 1.0, "use_rslora": True, "target_modules": ["query", "value"]}


def _state(seed: int = 0, r: int = 2, dim: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in MODULES:
        state[f"{m}.lora_A.weight"] = torch.randn(r, dim, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(dim, r, generator=g)
    return state


def _write(folder: Path, state: dict | None, config, raw_weights: bytes | None = None) -> Path:
    folder.mkdir(parents=True)
    if raw_weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(raw_weights)
    elif state is not None:
        save_file(state, str(folder / "adapter_model.safetensors"))
    if isinstance(config, bytes):
        (folder / "adapter_config.json").write_bytes(config)
    elif config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _safetensors_bytes(state) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, f"{tmp}/x.safetensors")
        return Path(f"{tmp}/x.safetensors").read_bytes()


ADAPTER_KINDS = [
    "truncated file",
    "garbage bytes",
    "bad header length",
    "garbage header",
    "empty file",
    "no tensors",
    "integer dtype",
    "mixed dtypes",
    "nan or inf",
    "ranks differ in A and B",
    "rank differs from config",
    "not a matrix",
    "lora_A without lora_B",
    "module not targeted",
    "missing config",
    "config not JSON",
    "config not a LoRA mapping",
    "bad rank in config",
    "missing weights",
    "pickle weights",
    "not a folder",
    "shapes differ from the other adapter",
]


@st.composite
def bad_adapters(draw, kind: str):
    """A function writing a malformed adapter folder of this kind at a path."""
    state, config = _state(draw(st.integers(0, 3))), dict(CONFIG)
    key = draw(st.sampled_from(sorted(state)))
    raw = None
    if kind == "truncated file":
        full = _safetensors_bytes(state)
        raw = full[: draw(st.integers(0, len(full) - 1))]
    elif kind == "garbage bytes":
        raw = draw(st.binary(min_size=1, max_size=200))
    elif kind == "bad header length":
        full = _safetensors_bytes(state)
        raw = struct.pack("<Q", draw(st.integers(len(full), 2**64 - 1))) + full[8:]
    elif kind == "garbage header":
        header = draw(st.text(max_size=40)).encode()
        raw = struct.pack("<Q", len(header)) + header + b"\0" * draw(st.integers(0, 64))
    elif kind == "empty file":
        raw = b""
    elif kind == "no tensors":
        state = {}
    elif kind == "integer dtype":
        state[key] = (state[key] * 10).to(
            draw(st.sampled_from([torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]))
        )
    elif kind == "mixed dtypes":
        state[key] = state[key].to(draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64])))
    elif kind == "nan or inf":
        flat = state[key].flatten().clone()
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        state[key] = flat.reshape(state[key].shape)
    elif kind == "ranks differ in A and B":
        b_key = key.replace("lora_A", "lora_B")
        state[b_key] = torch.randn(8, draw(st.integers(3, 5)))
    elif kind == "rank differs from config":
        config["r"] = draw(st.integers(3, 64))
    elif kind == "not a matrix":
        state[key] = state[key].flatten()
    elif kind == "lora_A without lora_B":
        del state[key]
    elif kind == "module not targeted":
        config["target_modules"] = draw(st.sampled_from([["query"], ["value"], ["key"], ["dense", "output"], "foo.*"]))
    elif kind == "config not JSON":
        text = draw(st.text(max_size=30))
        try:
            json.loads(text)
            text = "{" + text
        except ValueError:
            pass
        config = text.encode("utf-8")
    elif kind == "config not a LoRA mapping":
        config = draw(
            st.one_of(
                st.lists(st.integers(), max_size=2),
                st.integers(),
                st.just({"peft_type": "LORA"}),
                st.just({**CONFIG, "peft_type": draw(st.sampled_from(["IA3", "PREFIX_TUNING", "lora"]))}),
            )
        )
    elif kind == "bad rank in config":
        config["r"] = draw(
            st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3), st.booleans(), st.none())
        )
    elif kind == "shapes differ from the other adapter":
        state = _state(0, dim=draw(st.integers(2, 7)))

    def write(folder: Path) -> Path:
        if kind == "missing config":
            return _write(folder, state, None)
        if kind == "missing weights":
            return _write(folder, None, config)
        if kind == "pickle weights":
            folder = _write(folder, None, config)
            (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
            return folder
        if kind == "not a folder":
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.write_bytes(b"not a folder")
            return folder
        return _write(folder, state, config, raw)

    return write


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
@settings(max_examples=5, **SETTINGS)
@given(data=st.data(), first=st.booleans(), method=st.sampled_from(["fusion", "mixture"]))
def test_malformed_adapter_folders_are_refused(capsys, tmp_path, kind, data, first, method):
    write = data.draw(bad_adapters(kind))
    event("adapter: " + kind)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    good = _write(folder / "good", _state(7), CONFIG)
    bad = write(folder / "bad")
    pair = [str(bad), str(good)] if first else [str(good), str(bad)]
    _assert_refused(capsys, ["merge", *pair, "--method", method, "-o", str(folder / "merged")], folder / "merged")
    if kind != "shapes differ from the other adapter":  # a consistent adapter on its own: prunable
        _assert_refused(
            capsys, ["prune", str(bad), "--sparsity", "0.5", "-o", str(folder / "pruned")], folder / "pruned"
        )
        _assert_refused(
            capsys, ["prune", str(bad), "--scheme", "every_other", "-o", str(folder / "pruned")], folder / "pruned"
        )


ARGUMENT_KINDS = [
    "sparsity",
    "scheme",
    "weights",
    "align steps",
    "method",
    "output under a file",
    "unknown option",
    "missing output",
]


@pytest.mark.parametrize("kind", ARGUMENT_KINDS)
@settings(max_examples=6, **SETTINGS)
@given(data=st.data())
def test_malformed_arguments_are_refused(capsys, tmp_path, kind, data):
    """Good adapters, bad command-line arguments."""
    event("arguments: " + kind)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    a, b = _write(folder / "a", _state(1), CONFIG), _write(folder / "b", _state(2), CONFIG)
    out = folder / "out"
    if kind == "sparsity":
        value = data.draw(
            st.one_of(
                st.floats(min_value=1.0),
                st.floats(max_value=-1e-12),
                st.just(math.nan),
                st.text(alphabet="abc,;", min_size=1, max_size=4),
            )
        )
        argv = ["prune", str(a), f"--sparsity={value}", "-o", str(out)]
    elif kind == "scheme":
        argv = [
            "prune",
            str(a),
            "--scheme",
            data.draw(
                st.text(min_size=1, max_size=12).filter(
                    lambda s: s not in __import__("copra.adapters.prune", fromlist=["STRUCTURED"]).STRUCTURED
                )
            ),
            "-o",
            str(out),
        ]
    elif kind == "weights":
        weights = data.draw(
            st.one_of(
                st.text(alphabet="abc;:", min_size=1, max_size=6),
                st.lists(st.floats(min_value=-3, max_value=3), min_size=1, max_size=4)
                .filter(lambda w: len(w) != 2)
                .map(lambda w: ",".join(map(str, w))),
                st.sampled_from(["nan,1", "inf,1", "1,-inf"]),
            )
        )
        argv = ["merge", str(a), str(b), f"--weights={weights}", "-o", str(out)]
    elif kind == "align steps":
        argv = [
            "merge",
            str(a),
            str(b),
            "--align",
            "--align-steps",
            str(data.draw(st.integers(max_value=0))),
            "-o",
            str(out),
        ]
    elif kind == "method":
        argv = [
            "merge",
            str(a),
            str(b),
            "--method",
            data.draw(st.text(min_size=1, max_size=8).filter(lambda m: m not in ("fusion", "mixture"))),
            "-o",
            str(out),
        ]
    elif kind == "output under a file":
        (folder / "file").write_text("x")
        out = folder / "file" / "out"
        argv = data.draw(
            st.sampled_from(
                [
                    ["merge", str(a), str(b), "-o", str(out)],
                    ["prune", str(a), "--sparsity", "0.5", "-o", str(out)],
                    ["train", "--set", "steps=1", "-o", str(out)],
                ]
            )
        )
    elif kind == "unknown option":
        argv = [
            "prune",
            str(a),
            "--sparsity",
            "0.5",
            "-o",
            str(out),
            "--" + data.draw(st.text(alphabet="xyz", min_size=1, max_size=5)),
        ]
    else:
        argv = data.draw(
            st.sampled_from(
                [["merge", str(a), str(b)], ["prune", str(a), "--sparsity", "0.5"], ["merge", str(a), "-o", str(out)]]
            )
        )
    err = _assert_refused(capsys, argv, out)
    assert len(err) < 500
