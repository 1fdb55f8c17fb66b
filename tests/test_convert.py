"""convert_checkpoint.py: the authors' checkpoints -> a safe, self-contained model folder (issue 4).

The expensive part, loading converted folders in a fresh offline process, runs once per session for all of them
(`parity`); the converter's own fresh-process verification runs for the bfloat16 conversion (run as a script) and
for a source model that deliberately differs from the folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickletools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from calm_transformers import convert_checkpoint as cc
from calm_transformers.utils_calm import code_files
from conftest import FIXTURE, HANG_TIMEOUT, REPO, require_shared, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file

pytestmark = pytest.mark.slow  # conversions, training runs or subprocesses: minutes

TOL = 1e-5  # as tests/test_parity.py
LOSS_TOL = 2e-5  # |loss| ~ 51: float32 rounding
CODE_FILES = {path.name for path in code_files()}  # the model file and what it imports
FP32_CASES = ["bin", "bin_ae", "safetensors", "safetensors_ae", "sharded", "sharded_ae"]


# ----------------------------------------------------------------------------------------------------------------
# Building inputs


def fixture_state_dict(name: str) -> dict[str, torch.Tensor]:
    return torch.load(require_shared() / name / "pytorch_model.bin", weights_only=True)


def write_checkpoint(folder: Path, config: dict, state_dict: dict[str, torch.Tensor], layout: str) -> Path:
    """The authors' save_pretrained layouts: pytorch_model.bin, model.safetensors, or either sharded with an index."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # The authors' twins (mlp_generator / generative_head) share storage; safetensors wants separate tensors.
    tensors = {key: value.clone() for key, value in state_dict.items()}
    safetensors = layout.endswith("safetensors")
    if layout == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    elif layout == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"))
    else:  # sharded-bin / sharded-safetensors: 3 shards + index
        keys = sorted(tensors)
        pattern = "model-{:05d}-of-00003.safetensors" if safetensors else "pytorch_model-{:05d}-of-00003.bin"
        weight_map = {}
        for i in range(3):
            name, shard = pattern.format(i + 1), {key: tensors[key] for key in keys[i::3]}
            if safetensors:
                save_file(shard, str(folder / name))
            else:
                torch.save(shard, folder / name)
            weight_map.update(dict.fromkeys(shard, name))
        index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def write_tokenizer(folder: Path, vocab_size: int = 319) -> Path:
    """A tokenizer of `vocab_size` tokens without a pad token (as the Llama 3 tokenizer lacks [PAD])."""
    tiny_tokenizer(vocab_size, pad_token=False).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint folders in every layout, with the autoencoder inside the CALM checkpoint or beside it."""
    root, fixture = tmp_path_factory.mktemp("inputs"), require_shared()
    calm_config = json.loads((fixture / "calm" / "config.json").read_text())
    ae_config = json.loads((fixture / "autoencoder" / "config.json").read_text())
    calm_sd, ae_sd = fixture_state_dict("calm"), fixture_state_dict("autoencoder")
    lm_only = {key: value for key, value in calm_sd.items() if not key.startswith("ae_model.")}
    folders = {
        "safetensors": write_checkpoint(root / "calm-st", calm_config, calm_sd, "safetensors"),
        "safetensors-lm": write_checkpoint(root / "calm-st-lm", calm_config, lm_only, "safetensors"),
        "safetensors-ae": write_checkpoint(root / "ae-st", ae_config, ae_sd, "safetensors"),
        "sharded": write_checkpoint(root / "calm-sharded", calm_config, calm_sd, "sharded-bin"),
        "sharded-lm": write_checkpoint(root / "calm-sharded-lm", calm_config, lm_only, "sharded-safetensors"),
        "sharded-ae": write_checkpoint(root / "ae-sharded", ae_config, ae_sd, "sharded-bin"),
        "tokenizer": write_tokenizer(root / "tokenizer"),
    }
    write_tokenizer(folders["safetensors"])  # found in the CALM folder, without --tokenizer
    return folders


@pytest.fixture(scope="session")
def converted(inputs, tmp_path_factory) -> dict:
    """Every case converted once: "bf16" runs `python -m calm_transformers.convert_checkpoint`, with the
    fresh-process verification; the others call convert() without it (the `parity` fixture loads them all)."""
    out = tmp_path_factory.mktemp("converted")
    fixture = require_shared()
    cases = {
        "bin": dict(calm=fixture / "calm"),
        "bin_ae": dict(calm=fixture / "calm", autoencoder=fixture / "autoencoder"),  # both: they must agree
        "safetensors": dict(calm=inputs["safetensors"]),
        "safetensors_ae": dict(
            calm=inputs["safetensors-lm"], autoencoder=inputs["safetensors-ae"], tokenizer=inputs["tokenizer"]
        ),
        "sharded": dict(calm=inputs["sharded"]),
        "sharded_ae": dict(calm=inputs["sharded-lm"], autoencoder=inputs["sharded-ae"]),
    }
    folders = {name: cc.convert(output=out / name, verify=False, progress=False, **kw) for name, kw in cases.items()}

    script = subprocess.run(
        [
            sys.executable,
            "-m",
            "calm_transformers.convert_checkpoint",
            "--calm",
            str(fixture / "calm"),
            "--output",
            str(out / "bf16"),
            "--dtype",
            "bfloat16",
            "--tokenizer",
            str(inputs["tokenizer"]),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert script.returncode == 0, script.stdout + script.stderr[-3000:]
    folders["bf16"] = out / "bf16"
    return {"folders": folders, "script_stdout": script.stdout}


def run_main(argv: list[str]) -> dict:
    """cc.main(argv), with what it printed."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cc.main(argv)
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


# Loads every converted folder in one fresh offline process through its own code (trust_remote_code) and computes
# the parity outputs of tests/test_parity.py (../shared/CALM_SPEC.md section 8) from reference.pt's recorded draws.
PARITY_SCRIPT = r"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

reference = torch.load(sys.argv[1], weights_only=True)
results, models = {}, {}
for name, folder in json.loads(sys.argv[2]).items():
    models[name] = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype="auto").eval()
    results[name] = {"module": type(models[name]).__module__, "tokenizer": None}  # None: converted without one
    if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # 5.x reads the (remote) config
        results[name]["tokenizer"] = {"len": len(tokenizer), "pad": tokenizer.pad_token_id,
                                      "side": tokenizer.padding_side, "ids": tokenizer("w5 w6 w7").input_ids}
        if name == "safetensors":  # the model card's usage: a pipeline with trust_remote_code
            text = pipeline("text-generation", model=folder, trust_remote_code=True)("w5 w6 w7", max_new_tokens=8)
            results[name]["pipeline"] = text[0]["generated_text"]

# Brier evaluation lives in the package, not in the folder's code: imported once every folder is loaded through its
# own code (importing the package registers its classes with the Auto classes).
from calm_transformers import evaluate_calm as evaluate

for name, model in models.items():
    dtype = next(model.parameters()).dtype
    diff = lambda got, want: (got.float() - want.float()).abs().max().item()
    out = results[name]
    out["dtype"] = str(dtype)
    with torch.no_grad():
        mean, log_std = model.ae_model.encode(reference["input_ids"])
        out["ae_mean"], out["ae_log_std"] = diff(mean, reference["ae_mean"]), diff(log_std, reference["ae_log_std"])
        logits = model.ae_model.decode(reference["ae_mean"].to(dtype))
        out["ae_logits_at_mean"] = diff(logits, reference["ae_logits_at_mean"])
        hidden = model(reference["input_ids"]).last_hidden_state
        out["lm_hidden"] = diff(hidden, reference["lm_hidden"])
        head = model.generative_head.sample(
            reference["lm_hidden"].to(dtype).unsqueeze(0).repeat(3, 1, 1, 1), noise=reference["head_noise"] - 0.5
        )
        out["head_out"] = diff(head, reference["head_out"])
        evaluation = model(reference["input_ids"], labels=reference["input_ids"],
                           loss_noise=(reference["eval_randn"][0], reference["eval_rand"][0] - 0.5))
        out["eval_loss"] = abs(evaluation.loss.item() - reference["eval_loss"].item())
        brier = evaluate.calm_brier_scores(model, reference["input_ids"], noise=reference["eval_rand"][0][:2] - 0.5)
        out["eval_brier"] = diff(brier, reference["eval_brier"])
        tokens = model.ae_model.decode_tokens(reference["brier_latents"].to(dtype))
        k = model.config.patch_size
        a, b = (t.reshape(-1, k) for t in tokens)
        brier = evaluate.brier_scores(a, b, reference["brier_targets"].reshape(-1, k))
        out["brier_expected"] = diff(brier, reference["brier_expected"])
    model.train()
    loss = model(reference["input_ids"], labels=reference["input_ids"],
                 loss_noise=(reference["loss_target_eps"], reference["loss_head_noise"] - 0.5)).loss
    out["loss"] = abs(loss.item() - reference["loss"].item())
    model.eval()
    draws = iter(reference["gen_noise"])
    generated = model.generate(reference["gen_prompt"], max_length=20, do_sample=True, temperature=1.0,
                               noise_sampler=lambda shape, device, dtype: (next(draws) - 0.5).to(dtype))
    out["gen_output"] = generated.tolist()
with open(sys.argv[3], "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="session")
def parity(converted) -> dict:
    folders = {name: str(path) for name, path in converted["folders"].items()}
    scratch = converted["folders"]["bin"].parent
    result = subprocess.run(
        [sys.executable, "-c", PARITY_SCRIPT, str(FIXTURE / "reference.pt"), json.dumps(folders), "parity.json"],
        cwd=scratch,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        # An empty module cache: only each folder's own code files can be used.
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_MODULES_CACHE": str(scratch / "modules"),
        },
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((scratch / "parity.json").read_text())


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                assert key not in tensors, f"{key} saved twice"
                tensors[key] = f.get_tensor(key)
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("case", FP32_CASES)
def test_round_trip_reproduces_parity_outputs(parity, reference, case):
    out = parity[case]
    assert out["module"].startswith("transformers_modules"), out["module"]  # the folder's own code
    assert out["dtype"] == "torch.float32"
    for name in ("ae_mean", "ae_log_std", "ae_logits_at_mean", "lm_hidden", "head_out", "eval_brier", "brier_expected"):
        assert out[name] < TOL, (name, out[name])
    assert out["loss"] < LOSS_TOL and out["eval_loss"] < LOSS_TOL, (out["loss"], out["eval_loss"])
    assert out["gen_output"] == reference["gen_output"].tolist()


def test_cli_script_verifies_in_a_fresh_process(converted):
    stdout = converted["script_stdout"]
    assert "fresh process" in stdout and "Wrote" in stdout
    rows = [line.split() for line in stdout.splitlines() if "(tolerance" in line]
    names = [" ".join(row[:2]) for row in rows]
    assert names == ["autoencoder mean", "autoencoder log_std", "decoder logits", "backbone hidden", "head sample"]
    for row in rows:  # name, diff, (tolerance, limit), vs, float32:, diff from the float32 model
        assert float(row[2]) <= float(row[4].rstrip(")")), row
        assert row[5:7] == ["vs", "float32:"] and float(row[7]) > 0, row  # bfloat16 costs some precision


def test_bf16_conversion_loads_and_runs(converted, parity, reference):
    folder = converted["folders"]["bf16"]
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"  # transformers 5 / 4.57 spelling
    assert {t.dtype for t in saved_tensors(folder).values()} == {torch.bfloat16}
    out = parity["bf16"]
    assert out["dtype"] == "torch.bfloat16" and out["module"].startswith("transformers_modules")
    # bfloat16 keeps 2-3 significant digits: close to the float32 reference (measured: under 1.3% of the largest
    # magnitude), not equal to it.
    for name in ("ae_mean", "ae_log_std", "ae_logits_at_mean", "lm_hidden", "head_out"):
        scale = reference[name].abs().max().item()
        assert 0 < out[name] < 0.03 * scale, (name, out[name], scale)
    generated = torch.tensor(out["gen_output"])
    assert generated.shape == (2, 20)
    assert (generated == reference["gen_output"]).float().mean() >= 0.8  # the same draws give mostly the same tokens
    assert out["tokenizer"]["len"] == 320


def test_output_folder_is_ready_to_upload(converted):
    folder = converted["folders"]["bin_ae"]
    files = {p.name for p in folder.iterdir()}
    assert CODE_FILES | {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir()), "a staging folder was left behind"

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "calm" and config["head_type"] == "energy"
    assert config["architectures"] == ["CALMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_calm.CALMForCausalLM"
    assert "ae_path" not in config and config["autoencoder_config"]["intermediate_size"] == 160
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["temperature"], generation["num_candidates"], generation["do_sample"]) == (0.5, 200, True)

    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "arxiv.org/abs/2510.27688" in card and "trust_remote_code=True" in card and "pipeline(" in card
    assert "calm-convert --calm" in card and "--autoencoder" in card


def test_weights_saved_once_and_equal_in_every_layout(converted, fixture_model):
    expected = fixture_model.state_dict()
    config = json.loads((converted["folders"]["bin_ae"] / "config.json").read_text())
    for case in FP32_CASES:
        # Also without the autoencoder's config.json: its shape is read off the ae_model.* tensors.
        assert json.loads((converted["folders"][case] / "config.json").read_text()) == config, case
        tensors = saved_tensors(converted["folders"][case])
        assert set(tensors) == set(expected), case  # no mlp_generator.* twin, no decoder.lm_head_weight copy
        assert all(torch.equal(tensors[key], expected[key]) for key in expected), case


def test_sharded_output(tmp_path):
    out = cc.convert(require_shared() / "calm", tmp_path / "out", max_shard_size="300KB", verify=False, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert not (out / "model.safetensors").exists()
    tensors = saved_tensors(out)  # asserts that no key is in two shards
    assert set(tensors) == set(index["weight_map"])
    assert all(p.stat().st_size < 400_000 for p in out.glob("model-*.safetensors"))


def test_tokenizer_gets_pad_and_left_padding(converted, parity):
    for case in ("safetensors", "safetensors_ae", "bf16"):  # from the CALM folder, or from --tokenizer
        assert parity[case]["tokenizer"] == {"len": 320, "pad": 319, "side": "left", "ids": [5, 6, 7]}, case
        config = json.loads((converted["folders"][case] / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["padding_side"] == "left"
    assert parity["safetensors"]["pipeline"].startswith("w5 w6 w7")
    for case in ("bin", "bin_ae", "sharded", "sharded_ae"):
        assert parity[case]["tokenizer"] is None
        assert not (converted["folders"][case] / "tokenizer_config.json").exists()


def test_tokenizer_that_does_not_match_is_refused(tmp_path):
    tokenizer = write_tokenizer(tmp_path / "big-tokenizer", vocab_size=400)
    with pytest.raises(cc.CheckpointError, match=r"has 401 tokens .* embeddings have 320 rows"):
        cc.convert(require_shared() / "calm", tmp_path / "out", tokenizer=tokenizer, verify=False, progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Safety


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def pickled_globals(path: Path) -> list[tuple[str, str]]:
    """The callables a torch.save file's pickle would import, read without unpickling it."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    return [(op.name, arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    calm = tmp_path / "calm"
    calm.mkdir()
    (calm / "config.json").write_text((require_shared() / "calm" / "config.json").read_text())
    state_dict = fixture_state_dict("calm")
    state_dict["transformer.norm.weight"] = Payload(marker)
    torch.save(state_dict, calm / "pytorch_model.bin")
    assert ("GLOBAL", "io open") in pickled_globals(calm / "pytorch_model.bin")  # the payload is really in there

    result = run_main(["--calm", str(calm), "--output", str(tmp_path / "out"), "--no-verify"])
    assert result["code"] == 1
    assert "refusing to load" in result["stderr"] and "weights_only" in result["stderr"]
    assert not marker.exists(), "the pickle's payload ran"
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path):
    calm = require_shared() / "calm"
    out = cc.convert(calm, tmp_path / "out", verify=False, progress=False)
    (out / "old-marker").write_text("from the first conversion")

    result = run_main(["--calm", str(calm), "--output", str(out), "--no-verify"])
    assert result["code"] == 1 and "already exists; pass --force" in result["stderr"]
    assert (out / "old-marker").exists()

    assert run_main(["--calm", str(calm), "--output", str(out), "--no-verify", "--force"])["code"] == 0
    assert not (out / "old-marker").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or backup folder left

    # --force replaces model folders only, and never an input.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("not a model")
    with pytest.raises(cc.ConversionError, match="not a model folder"):
        cc.convert(calm, precious, force=True, verify=False, progress=False)
    with pytest.raises(cc.ConversionError, match="would replace the input folder"):
        cc.convert(out, out, force=True, verify=False, progress=False)
    assert (precious / "notes.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_no_half_folder(tmp_path, monkeypatch, existing):
    calm = require_shared() / "calm"
    out = tmp_path / "out"
    if existing:
        cc.convert(calm, out, verify=False, progress=False)
        (out / "old-marker").write_text("from the first conversion")
    before = sorted(p.name for p in out.iterdir()) if existing else None

    def interrupted(*args, **kwargs):  # the weights are written by now, the rest is not
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(cc, "model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cc.convert(calm, out, force=True, verify=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert sorted(p.name for p in out.iterdir()) == before


def test_verification_fails_when_the_folder_differs(converted, capsys):
    model = cc.load_reference_checkpoint(require_shared() / "calm")
    with torch.no_grad():
        model.embed_proj[0].bias += 1e-3  # the source now differs from what was written; the autoencoder does not
    with pytest.raises(cc.ConversionError, match="verification failed: backbone hidden, head sample differ"):
        cc.verify_conversion(model, converted["folders"]["bin"])
    rows = {
        " ".join(line.split()[:2]): float(line.split()[2])
        for line in capsys.readouterr().out.splitlines()
        if "(tolerance 1.0e-05)" in line
    }  # float32: an absolute tolerance
    assert rows["autoencoder mean"] == rows["autoencoder log_std"] == rows["decoder logits"] == 0.0
    assert rows["backbone hidden"] > 1e-5 and rows["head sample"] > 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Wrong inputs


def wrong_input(tmp_path: Path, case: str) -> list[str]:
    """Arguments for main() that must fail, built in tmp_path."""
    fixture = require_shared()
    calm_config = json.loads((fixture / "calm" / "config.json").read_text())
    state_dict = fixture_state_dict("calm")
    if case == "missing folder":
        return ["--calm", str(tmp_path / "nowhere")]
    if case == "no weights":
        (tmp_path / "calm").mkdir()
        (tmp_path / "calm" / "config.json").write_text(json.dumps(calm_config))
        return ["--calm", str(tmp_path / "calm")]
    if case == "missing shard":
        folder = write_checkpoint(tmp_path / "calm", calm_config, state_dict, "sharded-bin")
        (folder / "pytorch_model-00002-of-00003.bin").unlink()
        return ["--calm", str(folder)]
    if case == "autoencoder as --calm":
        return ["--calm", str(fixture / "autoencoder")]
    if case == "calm as --autoencoder":
        return ["--calm", str(fixture / "calm"), "--autoencoder", str(fixture / "calm")]
    if case == "missing keys":
        del state_dict["embed_proj.0.bias"], state_dict["transformer.norm.weight"]
    if case == "unexpected keys":
        state_dict["extra.weight"] = torch.zeros(2)
    if case == "shape mismatch":
        state_dict["embed_proj.2.bias"] = torch.zeros(5)
    if case == "different autoencoders":
        ae = fixture_state_dict("autoencoder")
        ae["encoder.norm.weight"] = ae["encoder.norm.weight"] + 1
        ae_config = json.loads((fixture / "autoencoder" / "config.json").read_text())
        write_checkpoint(tmp_path / "ae", ae_config, ae, "safetensors")
        return ["--calm", str(fixture / "calm"), "--autoencoder", str(tmp_path / "ae")]
    if case == "conflicting heads":
        calm_config.update(model_type="diffusion", architectures=["FlowTransformer"])
    if case == "energy weights, flow config":
        calm_config.update(architectures=["FlowTransformer"])
    write_checkpoint(tmp_path / "calm", calm_config, state_dict, "bin")
    return ["--calm", str(tmp_path / "calm")]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing folder", r"--calm .*nowhere: no such folder"),
        ("no weights", r"no weights in .*expected model.safetensors, pytorch_model.bin"),
        ("missing shard", r"lists the shard pytorch_model-00002-of-00003.bin, which is missing"),
        ("autoencoder as --calm", r"holds an autoencoder checkpoint, not a CALM language model"),
        ("calm as --autoencoder", r"is not an autoencoder checkpoint \(architectures: \['EnergyTransformer'\]\)"),
        ("missing keys", r"missing keys \(2\): embed_proj.0.bias, transformer.norm.weight"),
        ("unexpected keys", r"unexpected keys \(1\): extra.weight"),
        ("shape mismatch", r"shape mismatch for embed_proj.2.bias .*checkpoint \(5,\), model \(64,\)"),
        ("different autoencoders", r"ae_model.encoder.norm.weight differs from the autoencoder folder's"),
        ("conflicting heads", r"architectures \['FlowTransformer'\] and model_type 'diffusion' name different"),
        ("energy weights, flow config", r"missing keys \(\d+\): generative_head.net.*unexpected keys"),
    ],
)
def test_wrong_inputs_get_clear_errors(tmp_path, case, message):
    result = run_main([*wrong_input(tmp_path, case), "--output", str(tmp_path / "out"), "--no-verify"])
    assert result["code"] == 1, result
    error = result["stderr"].splitlines()[-1]  # after any progress bars
    assert error.startswith("calm-convert: error: ")
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_already_converted_folder_as_input(converted, tmp_path):
    with pytest.raises(cc.CheckpointError, match="already converted"):
        cc.convert(converted["folders"]["bin"], tmp_path / "out", verify=False, progress=False)


def test_bad_arguments_exit_with_usage_error(tmp_path):
    calm = str(require_shared() / "calm")
    for argv in (
        ["--calm", calm, "--output", str(tmp_path / "out"), "--private"],  # --private without --push-to-hub
        ["--calm", calm, "--output", str(tmp_path / "out"), "--max-shard-size", "5XB"],
        ["--calm", calm, "--output", str(tmp_path / "out"), "--dtype", "float64"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_main(argv)
        assert exit_info.value.code == 2, argv
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Publishing


def test_push_to_hub_creates_repo_and_uploads_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw))
    )

    def upload_folder(self, repo_id, folder_path, **kw):
        calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    argv = ["--calm", str(require_shared() / "calm"), "--output", str(out), "--no-verify"]
    assert run_main([*argv, "--push-to-hub", "someone/calm-tiny", "--private"])["code"] == 0
    assert calls[0] == ("create_repo", "someone/calm-tiny", {"private": True, "exist_ok": True})
    assert calls[1][:2] == ("upload_folder", "someone/calm-tiny")
    assert set(calls[1][2]) == {p.name for p in out.iterdir()} and "model.safetensors" in calls[1][2]
    assert 'pipeline("text-generation", model="someone/calm-tiny"' in (out / "README.md").read_text()

    def failing_upload(self, repo_id, folder_path, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", failing_upload)
    result = run_main([*argv, "--force", "--push-to-hub", "someone/calm-tiny"])
    assert result["code"] == 1 and "is complete, but uploading it to someone/calm-tiny failed" in result["stderr"]
    assert (out / "model.safetensors").exists()


def test_model_push_to_hub_carries_code_and_generation_config(fixture_model, monkeypatch):
    """The model's own push_to_hub (transformers' save_pretrained + one commit) uploads what remote code needs."""
    import huggingface_hub
    import transformers.utils.hub

    uploaded = []

    def create_repo(*args, **kwargs):
        return type("RepoUrl", (), {"repo_id": kwargs.get("repo_id", args[-1] if args else None)})()

    def create_commit(*args, **kwargs):
        uploaded.extend(op.path_in_repo for op in kwargs["operations"])

    # transformers 5 calls HfApi methods; 4.57 calls the functions it imported from huggingface_hub.
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **kw: create_repo(*a, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, *a, **kw: create_commit(*a, **kw))
    monkeypatch.setattr(transformers.utils.hub, "create_repo", create_repo, raising=False)
    monkeypatch.setattr(transformers.utils.hub, "create_commit", create_commit, raising=False)
    fixture_model.push_to_hub("someone/calm-tiny")
    assert CODE_FILES | {"config.json", "generation_config.json", "model.safetensors"} <= set(uploaded)


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "calm-convert"]
    assert script.value == "calm_transformers.convert_checkpoint:main"
    assert script.load() is cc.main
