"""Config loading and validation: every shipped config loads; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from funkflow.pipeline.app.cli import main
from funkflow.pipeline.core.config import Config, default_config_path, load_config
from funkflow.pipeline.core.errors import EXIT_CONFIG, ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"default.yaml"}
    assert default_config_path().read_text() == (Path(__file__).parents[1] / "configs" / "default.yaml").read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_key_of_a_shipped_config_has_a_comment(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"{path.name}:{number} has no comment: {line!r}"


def test_set_overrides_nested_keys():
    config = load_config(None, ["train.epochs=5", "model.k=16", "model.use_bias=false", "cluster.scheduler=inprocess"])
    assert (config.train.epochs, config.model.k, config.model.use_bias) == (5, 16, False)
    assert config.cluster.scheduler == "inprocess"


@pytest.mark.parametrize("override,needle", [
    ("train.epoch=5", "train.epoch (--set train.epoch=5): unknown key; valid keys here: epochs, lr"),
    ("modle.k=3", "modle (--set modle.k=3): unknown key; valid keys here: data, split, model"),
    ("model.k=-1", "model.k (--set model.k=-1): Input should be greater than or equal to 1, got -1"),
    ("train.lr=fast", "train.lr (--set train.lr=fast): Input should be a valid number"),
    ("train.lr_schedule=adam", "train.lr_schedule (--set train.lr_schedule=adam): Input should be 'bold_driver', "
                               "'constant', 'decay' or 'given'"),
    ("split.test_fraction=0.97", "(--set split.test_fraction=0.97): split.test_fraction + split.validation_fraction "
                                 "must be < 1"),
    ("data.generate.k_true=0", "data.generate.k_true (--set data.generate.k_true=0): Input should be greater than"),
])
def test_bad_key_or_value_names_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value)


def test_a_bad_value_in_the_file_is_the_file_s_and_one_from_set_is_set_s(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  k: -3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.epochs=0"])
    assert f"model.k ({path}): Input should be greater than or equal to 1" in str(info.value)
    assert "train.epochs (--set train.epochs=0): Input should be greater than or equal to 1" in str(info.value)


def test_yaml_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_config(path)


def test_cli_exits_78_naming_the_key(capsys, tmp_path):
    code = main(["run", "--set", "train.epoch=3", "--run-dir", str(tmp_path / "run")])
    assert code == EXIT_CONFIG
    assert "train.epoch (--set train.epoch=3): unknown key" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_usage_error_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["run", "--no-such-flag"])
    assert info.value.code == 2


def test_impossible_generator_shape_is_a_config_error(capsys, tmp_path):
    code = main(["run", "--set", "data.generate.n_ratings=10", "--set", "data.generate.n_users=100",
                 "--run-dir", str(tmp_path / "run")])
    assert code == EXIT_CONFIG
    assert "data.generate: n_ratings=10 cannot be spread" in capsys.readouterr().err


def test_shipped_configs_by_name_listed_by_funkflow_configs(capsys):
    from funkflow.pipeline.core.config import shipped_configs

    assert main(["configs"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in out]
    assert listed == ["cluster-example", "default", "movielens", "netflix-like"] == list(shipped_configs())
    # Each description is its header's whole first sentence, however many lines it spans.
    assert all(line.endswith(".") for line in out)
    assert "after `funkflow ingest ratings.csv --format movielens --out data/ml`." in out[2]
    assert load_config("movielens") == load_config(default_config_path().parent / "movielens.yaml")
    with pytest.raises(ConfigError, match="nosuch: no such file, nor a shipped config .*movielens"):
        load_config("nosuch")
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("funkflow ")


def test_data_source_on_the_command_line_replaces_the_configs_generated_data():
    assert load_config(None).data.generate is not None  # the demo generates its data
    config = load_config(None, ["data.source=data/ml"])
    assert config.data.source == "data/ml" and config.data.generate is None
    with pytest.raises(ConfigError, match="set exactly one of data.source"):
        load_config(None, ["data.source=data/ml", "data.generate.seed=3"])  # both named: still one too many


def test_the_package_installs_under_its_own_name_only():
    """pipeline/ and tasks/ install as funkflow.pipeline and funkflow.tasks: no top-level name to clash with."""
    import importlib.metadata
    import subprocess
    import sys

    top_level = importlib.metadata.distribution("funkflow").read_text("top_level.txt").split()
    assert top_level == ["funkflow"]
    # In a fresh interpreter away from the checkout (``python -m pytest`` puts the checkout on sys.path).
    probe = ("import importlib.util as u, funkflow.pipeline.app.cli, funkflow.tasks.kernels; "
             "print(u.find_spec('pipeline'), u.find_spec('tasks'))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parent)
    assert found.stdout.split() == ["None", "None"]
    version = subprocess.run([sys.executable, "-m", "funkflow", "--version"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent)
    assert version.stdout.startswith("funkflow ")


def test_the_command_line_loads_dask_and_numba_only_for_the_verbs_that_run_them():
    """`funkflow --help`, `configs` and the argument errors answer without importing the heavy verbs."""
    import subprocess
    import sys

    probe = ("import sys; from funkflow.pipeline.app.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('numba', 'distributed', 'dask') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_every_option_of_every_verb_has_help():
    import argparse

    from funkflow.pipeline.app.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for verb, sub in action.choices.items():
                    walk(sub, verb)
            elif action.help is None:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "funkflow")
    assert not missing


def test_global_flags_after_the_verb(capsys):
    from funkflow.pipeline.app.cli import build_parser

    args = build_parser().parse_args(["configs", "-q", "--log-format", "json"])
    assert args.quiet and args.log_format == "json"
    args = build_parser().parse_args(["-q", "configs"])
    assert args.quiet and args.log_format == "text"


@pytest.mark.parametrize("n_workers,threads,expected", [(None, None, (1, 8)), (2, None, (2, 4)), (None, 2, (4, 2)),
                                                          (3, 1, (3, 1)), (16, None, (16, 1)), (None, 16, (1, 16))])
def test_a_local_cluster_fills_the_cores_with_one_process_unless_told(monkeypatch, n_workers, threads, expected):
    """Item blocks pass between the threads of one process by reference: one worker with every core is the default."""
    from funkflow.pipeline.core.cluster import local_shape

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    overrides = [f"cluster.n_workers={n_workers or 'null'}", f"cluster.threads_per_worker={threads or 'null'}"]
    assert local_shape(load_config(None, overrides).cluster) == expected


def test_every_flag_that_takes_a_value_says_its_default():
    import argparse

    from funkflow.pipeline.app.cli import build_parser

    def silent(parser: argparse.ArgumentParser, verb: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [flag for name, sub in action.choices.items() for flag in silent(sub, name)]
            elif (action.option_strings and action.nargs != 0 and not action.required
                  and "default" not in (action.help or "")):
                found.append(f"{verb} {action.option_strings[-1]}")
        return found

    assert silent(build_parser(), "funkflow") == []
