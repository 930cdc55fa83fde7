"""The typed run configuration: defaults, YAML loading, ``--set`` overrides, validation.

Everything is validated here, before any task is submitted. An error names the
dotted key, the bad value and what would be valid, and exits 78.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from funkflow.pipeline.core.errors import ConfigError

# The layouts ingest reads, and what it does with a (user, item) pair rated twice.
RawFormat = Literal["netflix", "movielens", "csv", "parquet"]
FORMATS: tuple[str, ...] = get_args(RawFormat)
DuplicatePolicy = Literal["keep_last", "keep_first", "mean", "error"]
DUPLICATE_POLICIES: tuple[str, ...] = get_args(DuplicatePolicy)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerateConfig(_Section):
    """Synthetic Netflix-shaped data; unset shape keys follow ``scale``, unset model keys the generator's defaults."""

    scale: float = Field(0.01, gt=0)
    seed: int = 0
    n_users: int | None = Field(None, ge=2)
    n_items: int | None = Field(None, ge=2)
    n_ratings: int | None = Field(None, ge=1)
    k_true: int | None = Field(None, ge=1)
    noise_std: float | None = Field(None, gt=0)
    activity_sigma: float | None = Field(None, ge=0)
    popularity_sigma: float | None = Field(None, ge=0)
    max_user_fraction: float | None = Field(None, gt=0, le=1)
    rating_step: float = 1.0  # 1: whole stars; 0.5: half stars from 0.5, as MovieLens has
    ratings_per_part: int = Field(2_000_000, ge=1000)


class IngestConfig(_Section):
    """How ``data.source`` is read when ``data.format`` is not canonical (as ``funkflow ingest``'s flags)."""

    rating_scale: tuple[float, float] | None = None
    user_col: str | None = None
    item_col: str | None = None
    rating_col: str | None = None
    time_col: str | None = None
    delimiter: str | None = None
    duplicates: DuplicatePolicy = "keep_last"
    rejects: Path | None = None


class DataConfig(_Section):
    source: str | list[str] | None = None
    format: Literal["canonical", RawFormat] = "canonical"
    ingest: IngestConfig = IngestConfig()
    generate: GenerateConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.source is None) == (self.generate is None):
            raise ValueError("set exactly one of data.source (a dataset directory, or files to ingest with "
                             "data.format) and data.generate")
        if self.format == "canonical" and isinstance(self.source, list):
            raise ValueError("data.source: a canonical dataset is one directory; a list needs data.format")
        return self

    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source or [])

    def dataset_dir(self) -> str:
        """The dataset directory of ``format: canonical`` (one directory, as validated)."""
        assert isinstance(self.source, str), "a canonical data.source is one directory"
        return self.source


class SplitConfig(_Section):
    method: Literal["hash", "per_user", "time", "given"] = "hash"
    test_fraction: float = Field(0.1, gt=0, lt=1)
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    seed: int = 0
    test_per_user: int = Field(2, ge=1)
    validation_per_user: int = Field(1, ge=0)
    cutoff: str | int | None = None
    test_source: str | None = None

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError("split.test_fraction + split.validation_fraction must be < 1 to leave training data")
        if self.method == "given" and self.test_source is None:
            raise ValueError("split.method given needs split.test_source: the test ratings' files, or a dataset "
                             "ingested with --id-maps of the training data")
        if self.method == "time":
            if self.cutoff is None:
                raise ValueError("split.method time needs split.cutoff (a date such as 2005-06-01, or Unix seconds)")
            self.cutoff_seconds()
        return self

    def cutoff_seconds(self) -> int | None:
        """``cutoff`` as Unix seconds (an ISO date or date-time is read as UTC)."""
        if self.cutoff is None or isinstance(self.cutoff, int):
            return self.cutoff
        try:
            return int(np.datetime64(self.cutoff, "s").astype(np.int64))
        except ValueError:
            raise ValueError(f"split.cutoff: {self.cutoff!r} is not a date (YYYY-MM-DD[THH:MM:SS])") from None


class ModelConfig(_Section):
    k: int = Field(32, ge=1)
    use_bias: bool = True
    reg: float = Field(0.05, ge=0)
    bias_reg: float = Field(0.01, ge=0)
    init_std: float = Field(0.1, gt=0)


class TrainConfig(_Section):
    epochs: int = Field(20, ge=1)
    lr: float = Field(0.01, gt=0)
    lr_schedule: Literal["bold_driver", "constant", "decay", "given"] = "bold_driver"
    lr_decay: float = Field(0.95, gt=0, le=1)
    lr_steps: list[float] | None = None
    d: int | Literal["auto"] = "auto"
    order: Literal["user_runs", "ratings", "sorted"] = "user_runs"
    users_per_run: int = Field(1024, ge=1)
    tile_items: int = Field(1024, ge=0)
    seed: int = 0
    early_stopping_patience: int = Field(3, ge=0)
    refit: bool = False
    max_rollbacks: int = Field(3, ge=0)
    checkpoint_every: int = Field(1, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    init_from: str | None = None

    @model_validator(mode="after")
    def _given_steps(self) -> TrainConfig:
        if self.lr_schedule == "given":
            if not self.lr_steps or len(self.lr_steps) < self.epochs or min(self.lr_steps) <= 0:
                raise ValueError(f"lr_schedule: given needs train.lr_steps, a positive step size for each of the "
                                 f"{self.epochs} epochs (got {len(self.lr_steps or [])})")
            if self.lr != self.lr_steps[0]:
                raise ValueError(f"lr_schedule: given starts at train.lr_steps[0] = {self.lr_steps[0]:g}: set "
                                 f"train.lr to it (got {self.lr:g})")
        elif self.lr_steps is not None:
            raise ValueError("train.lr_steps is for lr_schedule: given")
        return self

    @field_validator("d", mode="before")
    @classmethod
    def _auto_or_positive(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be auto or a whole number >= 1, got {value!r}")


class TLSConfig(_Section):
    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _all_or_none(self) -> TLSConfig:
        given = [k for k in ("ca_file", "cert", "key") if getattr(self, k) is not None]
        if given and len(given) < 3:
            raise ValueError("cluster.tls needs ca_file, cert and key together")
        return self


class EvaluateConfig(_Section):
    ranking_k: int = Field(10, ge=1)
    relevance_threshold: float = 4.0
    ranking_users: int = Field(10_000, ge=0)


# What `funkflow tune` may search (tune.space's keys) and the config key each sets.
TUNABLE = {"k": "model.k", "reg": "model.reg", "bias_reg": "model.bias_reg", "init_std": "model.init_std",
           "lr": "train.lr"}


class TuneConfig(_Section):
    trials: int = Field(30, ge=1)
    seed: int = 0
    min_epochs: int = Field(6, ge=1)
    max_epochs: int = Field(60, ge=1)
    reduction: int = Field(3, ge=2)
    time_budget: float | None = Field(None, gt=0)
    space: dict[str, tuple[float, float]] = {"k": (8, 128), "reg": (0.005, 0.3), "bias_reg": (0.001, 0.1),
                                             "lr": (0.002, 0.05)}

    @model_validator(mode="after")
    def _searchable(self) -> TuneConfig:
        for key, (low, high) in self.space.items():
            if key not in TUNABLE:
                raise ValueError(f"tune.space.{key}: not a searchable key ({', '.join(TUNABLE)})")
            if not 0 < low <= high:
                raise ValueError(f"tune.space.{key}: needs 0 < low <= high (a log-uniform range), got "
                                 f"[{low}, {high}]")
        if self.min_epochs > self.max_epochs:
            raise ValueError("tune.min_epochs must be <= tune.max_epochs")
        return self


class ClusterConfig(_Section):
    scheduler: str | None = None
    scheduler_file: str | None = None
    tls: TLSConfig = TLSConfig()
    check_versions: bool = True
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    timeout: float = Field(30.0, gt=0)
    allowed_failures: int = Field(3, ge=0)
    dashboard: str = "127.0.0.1:0"

    @model_validator(mode="after")
    def _one_scheduler(self) -> ClusterConfig:
        if self.scheduler is not None and self.scheduler_file is not None:
            raise ValueError("set at most one of cluster.scheduler and cluster.scheduler_file")
        return self


class OutputConfig(_Section):
    run_dir: str = "runs/default"
    checkpoints: str | None = None


class Config(_Section):
    data: DataConfig = DataConfig(generate=GenerateConfig())
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneConfig = TuneConfig()
    cluster: ClusterConfig = ClusterConfig()
    output: OutputConfig = OutputConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def value(self, key: str) -> Any:
        """The value of a dotted key (``model.k``)."""
        node: Any = self.to_dict()
        for part in key.split("."):
            node = node[part]
        return node

    def refit_values(self, steps: list[float]) -> dict[str, Any]:
        """The keys that turn this config into its refit: the validation ratings train too, without early
        stopping, for as many epochs as ``steps`` and at those step sizes, the ones the training that chose
        them (with validation) took up to the epoch it kept. Without validation the bold driver would follow
        the training loss instead and grow the step every epoch: another model than the one scored. The test
        ratings stay the same: every split method draws them before validation."""
        key = "split.validation_per_user" if self.split.method == "per_user" else "split.validation_fraction"
        return {key: 0, "train.epochs": len(steps), "train.early_stopping_patience": 0, "train.refit": False,
                "train.lr": steps[0], "train.lr_schedule": "given", "train.lr_steps": list(steps)}

    def with_values(self, values: dict[str, Any]) -> Config:
        """This config with dotted keys set to values: Python objects, never YAML text to parse again (a path
        with ``" #"`` in it, or a value YAML reads as a date, stays what it is). Validated; errors name the key."""
        data = self.to_dict()
        for key, value in values.items():
            *sections, name = key.split(".")
            node = data
            for section in sections:
                child = node.get(section)
                if not isinstance(child, dict):
                    child = node[section] = {}
                node = child
            node[name] = value
        try:
            return Config.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc.errors(), "the values given")) from None

    def with_absolute_paths(self) -> Config:
        """This config with every local path made absolute against this process's working directory. Workers
        have working directories of their own, so a relative path must not reach them (fsspec URLs stay as
        they are)."""
        def absolute(path: str | None) -> str | None:
            return path if path is None or "://" in path else str(Path(path).expanduser().absolute())

        values: dict[str, Any] = {}
        if self.data.source is not None:
            values["data.source"] = (absolute(self.data.source) if isinstance(self.data.source, str)
                                     else [absolute(s) for s in self.data.source])
        for key in ("split.test_source", "train.init_from", "output.run_dir", "output.checkpoints",
                    "data.ingest.rejects", "cluster.scheduler_file"):
            value = self.value(key)
            if value is not None:
                values[key] = absolute(str(value))
        return self.with_values(values)

    def fingerprint(self, *sections: str) -> str:
        """SHA-256 of the named sections (all when none), for stage up-to-date checks."""
        data = self.to_dict()
        picked = {name: data[name] for name in (sections or tuple(data))}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


DEFAULT_CONFIG = "default.yaml"


def default_config_path() -> Path:
    """``configs/default.yaml``, shipped inside the package as ``funkflow.configs``."""
    return Path(str(resources.files("funkflow.configs") / DEFAULT_CONFIG))


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with funkflow by name (``movielens`` for ``configs/movielens.yaml``)."""
    folder = Path(str(resources.files("funkflow.configs")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_description(path: Path) -> str:
    """The first sentence of a config file's leading comment, whole however many lines it spans."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(part for part in lines if part)
    end = re.search(r"\.(\s|$)", text)
    return text[:end.start() + 1] if end else text


def config_path(name_or_path: str | Path) -> Path:
    """A config file: a path, or the name of a shipped one (``funkflow run movielens``)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    shipped = shipped_configs()
    if str(name_or_path) not in shipped:
        raise ConfigError(f"{name_or_path}: no such file, nor a shipped config ({', '.join(shipped)}); "
                          "`funkflow configs` lists them")
    return shipped[str(name_or_path)]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b.c=VALUE`` (VALUE parsed as a YAML scalar) to ``data`` in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set takes KEY=VALUE with a dotted key, e.g. train.epochs=5; got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from exc
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _field_names(loc: tuple) -> list[str]:
    """The valid keys at the section that ``loc`` points into."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next(a for a in candidates if issubclass(a, BaseModel))
    return list(model.model_fields)


def _describe(errors: Sequence[Any], source: str, overrides: Sequence[str] = ()) -> str:
    """One line per error, each naming where the bad value came from: the ``--set`` that gave it, or the
    config file."""
    lines = []
    for err in errors:
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        given = next((a for a in reversed(overrides) if _covers(a.partition("=")[0], key)), None)
        where = f"--set {given}" if given else source
        if err["type"] == "extra_forbidden":
            lines.append(f"{key} ({where}): unknown key; valid keys here: {', '.join(_field_names(loc))}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key} ({where}): {msg}, got {err['input']!r}"
                         if "input" in err and err["type"] != "value_error" else f"{key} ({where}): {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _covers(assigned: str, key: str) -> bool:
    """Whether a ``--set`` of dotted key ``assigned`` gave the value at ``key`` (itself, or a part of it)."""
    return key == assigned or key.startswith(assigned + ".") or assigned.startswith(key + ".")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (the shipped default when ``path`` is None), apply overrides, validate."""
    path = config_path(path) if path is not None else default_config_path()
    data = _read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    keys = [assignment.partition("=")[0] for assignment in overrides]
    if "data.source" in keys and not any(k == "data.generate" or k.startswith("data.generate.") for k in keys):
        # Data named on the command line replace a config's generated data, without --set data.generate=null.
        data.setdefault("data", {})["generate"] = None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors(), str(path), overrides)) from None


def differences(saved: Any, current: Any, saved_as: str, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts, each as a line naming both values:
    ``"model.k: <saved_as> 8, config has 4"``."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for key in sorted(set(saved) | set(current))
                for line in differences(saved.get(key), current.get(key), saved_as, f"{prefix}{key}.")]
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved_as} {saved!r}, config has {current!r}"]


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
