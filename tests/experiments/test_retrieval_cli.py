"""``alignfuse retrieval`` end to end on temporary .npy files."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments.cli import main
from experiments.retrieval import flatten_metrics, retrieval_metrics


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    n_img, d = 40, 16
    g = rng.permutation(np.repeat(np.arange(n_img), 5))
    I = rng.standard_normal((n_img, d)).astype(np.float32)
    T = (I[g] + 1.5 * rng.standard_normal((len(g), d))).astype(np.float32)
    paths = {name: tmp_path / f"{name}.npy" for name in ("I", "T", "M")}
    np.save(paths["I"], I)
    np.save(paths["T"], T)
    np.save(paths["M"], g)
    return paths, (I, T, g)


def _args(paths, out, *extra):
    return ["retrieval", "--image-emb", str(paths["I"]), "--text-emb", str(paths["T"]),
            "--text-to-image", str(paths["M"]), "--json", str(out), *extra]


def test_cli_writes_metrics_json_and_prints_table(files, tmp_path, capsys):
    paths, (I, T, g) = files
    out = tmp_path / "out.json"
    assert main(_args(paths, out)) == 0
    result = json.loads(out.read_text())
    for name in ("image_to_text", "text_to_image"):
        assert {"R@1", "R@5", "R@10", "median_rank", "mean_rank"} <= set(result[name])
    assert isinstance(result["rsum"], float)
    assert flatten_metrics(result) == pytest.approx(flatten_metrics(retrieval_metrics(I, T, g)))
    printed = capsys.readouterr().out
    assert "image_to_text" in printed and "text_to_image" in printed and "rsum" in printed
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_cli_options(files, tmp_path, capsys):
    paths, (I, T, g) = files
    out = tmp_path / "out.json"
    assert main(_args(paths, out, "--ks", "1,3", "--no-normalize", "--map", "--bootstrap", "50",
                      "--chunk-size", "17")) == 0
    result = json.loads(out.read_text())
    ref = retrieval_metrics(I, T, g, (1, 3), normalize=False, with_map=True, bootstrap=50)
    assert flatten_metrics(result) == pytest.approx(flatten_metrics(ref))
    assert {"R@1", "R@3", "mAP", "R@1_ci_low", "R@1_ci_high"} <= set(result["text_to_image"])
    assert "R@10" not in result["text_to_image"]
    assert "CI" in capsys.readouterr().out


@pytest.mark.parametrize("corrupt,message", [
    (lambda p, d: p["T"].unlink(), "--text-emb .*T.npy: no such file"),
    (lambda p, d: p["M"].write_bytes(b"not an npy file"), "--text-to-image .*M.npy: not a readable .npy array"),
    (lambda p, d: np.save(p["M"], d[2][:-1]), "--text-emb .*T.npy has 200 rows but --text-to-image .*M.npy has 199"),
    (lambda p, d: np.save(p["M"], np.where(np.arange(200) == 3, 40, d[2])),
     r"--text-to-image .*M.npy\[3\] = 40 is out of range for 40 images"),
    (lambda p, d: np.save(p["I"], np.where(np.arange(40)[:, None] == 6, np.nan, d[0])),
     r"--image-emb .*I.npy has non-finite values \(NaN or Inf\), first in row 6"),
    (lambda p, d: np.save(p["T"], d[1][:, :8]), "--image-emb .*I.npy has dim 16 but --text-emb .*T.npy has dim 8"),
    (lambda p, d: np.save(p["T"], np.where(np.arange(200)[:, None] == 9, 0.0, d[1])),
     r"--text-emb .*T.npy has zero-norm rows .* first in row 9 \(1 of 200\)"),
])
def test_cli_errors_exit_2_with_one_line(files, tmp_path, capsys, corrupt, message):
    paths, data = files
    corrupt(paths, data)
    assert main(_args(paths, tmp_path / "out.json")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alignfuse retrieval: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out.json").exists()


def test_cli_without_json_prints_the_metrics(files, tmp_path, capsys, monkeypatch):
    paths, (I, T, g) = files
    monkeypatch.chdir(tmp_path)
    args = [a for a in _args(paths, "unused") if a not in ("--json", "unused")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    ref = retrieval_metrics(I, T, g)
    assert f"{ref['text_to_image']['R@1']:.2f}" in printed and f"rsum {ref['rsum']:.2f}" in printed
    assert "tied" in printed and "ties: expected" in printed and "wrote" not in printed
    assert list(tmp_path.iterdir()) == [] or all(p.suffix == ".npy" for p in tmp_path.iterdir())


def test_cli_ties_and_degenerate(files, tmp_path, capsys):
    paths, (I, T, g) = files
    collapsed = np.ones_like(I)
    np.save(paths["I"], collapsed)
    out = tmp_path / "o.json"
    assert main(_args(paths, out)) == 0
    expected = json.loads(out.read_text())
    assert expected["ties"] == "expected" and expected["text_to_image"]["R@1"] == pytest.approx(100 / 40)
    assert expected["text_to_image"]["tied_fraction"] == 1.0
    assert main(_args(paths, out, "--ties", "optimistic")) == 0
    assert json.loads(out.read_text())["text_to_image"]["R@1"] == 100.0
    assert main(_args(paths, out, "--ties", "pessimistic")) == 0
    assert json.loads(out.read_text())["text_to_image"]["R@1"] == 0.0
    np.save(paths["I"], np.zeros_like(I))
    assert main(_args(paths, out)) == 2
    assert "zero-norm rows" in capsys.readouterr().err
    assert main(_args(paths, out, "--degenerate", "tie", "--precision", "fp32")) == 0
    assert json.loads(out.read_text())["text_to_image"]["R@1"] == pytest.approx(100 / 40)
    with pytest.raises(SystemExit):
        main(_args(paths, out, "--ties", "random"))


def test_cli_help_has_no_required_json(capsys):
    with pytest.raises(SystemExit):
        main(["retrieval", "--help"])
    text = capsys.readouterr().out
    assert "--json OUT.json" in text and "--ties" in text


def test_cli_bad_flag_values(files, tmp_path, capsys):
    paths, _ = files
    with pytest.raises(SystemExit) as e:
        main(_args(paths, tmp_path / "o.json", "--ks", "1,x"))
    assert e.value.code == 2
    assert main(_args(paths, tmp_path / "o.json", "--bootstrap", "-1")) == 2
    assert "--bootstrap must be >= 0" in capsys.readouterr().err
    assert main(_args(paths, tmp_path / "o.json", "--bootstrap", "10", "--ci", "95")) == 2
    assert "--ci must be in (0, 1)" in capsys.readouterr().err


def test_cli_process_exit_code(files, tmp_path):
    paths, _ = files
    paths["I"].unlink()
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", *_args(paths, tmp_path / "o.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "alignfuse retrieval: error: --image-emb" in proc.stderr and "no such file" in proc.stderr
