"""The newcomer path (issue 12, item 7): `--help` shows a preset's own values, `evaluate --dataset synthetic`
works, commands write under runs/ (never the working directory itself), TensorFlow's start-up log lines
are hidden unless asked for, and the user-facing text cites the project's own docs/, not ../shared."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from reid_keras import cli
from reid_keras.cli import evaluate as evaluate_cli
from reid_keras.cli import train as train_cli
from tests.eval_helpers import build_tiny_models, reference_ranking

REPO = pathlib.Path(__file__).resolve().parents[1]
# What TensorFlow 2.21 prints on stderr at start-up on this kind of machine (x86 CPU, oneDNN on).
STARTUP_LINES = ("oneDNN custom operations are on", "This TensorFlow binary is optimized",
                 "All log messages before absl::InitializeLog() is called")


def _command(args, cwd, **env_changes):
    """Run `python -m reid_keras.<args>` as a user would: a fresh process, the repository importable, no
    TF_CPP_MIN_LOG_LEVEL of the test session (conftest sets one) unless given in `env_changes`."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", cli.VERBOSE_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_changes)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _startup_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if any(s in line for s in STARTUP_LINES)]


# --- --help ---------------------------------------------------------------------------------------------

def _expected(model: str, recipe: str) -> dict:
    """The preset's values as a user types them, computed here from the families registry."""
    from reid_keras.families import get_preset

    values = get_preset(model)[1].resolve(recipe)
    height, width = values.image_size
    return {"--epochs": str(values.epochs), "--batch-size": str(values.batch_size),
            "--lr": f"{values.learning_rate:g}", "--image-size": f"{height}x{width}",
            "--id-warmup-steps": str(values.id_warmup_steps), "--optimizer": values.optimizer}


def _flag_help(text: str, flag: str) -> str:
    """The help paragraph of `flag` (up to the next flag), joined into one line."""
    lines = text.splitlines()
    starts_flag = re.compile(r"^  -")  # flags sit at two spaces; their wrapped help is indented further
    start = next(i for i, line in enumerate(lines) if starts_flag.match(line) and line.split()[0] == flag)
    end = next((i for i in range(start + 1, len(lines)) if starts_flag.match(lines[i]) or not lines[i].strip()),
               len(lines))
    return " ".join(" ".join(lines[start:end]).split())


@pytest.mark.parametrize("model, recipe", [("siamese_b0", "default"), ("siamese_b0", "paper")])
def test_help_shows_the_chosen_presets_values(model, recipe):
    argv = ["--model", model] + (["--preset", recipe] if recipe != "default" else [])
    text = train_cli.build_parser(argv=argv).format_help()
    for flag, value in _expected(model, recipe).items():
        assert f"(default for {model}, --preset {recipe}: {value})" in _flag_help(text, flag), (flag, value)
    assert "(default: None)" not in text
    # a flag the family does not read says so instead of showing a value
    assert f"(not read by {model}: family siamese)" in _flag_help(text, "--losses")


def test_help_shows_the_paper_recipe_numbers_of_the_siamese_paper():
    """The EfficientNet siamese paper's recipe (§III.C): 160x80, RMSprop 1e-4, batch 48, 18 epochs."""
    text = train_cli.build_parser(argv=["--model", "siamese_b0", "--preset", "paper"]).format_help()
    for flag, value in (("--image-size", "160x80"), ("--lr", "0.0001"), ("--batch-size", "48"),
                        ("--epochs", "18"), ("--optimizer", "rmsprop"), ("--id-warmup-steps", "0")):
        assert _flag_help(text, flag).endswith(f"--preset paper: {value})"), flag


def test_help_without_a_model_prints_a_line_per_preset():
    from reid_keras.families import presets

    text = train_cli.build_parser(argv=[]).format_help()
    table = text[text.index("preset values (--preset default"):]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:] if line.strip() and
            line.split()[0] in presets()}
    assert sorted(rows) == sorted(presets())
    for name, cells in rows.items():
        family, preset = presets()[name]
        values = preset.resolve("default")
        height, width = values.image_size
        assert cells[1] == family.name
        assert cells[2:8] == [str(values.epochs), str(values.steps_per_epoch), str(values.batch_size),
                              f"{values.learning_rate:g}", values.optimizer, f"{height}x{width}"], name
        assert cells[8] == (str(values.id_warmup_steps) if family.name == "siamese" else "-")
    assert "(default: None)" not in text


def test_help_of_the_real_command_with_verbose_keeps_tensorflow_lines(tmp_path):
    """One real `--help` process with --verbose: the preset's numbers, nothing written, TF's start-up lines
    kept (families import TensorFlow to list the presets)."""
    result = _command(["reid_keras.train", "--model", "siamese_b0", "--help", "--verbose"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(default for siamese_b0, --preset default: 800)" in " ".join(result.stdout.split())
    assert os.listdir(tmp_path) == []
    if not _startup_lines(result.stderr):
        pytest.skip("this TensorFlow build prints none of the known start-up lines")
    by_env = _command(["reid_keras.train", "--model", "siamese_b0", "--help"], cwd=tmp_path,
                      **{cli.VERBOSE_ENV: "1"})
    assert by_env.returncode == 0 and _startup_lines(by_env.stderr), by_env.stderr[-2000:]


# --- evaluate --dataset synthetic, outputs under runs/, quiet logs --------------------------------------

@pytest.fixture(scope="module")
def synthetic_evaluation(tmp_path_factory):
    """`python -m reid_keras.evaluate --dataset synthetic` run as a user would, in an empty directory, with a
    tiny model kept elsewhere, no --out and no --data-root."""
    models = tmp_path_factory.mktemp("models")
    _, siamese = build_tiny_models()
    siamese.save(str(models / "tiny.keras"))
    work = tmp_path_factory.mktemp("work")
    result = _command(["reid_keras.evaluate", "--model", str(models / "tiny.keras"), "--dataset", "synthetic",
                       "--dataset-option", "num_ids=12", "--no-plots", "--batch-size", "16"], cwd=work)
    return work, result


def test_evaluate_accepts_synthetic_and_ranks_its_held_out_ids(synthetic_evaluation):
    from reid_keras.data.datasets import load_dataset
    from reid_keras.metrics.features import load_features

    work, result = synthetic_evaluation
    assert result.returncode == 0, result.stderr[-3000:]
    out = work / "runs" / "eval" / "tiny-synthetic"
    metrics = json.loads((out / "metrics.json").read_text())
    dataset = load_dataset("synthetic", str(work / "data"), num_ids=12)
    assert metrics["num_query"] == len(dataset.query) and metrics["num_gallery"] == len(dataset.gallery)
    query, gallery = load_features(str(out / "features_query.npz")), load_features(str(out / "features_gallery.npz"))
    assert sorted(query.paths.tolist()) == sorted(r.path for r in dataset.query)
    ref = reference_ranking(query_features=query.features, gallery_features=gallery.features, query_pids=query.pids,
                            gallery_pids=gallery.pids, query_cams=query.camids, gallery_cams=gallery.camids)
    assert metrics["mAP"] == pytest.approx(ref["mAP"], abs=1e-6)
    assert metrics["rank1"] == pytest.approx(ref["cmc"][0], abs=1e-6)
    assert f"wrote {os.path.join('runs', 'eval', 'tiny-synthetic', 'metrics.json')}" in result.stdout


def test_evaluate_writes_only_under_runs_and_the_synthetic_data_folder(synthetic_evaluation):
    work, result = synthetic_evaluation
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(work)) == ["data", "runs"]
    assert os.listdir(work / "data") == ["synthetic"]
    assert os.listdir(work / "runs") == ["eval"]


def test_tensorflow_startup_lines_are_hidden_by_default(synthetic_evaluation):
    """The evaluation imported TensorFlow and ran a model: none of its start-up lines reached stderr, while
    the command's own note did."""
    _, result = synthetic_evaluation
    assert result.returncode == 0, result.stderr[-3000:]
    assert _startup_lines(result.stderr) == []
    assert "note: no preprocessing recorded for" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_output_of_evaluate(tmp_path):
    run = tmp_path / "runs" / "siamese_b0-synthetic-1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert evaluate_cli.default_output(str(run / "last.keras"), "market1501") == str(run / "eval_market1501")
    assert evaluate_cli.default_output(str(run / "export") + os.sep, "cuhk01") == str(run / "eval_cuhk01")
    elsewhere = tmp_path / "models" / "m.keras"
    assert evaluate_cli.default_output(str(elsewhere), "synthetic") == os.path.join("runs", "eval", "m-synthetic")
    assert evaluate_cli.default_output(str(tmp_path / "exported") + "/", "dukemtmc") == os.path.join(
        "runs", "eval", "exported-dukemtmc")


# --- the quiet-logging machinery, in process ------------------------------------------------------------

def test_a_users_own_log_level_or_verbose_turns_quieting_off(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert cli.quiet_tensorflow_logs([]) is False and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    assert cli.quiet_tensorflow_logs(["--model", "x", "--verbose"]) is False
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    for value, verbose in (("1", True), ("yes", True), ("0", False), ("", False), ("false", False)):
        monkeypatch.setenv(cli.VERBOSE_ENV, value)
        assert cli.verbose_requested([]) is verbose, value


def test_quiet_sets_the_level_and_leaves_the_already_imported_tensorflow_alone(monkeypatch):
    import logging

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    logger = logging.getLogger("tensorflow")
    monkeypatch.setattr(logger, "level", logger.level)
    before = list(sys.meta_path)
    assert cli.quiet_tensorflow_logs([]) is True
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == cli.QUIET_TF_LOG_LEVEL
    assert logger.level == logging.ERROR
    assert sys.meta_path == before  # tensorflow is imported in this session: no import hook left behind


def test_filtered_stderr_drops_startup_lines_and_keeps_everything_else(capfd):
    noise = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
             "I0000 00:00:1796490890.627538     683 port.cc:153] oneDNN custom operations are on. You may see\n"
             "2024-01-11 05:40:05.061907: I tensorflow/core/platform/cpu_feature_guard.cc:182] This TensorFlow\n")
    kept = ("W0000 00:00:1796490890.1  683 allocator.cc:1] Allocation of 1 exceeds 10% of free memory.\n"
            "E0000 00:00:1796490890.2  683 cuda_dnn.cc:8] Unable to register cuDNN factory\n"
            "a warning from Python\n")
    lines = (noise + kept).splitlines(keepends=True)
    with cli.filtered_stderr(cli._STARTUP_NOISE):
        for line in lines[::2]:  # interleaved, as file-descriptor writes (what C++ code and a real stderr do)
            os.write(2, line.encode())
        for line in lines[1::2]:
            os.write(2, line.encode())
    order = lines[::2] + lines[1::2]
    assert capfd.readouterr().err == "".join(line for line in order if line in kept)


# --- user-facing text cites docs/, and docs/ holds every section the code cites -------------------------

def _user_facing_files():
    files = [REPO / "README.md", REPO / "data" / "README.md", REPO / "ARCHITECTURE.md"]
    files += sorted((REPO / "docs").glob("*.md")) + sorted((REPO / "reid_keras").rglob("*.py"))
    return [f for f in files if f.exists()]


def test_no_user_facing_file_cites_the_shared_notes():
    offenders = [str(f.relative_to(REPO)) for f in _user_facing_files()
                 if re.search(r"\.\./shared|shared/(DATASETS|PROTOCOLS)\.md", f.read_text(encoding="utf-8"))]
    assert offenders == []


def test_every_cited_section_exists_in_docs():
    """"DATASETS.md §1" / "docs/datasets.md §1-5" / "PROTOCOLS.md (b)" anywhere in the repository's text must
    name a section of docs/datasets.md or docs/protocols.md (so citations can point at docs/)."""
    datasets = (REPO / "docs" / "datasets.md").read_text(encoding="utf-8")
    protocols = (REPO / "docs" / "protocols.md").read_text(encoding="utf-8")
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", datasets, flags=re.M)}
    letters = set(re.findall(r"^## \(([a-z])\) ", protocols, flags=re.M))
    assert sections == set(range(9)) and letters == set("abcdef")
    assert "## Common rules" in protocols
    files = _user_facing_files() + sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "experiments").glob("*.toml"))
    cited_sections, cited_letters = set(), set()
    for f in files:
        text = f.read_text(encoding="utf-8")
        for low, high in re.findall(r"(?:DATASETS|datasets)(?:\.md)? §(\d+)(?:-(\d+))?", text):
            cited_sections.update(range(int(low), int(high or low) + 1))
        cited_letters.update(re.findall(r"(?:PROTOCOLS|protocols)(?:\.md)? §?\(([a-z])\)", text))
    assert cited_sections and cited_letters
    assert cited_sections <= sections and cited_letters <= letters


def test_readme_links_the_docs_and_they_link_back():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "docs/datasets.md" in readme and "docs/protocols.md" in readme
    assert "docs/datasets.md" in (REPO / "data" / "README.md").read_text(encoding="utf-8")
    assert "](protocols.md)" in (REPO / "docs" / "datasets.md").read_text(encoding="utf-8")
    assert "](datasets.md)" in (REPO / "docs" / "protocols.md").read_text(encoding="utf-8")


def test_command_outputs_are_git_ignored():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["runs/x/config.json", "runs/eval/m-synthetic/metrics.json", "data/synthetic/SYNTHETIC.json",
             "exported/saved_model.pb", "eval_market1501/metrics.json", "experiments/results/e_smoke.md"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(paths)
    kept = subprocess.run(["git", "check-ignore", "data/README.md", "docs/datasets.md", "README.md"], cwd=REPO,
                          capture_output=True, text=True)
    assert kept.stdout.split() == []
