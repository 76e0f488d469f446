# ===================================================================================================================
# train.py: data, the runs, reports, the output folder (manifest, lock), resume, torchrun
# ===================================================================================================================
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanollm
import train

QUICK = ["--quick", "--threads", "1"]
ROWS = ("baseline", *train.RUNS)

def run(argv: list) -> int:
    return train.main([str(a) for a in argv])

def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]

@pytest.fixture(scope="session")
def quick(tmp_path_factory) -> Path:
    """One complete --quick run (every row) that the tests read, or copy and change."""
    out = tmp_path_factory.mktemp("quick") / "out"
    assert run([*QUICK, "--out", out]) == 0
    return out

@pytest.fixture(scope="session")
def variants(quick, tmp_path_factory) -> Path:
    """The quick run's base and lora, plus issue 15's four variants (--resume reuses what is finished)."""
    out = copy(quick, tmp_path_factory.mktemp("variants") / "out")
    assert run([*QUICK, "--runs", "lora,dora,qlora,pissa,adalora", "--out", out, "--resume"]) == 0
    return out

def copy(quick: Path, to: Path) -> Path:
    shutil.copytree(quick, to)
    return to

# --- the quick run --------------------------------------------------------------------------------------------------

def test_quick_run_report_has_every_row(quick):
    report = json.loads((quick / "report.json").read_text())
    assert [r["run"] for r in report["rows"]] == list(ROWS)
    keys = {"run", "trainable_params", "total_params", "trainable_share", "train_seconds", "peak_memory_mb",
            "test_accuracy", "test_macro_f1", "test_loss", "epochs", "steps", "lr", "batch_size"}
    for row in report["rows"]:
        assert keys <= row.keys(), row["run"]
    rows = {r["run"]: r for r in report["rows"]}
    assert rows["head"]["trainable_share"] < rows["lora"]["trainable_share"] < rows["full"]["trainable_share"] == 1.0
    steps = train.QUICK["epochs"] * math.ceil(train.QUICK["train"] / train.BATCH_SIZE)
    assert rows["lora"]["steps"] == rows["full"]["steps"] == steps
    assert rows["baseline"]["trainable_params"] > 1000 and rows["baseline"]["test_loss"] is None
    for name in ("report.md", "curves.png", "lora_vs_peft.png", "pretrain.png", "base/model.safetensors",
                 "runs/lora/adapter/adapter_model.safetensors", "runs/peft/adapter/adapter_config.json",
                 "runs/scratch/model.safetensors", "runs/head/head.safetensors", "runs/full/model.safetensors"):
        assert (quick / name).is_file(), name
    assert not list(quick.rglob("checkpoint.safetensors")), "finished runs leave no checkpoint behind"
    assert not list(quick.rglob("*.pt")) and not list(quick.rglob("*.bin")) and not list(quick.rglob("*.tmp"))

def test_quick_run_manifest_lists_every_file_with_size_hash_settings_and_origin(quick):
    manifest = json.loads((quick / "manifest.json").read_text())
    on_disk = {p.relative_to(quick).as_posix() for p in quick.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", ".lock"}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (quick / name).stat().st_size and entry["sha256"] == train.sha256(quick / name)
        assert entry["settings"] in manifest["settings"], name
    base_hash = train.sha256(quick / "base/model.safetensors")[:16]
    assert {manifest["files"][f"runs/{r}/result.json"]["from"] for r in ("lora", "peft", "head", "full")} == {base_hash}
    assert manifest["settings"][manifest["files"]["runs/lora/result.json"]["settings"]]["run"] == "lora"
    assert manifest["temp"] == []

def test_quick_run_files_respect_the_umask(quick):
    umask = os.umask(0)
    os.umask(umask)
    for path in quick.rglob("*"):
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want or path.name == ".lock", path

def test_quick_run_lora_matches_peft_bit_for_bit(quick):
    lora = json.loads((quick / "runs/lora/result.json").read_text())
    peft = json.loads((quick / "runs/peft/result.json").read_text())
    assert len(lora["losses"]) > 0 and lora["losses"] == peft["losses"]  # every step, not within a tolerance
    assert lora["row"]["test_accuracy"] == peft["row"]["test_accuracy"]
    torch.testing.assert_close(torch.tensor(lora["predictions"]["probs"]), torch.tensor(peft["predictions"]["probs"]),
                               rtol=0, atol=1e-6)
    report = json.loads((quick / "report.json").read_text())
    assert report["lora_vs_peft"]["max_abs_loss_diff"] == 0.0

def test_quick_run_says_which_rows_sit_at_the_majority_rate(quick):
    report = json.loads((quick / "report.json").read_text())
    n = report["splits"]["test"]
    majority = round(report["majority_rate"] * n)
    at_majority = [r["run"] for r in report["rows"] if round(r["test_accuracy"] * n) == majority]
    assert report["at_majority_rate"] == at_majority
    assert ("majority-class rate" in (quick / "report.md").read_text()) == bool(at_majority)

@pytest.mark.parametrize("runs", ["default", "variants"])
def test_predict_reloads_models_and_reproduces_in_run_predictions(runs, request, capsys):
    out = request.getfixturevalue("quick" if runs == "default" else "variants")
    report = json.loads((out / "report.json").read_text())
    texts = report["predictions"]["lora"]["texts"]
    capsys.readouterr()
    assert run(["predict", *texts, "--out", out, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["probs"]) == set(train.RUNS) | (set(train.VARIANTS) if runs == "variants" else set())
    for name in report["predictions"]:
        torch.testing.assert_close(torch.tensor(printed["probs"][name]),
                                   torch.tensor(report["predictions"][name]["probs"]), rtol=0, atol=1e-5, msg=name)

def test_variant_rows_report_what_each_variant_is_for(variants):
    report = json.loads((variants / "report.json").read_text())
    rows = {r["run"]: r for r in report["rows"]}
    assert list(rows) == ["baseline", "lora", *train.VARIANTS]
    for name in ("lora", *train.VARIANTS):
        assert {"test_accuracy", "trainable_params", "steps", "lr", "base_bytes"} <= rows[name].keys(), name
        assert rows[name]["steps"] == rows["lora"]["steps"] and rows[name]["lr"] == rows["lora"]["lr"], name
    assert rows["qlora"]["base_bytes"] < rows["lora"]["base_bytes"] == rows["dora"]["base_bytes"]
    assert rows["qlora"]["trainable_params"] == rows["pissa"]["trainable_params"] == rows["lora"]["trainable_params"]
    assert rows["dora"]["trainable_params"] > rows["lora"]["trainable_params"]
    ranks, targets = rows["adalora"]["final_ranks"], len(train.LORA_TARGETS)
    assert len(ranks) == targets * train.QUICK["base"]["n_layers"]
    assert sum(ranks.values()) == train.LORA_R * len(ranks) and len(set(ranks.values())) > 1
    assert (variants / "runs/adalora/ranks.png").is_file() and "final_ranks" not in rows["lora"]

# --- resume and torchrun --------------------------------------------------------------------------------------------

def interrupt_at(monkeypatch, run_name: str, step: int) -> None:
    """Ctrl-C as the user presses it: KeyboardInterrupt from inside training step `step` of `run_name`."""
    real = train.step_generator
    def generator(seed, name, at, rank, device):
        if (name, at) == (run_name, step):
            raise KeyboardInterrupt
        return real(seed, name, at, rank, device)
    monkeypatch.setattr(train, "step_generator", generator)

def test_resume_after_interrupt_ends_bit_identical_to_an_uninterrupted_run(quick, tmp_path, monkeypatch, capsys):
    # scratch has dropout: each step's generator is derived, no RNG state is saved; 2 epochs cross an epoch end
    args = [*QUICK, "--runs", "scratch,lora,adalora", "--epochs", "2", "--checkpoint-every", "24"]
    straight, resumed = copy(quick, tmp_path / "straight"), copy(quick, tmp_path / "resumed")
    assert run([*args, "--out", straight]) == 0
    interrupt_at(monkeypatch, "scratch", 75)  # 63 steps an epoch: after the checkpoints at 24, 48, 63 and 72
    assert run([*args, "--out", resumed]) == 130
    assert (resumed / "runs/scratch/checkpoint.safetensors").is_file()
    monkeypatch.undo()
    interrupt_at(monkeypatch, "lora", 5)  # lora starts over: no checkpoint of it yet
    assert run([*args, "--out", resumed, "--resume"]) == 130
    monkeypatch.undo()
    interrupt_at(monkeypatch, "adalora", 75)  # mid-budgeting: AdaLoRA's importance state resumes from step 72
    assert run([*args, "--out", resumed, "--resume"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert run([*args, "--out", resumed, "--resume"]) == 0
    assert "scratch: finished in an earlier invocation" in capsys.readouterr().out
    for name, weights in (("scratch", "model.safetensors"), ("lora", "adapter/adapter_model.safetensors"),
                          ("adalora", "model.safetensors")):
        a, b = (json.loads((d / "runs" / name / "result.json").read_text()) for d in (straight, resumed))
        wa, wb = (load_file(d / "runs" / name / weights) for d in (straight, resumed))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
        assert a["row"]["test_accuracy"] == b["row"]["test_accuracy"] and a["val"] == b["val"], name
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-6), name

def test_torchrun_two_ranks_equal_one_process_and_one_process_resumes_it(quick, tmp_path, capsys):
    # lora and head have no dropout, so the two layouts draw no random numbers that could differ
    args = [*QUICK, "--runs", "lora,head", "--epochs", "1"]
    one, two = copy(quick, tmp_path / "one"), copy(quick, tmp_path / "two")
    assert run([*args, "--out", one]) == 0
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *map(str, args), "--out", str(two)],
                          cwd=Path(train.__file__).parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| run | trainable params") == 1, "only rank 0 reports"
    for weights in ("lora/adapter/adapter_model.safetensors", "head/head.safetensors"):
        a, b = (load_file(d / "runs" / weights) for d in (one, two))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    for name in ("lora", "head"):
        a, b = (json.loads((d / "runs" / name / "result.json").read_text()) for d in (one, two))
        assert a["row"]["test_accuracy"] == b["row"]["test_accuracy"]  # metrics gathered from both shards
        assert a["val"][0]["n"] == b["val"][0]["n"] == train.QUICK["eval"]
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    capsys.readouterr()
    assert run([*args, "--out", two, "--resume"]) == 0  # the world size is not part of the settings
    assert capsys.readouterr().out.count("finished in an earlier invocation") == 2

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def test_a_stalled_rank_ends_the_job_with_one_line_after_the_timeout(quick, tmp_path):
    out = copy(quick, tmp_path / "out")
    env = os.environ | {"OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    stalled = subprocess.Popen([sys.executable, "-c", "import datetime, time, torch.distributed as d; "
                                "d.init_process_group('gloo', timeout=datetime.timedelta(seconds=60)); time.sleep(60)"],
                               env=env | {"RANK": "1"})
    try:
        done = subprocess.run([sys.executable, "train.py", *QUICK, "--runs", "head", "--out", str(out),
                               "--dist-timeout", "3"], cwd=Path(train.__file__).parent, env=env | {"RANK": "0"},
                              capture_output=True, text=True, timeout=120)
    finally:
        stalled.kill()
    err = [line for line in done.stderr.splitlines() if line.startswith("train.py:")]
    assert done.returncode == 1 and len(err) == 1 and "--dist-timeout" in err[0], done.stderr[-2000:]

# --- the output folder (issue 13) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("theirs", ["base", "base.tmp", "runs/pretrain", "runs/peft/adapter"])
def test_a_folder_not_in_the_manifest_is_left_alone_and_named(theirs, tmp_path, capsys):
    out = tmp_path / "out"
    (out / theirs).mkdir(parents=True)
    (out / theirs / "mine.txt").write_text("the user's own file")
    assert run([*QUICK, "--out", out]) == 2
    assert f"{out / theirs.split('/')[0]}: not written by train.py" in one_line(capsys)
    assert (out / theirs / "mine.txt").read_text() == "the user's own file"

def test_one_writer_per_folder_and_a_killed_writers_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["pretrain", *QUICK, "--pretrain-steps", "2", "--out", out]
    out.mkdir()
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run(args) == 2
        assert "another train.py is writing there" in one_line(capsys)
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl, time; f = open({str(out / '.lock')!r}, 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run(args) == 0

def test_predict_refuses_runs_trained_on_another_base_and_resume_retrains_them(quick, tmp_path, capsys):
    out = copy(quick, tmp_path / "out")
    assert run(["pretrain", *QUICK, "--pretrain-steps", "5", "--out", out]) == 0  # other settings: a new base
    capsys.readouterr()
    assert run(["predict", "--out", out]) == 2
    assert "trained on another base" in one_line(capsys)
    assert run([*QUICK, "--pretrain-steps", "5", "--runs", "head", "--out", out, "--resume"]) == 0
    assert "head: finished in an earlier invocation" not in capsys.readouterr().out

BROKEN = {"truncated weights": ("base/model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
          "deleted vocabulary": ("base/vocab.txt", lambda p: p.unlink()),
          "deleted head": ("runs/head/head.safetensors", lambda p: p.unlink()),
          "garbage result": ("runs/head/result.json", lambda p: p.write_text("{not json")),
          "garbage adapter config": ("runs/lora/adapter/adapter_config.json", lambda p: p.write_text("[]"))}

@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_file_is_one_line_naming_it_and_resume_rebuilds_it(case, quick, tmp_path, capsys):
    name, damage = BROKEN[case]
    out = copy(quick, tmp_path / "out")
    damage(out / name)
    run_name = "lora" if "lora" in name else "head"
    for argv in (["predict", "--out", out], [*QUICK, "--runs", run_name, "--out", out]):
        assert run(argv) == 2
        line = one_line(capsys)
        assert str(out / name) in line and "--resume" in line, line
    if case == "garbage result":  # rebuilt (the others take the same path; the base: the next test)
        assert run([*QUICK, "--runs", "head", "--out", out, "--resume"]) == 0
        assert run(["predict", "--out", out]) == 0

def test_a_truncated_base_is_refused_then_rebuilt_the_same_with_resume(tmp_path, capsys):
    out, args = tmp_path / "out", ["pretrain", *QUICK, "--pretrain-steps", "5", "--out", tmp_path / "out"]
    assert run(args) == 0
    weights = out / "base/model.safetensors"
    digest = train.sha256(weights)
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert run(args) == 2
    assert f"{weights}: changed since train.py wrote it" in one_line(capsys)
    assert run([*args, "--resume"]) == 0 and train.sha256(weights) == digest

def test_resume_does_not_depend_on_how_the_folder_is_spelled(quick, tmp_path, monkeypatch, capsys):
    copy(quick, tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    for spelling in ("out", "./out", str(tmp_path / "out"), "../" + tmp_path.name + "/out"):
        capsys.readouterr()
        assert run([*QUICK, "--runs", "head", "--out", spelling, "--resume"]) == 0
        assert "head: finished in an earlier invocation" in capsys.readouterr().out, spelling

def test_a_killed_runs_temp_folder_goes_on_the_next_run(quick, tmp_path, monkeypatch):
    out = copy(quick, tmp_path / "out")
    real = train.save_tensors
    def killed_while_saving(path, tensors, meta=None):
        if path.name == "head.safetensors":
            path.write_bytes(b"half a file")
            raise KeyboardInterrupt
        real(path, tensors, meta)
    monkeypatch.setattr(train, "save_tensors", killed_while_saving)
    assert run([*QUICK, "--runs", "head", "--epochs", "1", "--out", out]) == 130
    assert (out / "runs/head.tmp/head.safetensors").exists()
    monkeypatch.undo()
    assert run([*QUICK, "--runs", "head", "--epochs", "1", "--out", out, "--resume"]) == 0
    assert not (out / "runs/head.tmp").exists() and (out / "runs/head/head.safetensors").is_file()

def test_an_update_that_explodes_on_the_last_step_saves_nothing(quick, tmp_path, capsys):
    out = copy(quick, tmp_path / "out")
    shutil.rmtree(out / "runs/head")  # (the manifest still lists it: removed by hand is "missing", rebuilt)
    assert run([*QUICK, "--runs", "head", "--epochs", "1", "--batch-size", "5000", "--lr-head", "1e39",
                "--out", out, "--resume"]) == 1  # one step, whose update overflows
    line = one_line(capsys)
    assert "parameters became NaN or infinite at step 1; lower the learning rate (--lr-head, now 1e+39)" in line
    assert not (out / "runs/head").exists() and not list(out.rglob("checkpoint.safetensors"))

def test_nan_loss_stops_naming_step_and_learning_rate(tmp_path):
    ctx = train.Ctx(train.Out(tmp_path, writer=True), 0, torch.device("cpu"), 0, 1, 100)
    hp = train.Hyper(epochs=1, lr=0.5, batch_size=2, flag="--lr-full")
    def loss_fn(params, idx, generator):  # finite at step 1, NaN from step 2 on
        return params["w"].sum() * (1.0 if params["w"].sum() == 3 else math.nan)
    with pytest.raises(train.Stopped, match=r"loss became NaN or infinite at step 2; lower the learning rate "
                                             r"\(--lr-full, now 0.5\)"):
        train.fit(ctx, "nan", "runs/nan", {"w": torch.ones(3)}, loss_fn, torch.ones(8, dtype=torch.long), hp, {}, None)

def test_weight_decay_only_on_matrices(tmp_path):
    ctx = train.Ctx(train.Out(tmp_path, writer=True), 0, torch.device("cpu"), 0, 1, 100)
    start = {"w": torch.full((5, 3), 2.0), "b": torch.full((7,), 2.0)}
    zero = lambda params, idx, generator: sum(p.sum() for p in params.values()) * 0.0  # noqa: E731
    trained, _ = train.fit(ctx, "decay", "runs/decay", start, zero, torch.ones(2, dtype=torch.long),
                           train.Hyper(1, 0.5, 2, "--lr-x"), {}, None)
    assert torch.equal(trained["b"], start["b"])  # a bias: no decay, and a zero gradient moves nothing
    torch.testing.assert_close(trained["w"], torch.full((5, 3), 2.0 * (1 - 0.5 * train.WEIGHT_DECAY)))

@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--epochs", "-1"], ["--lr-lora", "-1e-3"],
                                   ["--lr-full", "0"], ["--max-len", "2"], ["--lora-r", "0"], ["--dist-timeout", "0"]])
def test_impossible_numbers_are_refused_by_argparse(flags, capsys):
    with pytest.raises(SystemExit) as stopped:
        run([*QUICK, *flags])
    assert stopped.value.code == 2 and flags[0] in capsys.readouterr().err.strip().splitlines()[-1]

@pytest.mark.parametrize("where", ["under a file", "not writable"])
def test_an_unusable_out_is_one_line(where, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    if where == "not writable":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "out"
    assert run(["pretrain", *QUICK, "--out", out]) == 2
    assert str(out) in one_line(capsys)

# --- data ---------------------------------------------------------------------------------------------------------

def test_reviews_no_text_in_two_splits():
    data = train.load_reviews(seed=0)
    splits = [{t for t, _ in part} for part in (data.train, data.val, data.test)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert sum(map(len, splits)) == 17410 - 47  # distinct texts minus those carrying both labels
    assert data.label_names == ["neg", "pos"]

def test_user_data_formats_labels_and_line_endings(tmp_path):
    texts = [f"review number {i} {'good' if i % 3 else 'bad'}" for i in range(30)]
    labels = ["10" if i % 3 else "2" for i in range(30)]
    rows = "\r\n".join(["label,review"] + [f'{y},"{t}, quoted"' for t, y in zip(texts, labels)])
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())  # BOM + CRLF
    data = train.load_user_data(tmp_path / "d.csv", "review", "label", seed=0)
    assert data.label_names == ["2", "10"]  # numbers keep numeric order
    assert len(data.train) + len(data.val) + len(data.test) == 30
    (tmp_path / "d.jsonl").write_text("\r".join(json.dumps({"text": t, "y": "pos" if i % 3 else "neg"})
                                                for i, t in enumerate(texts)))
    assert train.load_user_data(tmp_path / "d.jsonl", "text", "y", seed=0).label_names == ["neg", "pos"]
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "\n".join(f'{t} "q\t{y}' for t, y in zip(texts, labels)) + "\n\n")
    tsv = train.load_user_data(tmp_path / "d.tsv", "text", "label", seed=0)
    assert {t for t, _ in tsv.train}.isdisjoint({t for t, _ in tsv.test})

def test_labels_read_the_same_from_csv_tsv_and_jsonl(tmp_path):
    texts, labels = [f"text {i}" for i in range(40)], [[" 0", "0.0", "1 ", "1.0"][i % 4] for i in range(40)]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": float(y) if i % 2 else y}) + "\n"
                                              for i, (t, y) in enumerate(zip(texts, labels))))
    read = [train.load_user_data(tmp_path / f"d.{kind}", "text", "label", seed=0) for kind in ("csv", "tsv", "jsonl")]
    assert read[0].label_names == ["0", "1"]  # 0 and 0.0 are one class, whitespace stripped
    assert read[0][:4] == read[1][:4] == read[2][:4]

def test_a_repeated_column_is_an_error_in_every_format(tmp_path):
    (tmp_path / "d.csv").write_text("text,label,label\na,1,2\n")
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1, "label": 2}\n')
    for name in ("d.csv", "d.jsonl"):
        with pytest.raises(train.DataError, match=r":[12]: .*twice"):
            train.load_user_data(tmp_path / name, "text", "label", seed=0)

def test_scores_take_memory_linear_in_the_classes():
    n = 10_007
    labels, predicted = torch.tensor([0, 5, 10_006, 5]), torch.tensor([0, 5, 3, 7])
    counts = train.class_counts(labels, predicted, n)
    assert counts.shape == (3 * n,)
    scores = train.metrics(counts, 2.0)
    assert scores["accuracy"] == 0.5 and scores["n"] == 4 and scores["loss"] == 0.5

MALFORMED = {
    "extra field": ("d.csv", "text,label\ngood,1\nbad,0,extra\n", ":3: 3 fields"),
    "missing column": ("d.csv", "review,label\ngood,1\n", ":1: no column 'text'"),
    "empty file": ("d.csv", "", "empty file"),
    "single class": ("d.csv", "text,label\n" + "".join(f"t{i},1\n" for i in range(20)), "only one class"),
    "bad encoding": ("d.csv", "text,label\ngood,1\n".encode() + "caf\xe9,0\n".encode("latin-1"), ":3: not UTF-8"),
    "bad json": ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', ":2: not valid JSON"),
    "missing key": ("d.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n', ":2: no column 'text'"),
    "empty label": ("d.tsv", "text\tlabel\ngood\t1\nbad\t\n", ":3: empty label"),
    "directory": ("folder", None, "is a directory"),
    "fifo": ("fifo.csv", "fifo", "not a regular file"),
}

@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_data_one_line_error_and_nothing_written(case, tmp_path, capsys):
    name, content, expected = MALFORMED[case]
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    assert run([*QUICK, "--data", path, "--out", out]) == 2
    line = one_line(capsys)
    assert str(path) in line and expected in line, line
    assert not out.exists()

def test_missing_model_one_line_error_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert run([*QUICK, "--model", tmp_path / "no_such_model", "--out", out]) == 2
    assert "no_such_model" in one_line(capsys)
    assert not out.exists()

# --- pretraining ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bag", [0.0, 0.5])
def test_pretraining_loss_trains_the_pooler_only_through_the_bag_task(bag):
    # masked-LM never reads [CLS]: without the bag-of-characters task the pooler gets no gradient at all
    cfg = nanollm.Config.bert(11, max_len=7, d_model=12, n_heads=3, d_ff=20, n_layers=2, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    params = nanollm.init_params(cfg, g) | train.init_pretraining_heads(cfg, g)
    ids = torch.randint(len(train.SPECIALS), 11, (2, 7), generator=g)
    ids[:, 0], ids[1, 5:] = train.CLS, train.PAD
    recipe = train.PRETRAIN | {"seq": 7, "bag": bag}
    loss_fn, parts = train.pretraining_loss(cfg, ids, torch.arange(2), recipe, torch.device("cpu"))
    params = {k: v.requires_grad_() for k, v in params.items()}
    loss = loss_fn(params, torch.arange(2), torch.Generator().manual_seed(1))
    (mlm, bag_loss), = parts
    assert loss.item() == pytest.approx(mlm + bag * bag_loss, rel=1e-6)
    # the bag target is the row's character histogram: its cross-entropy is at least that histogram's entropy
    share = torch.stack([torch.bincount(row[row > train.MASK], minlength=11).double() for row in ids])
    share = share / share.sum(1, keepdim=True)
    assert bag_loss >= -(share * share.clamp(min=1e-30).log()).sum(1).mean().item() - 1e-6
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    assert (grads["pooler.weight"] is not None and grads["pooler.weight"].abs().sum() > 0) == (bag > 0)
    assert grads["layers.0.attn.q.weight"].abs().sum() > 0 and grads["mlm.dense.weight"].abs().sum() > 0
