"""The run config: YAML validated by pydantic, overridable from the command line.

Every section is strict: an unknown key, a wrong type or an out-of-range value becomes one
`CardkitError` line that names the key, the value given and what is valid.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (AfterValidator, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, ValidationError,
                      field_validator, model_validator)

from cardkit.attacks import ATTACK_CONFIGS, ATTACKS, AutoAttackConfig, PGDAttackConfig
from cardkit.config_base import Section
from cardkit.errors import CardkitError
from cardkit.numbers import Number
from cardkit.registry import import_module
from cardkit.objectives import OBJECTIVE_CONFIGS, OBJECTIVES, NaturalConfig, settled
from cardkit.objectives.augment import AUGMENT_CONFIGS, DOMAIN_CONFIGS, AugmentConfig
from cardkit.prune import METHOD_CONFIGS
from cardkit.prune.methods import METHODS

# Tagged unions over the registries as they stand when a config is validated (plugins included).
ObjectiveConfig = OBJECTIVES.field
AttackConfig = ATTACKS.field
MethodConfig = METHODS.field

TRAIN_STAGES = ("pretrain", "prune", "finetune")
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000  # keys and values after aliases expand; configs hold a few hundred
STAGES = TRAIN_STAGES + ("evaluate",)


class ThreatConfig(Section):
    norm: Literal["linf", "l2"] = "linf"
    eps: Number = Field(0.1, ge=0)


class DataConfig(Section):
    name: str = "digits"
    data_dir: str = "data"
    download: bool = True
    train_size: Optional[PositiveInt] = None
    val_size: NonNegativeInt = 0
    test_size: Optional[PositiveInt] = None
    train_files: Optional[list[str]] = None
    val_files: Optional[list[str]] = None
    test_files: Optional[list[str]] = None
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 500
    crop_padding: NonNegativeInt = 0
    hflip: bool = False

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from cardkit.data.registry import canonical_name

        return _as_value_error(canonical_name, name)


class ModelConfig(Section):
    name: str = "cnn_small"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    channels_last: bool = True  # measured faster on CPU for every conv net but cnn_small (equal there)
    compile: bool = False

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from cardkit.models.registry import lookup_model

        _as_value_error(lookup_model, name)
        return name

    @field_validator("kwargs")
    @classmethod
    def _options_only(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        from cardkit.models.registry import DATA_KEYWORDS

        given = [k for k in DATA_KEYWORDS if k in kwargs]
        if given:
            raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set by the dataset "
                             f"({', '.join(DATA_KEYWORDS)} all are); remove {'it' if len(given) == 1 else 'them'} "
                             f"from model.kwargs")
        return kwargs


class OptimizerConfig(Section):
    name: Literal["sgd", "adam"] = "sgd"
    lr: Number = Field(0.1, gt=0)
    momentum: Number = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 5e-4
    betas: tuple[Number, Number] = (0.9, 0.999)


class ScheduleConfig(Section):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: NonNegativeFloat = 0.0
    milestones: list[PositiveInt] = Field(default_factory=list)  # epochs, for `step`
    gamma: Number = Field(0.1, gt=0, le=1)
    min_lr: NonNegativeFloat = 0.0


class TrainStageConfig(Section):
    epochs: PositiveInt = 10
    # null: pretrain trains naturally; prune and finetune inherit the pretrain objective, its
    # ramp-ups settled (robust pruning keeps the pretraining objective, Sehwag et al. 2019)
    objective: Optional[ObjectiveConfig] = None
    augment: Optional[AugmentConfig] = None  # augmix or gaussian noise, around the objective
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: Optional[Number] = Field(None, gt=0)
    checkpoint_every: NonNegativeInt = 0  # optimizer steps between mid-epoch checkpoints; 0: epoch ends only
    eval_samples: Optional[PositiveInt] = 1000  # per-epoch evaluation subset; null: the whole split
    eval_pgd_steps: NonNegativeInt = 0  # > 0: also measure PGD accuracy each epoch and pick the best by it


class PruneStageConfig(TrainStageConfig):
    """The prune stage: each method of the list is one variant pruned from the same pretrained
    model; methods that train (HYDRA's scores) use this stage's epochs, objective and optimizer."""

    methods: list[MethodConfig] = Field(default_factory=list)
    # the pretrain checkpoint every variant starts from; null: the one evaluated (evaluate.checkpoint)
    start_from: Optional[Literal["last", "best"]] = None


class CorruptionEvalConfig(Section):
    """Accuracy under common corruptions (off while `names` is empty)."""

    names: list[str] = Field(default_factory=list)  # corruption names, or "benchmark" (the 15), "all"
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    suite: Optional[str] = None  # folder of official <corruption>.npy files; default: generated
    seed: NonNegativeInt = 0  # of the generated corruptions
    baseline: Optional[str] = None  # corruption.json of a baseline model, for mCE

    @field_validator("names")
    @classmethod
    def _known_names(cls, names: list[str]) -> list[str]:
        from cardkit.corrupt import expand_names

        return _as_value_error(expand_names, names)

    @field_validator("severities")
    @classmethod
    def _valid_severities(cls, severities: list[int]) -> list[int]:
        from cardkit.corrupt import check_severity

        if not severities:
            raise ValueError("give at least one severity from 1 to 5")
        return [_as_value_error(check_severity, s) for s in severities]


def _known_bound(method: str) -> str:
    from cardkit.certify.verify import BOUNDS

    return _as_value_error(BOUNDS.canonical, method)


BoundName = Annotated[str, AfterValidator(_known_bound)]


class EvaluateConfig(Section):
    @model_validator(mode="before")
    @classmethod
    def _one_pgd_attack(cls, data):
        """`attack: {steps, restarts, ...}`, written before attack lists existed, is one PGD attack
        (a stored run's old `attack` gives way to an `attacks` list set on top of it)."""
        if isinstance(data, dict) and isinstance(data.get("attack"), dict):
            attacks = data.get("attacks", [{"name": "pgd", **data["attack"]}])
            data = {**{k: v for k, v in data.items() if k != "attack"}, "attacks": attacks}
        return data

    split: Literal["test", "val"] = "test"
    samples: Optional[PositiveInt] = None
    checkpoint: Literal["last", "best"] = "last"
    # run in order, each on the points every earlier attack failed on (RobustBench's bookkeeping)
    attacks: list[AttackConfig] = Field(default_factory=lambda: [PGDAttackConfig(), AutoAttackConfig()])
    verify: list[BoundName] = Field(default_factory=list)  # Linf bound methods: ibp, crown_ibp, crown
    verify_eps: Optional[Number] = Field(None, ge=0)  # default: the threat's eps
    corruption: CorruptionEvalConfig = Field(default_factory=CorruptionEvalConfig)


class RunConfig(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")  # one folder under output_dir
    # modules imported before the rest is validated: they register methods, objectives, datasets,
    # attacks or models of their own
    plugins: list[str] = Field(default_factory=list)
    seed: NonNegativeInt = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    threads: Optional[PositiveInt] = None  # intra-op threads per process; null: cores / local processes
    # training steps under autocast (fp16 with a loss scaler); evaluation and bounds stay fp32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch, not each shard
    output_dir: str = "runs"
    pipeline: list[Literal[STAGES]] = Field(default_factory=lambda: ["pretrain", "evaluate"], min_length=1)
    threat: ThreatConfig = Field(default_factory=ThreatConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: TrainStageConfig = Field(default_factory=TrainStageConfig)
    prune: PruneStageConfig = Field(default_factory=PruneStageConfig)
    finetune: TrainStageConfig = Field(default_factory=TrainStageConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        return folder_name(name)

    @model_validator(mode="after")
    def _inherit_objectives(self):
        """An unset objective: natural for pretraining, the pretraining objective afterwards."""
        if self.pretrain.objective is None:
            self.pretrain.objective = NaturalConfig()
        for stage in (self.prune, self.finetune):
            if stage.objective is None:
                stage.objective = settled(self.pretrain.objective)
        return self

    @model_validator(mode="after")
    def _check_pipeline(self):
        if len(set(self.pipeline)) != len(self.pipeline):
            raise ValueError(f"pipeline lists a stage twice: {self.pipeline}")
        if self.pipeline != sorted(self.pipeline, key=STAGES.index):
            raise ValueError(f"pipeline stages must come in the order {' -> '.join(STAGES)}, "
                             f"got {self.pipeline}")
        if "finetune" in self.pipeline and "prune" not in self.pipeline:
            raise ValueError("the finetune stage keeps the masks of a prune stage, but the pipeline "
                             f"has none: {self.pipeline}; add prune before finetune")
        if "prune" in self.pipeline and not self.prune.methods:
            raise ValueError("the prune stage needs at least one method: set prune.methods, e.g. "
                             "[{name: hydra, sparsity: 0.9}]")
        if "prune" in self.pipeline and "pretrain" not in self.pipeline:
            raise ValueError("the prune stage prunes the pretrained model: put pretrain before it, "
                             "or prune a saved model with `cardkit prune --checkpoint DIR`")
        if self.evaluate.verify and self.threat.norm != "linf" and self.evaluate.verify_eps is None:
            raise ValueError("evaluate.verify bounds Linf balls but the threat is l2; set "
                             "evaluate.verify_eps to the Linf radius to verify")
        labels = [m.label for m in self.prune.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"prune.methods lists the same method and sparsity twice: {labels}")
        if self.evaluate.split == "val" and self.data.val_size == 0 and not self.data.val_files:
            raise ValueError("evaluate.split is 'val' but the data has no validation split: "
                             "set data.val_size or data.val_files")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def folder_name(name: str) -> str:
    """A run name is one folder under output_dir: `.` and `..` would be output_dir or its parent."""
    if set(name) == {"."}:
        raise ValueError("a run name of only dots names output_dir itself or its parent; give a "
                         "folder name such as mnist-hydra")
    return name


def _as_value_error(check, value):
    """Registry lookups raise CardkitError; pydantic reports ValueErrors with the key's location."""
    try:
        return check(value)
    except CardkitError as err:
        raise ValueError(str(err)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when path is None), apply `key.path=value` overrides,
    and validate."""
    raw = _relative_to_file(_read_yaml(Path(path)), Path(path)) if path is not None else {}
    return resolve_paths(validate_config(raw, overrides))


# Data paths a config names, relative to the config file's folder when written in it (run folders,
# output_dir and a corruption baseline among them, stay relative to the working folder).
_PATH_KEYS = (("data", "data_dir"), ("evaluate", "corruption", "suite"))


def _relative_to_file(raw: dict, path: Path) -> dict:
    """A relative path written in a config file is read from the file's folder, so that the config
    means the same data whatever folder it is run from."""
    for keys in _PATH_KEYS:
        section = raw
        for key in keys[:-1]:
            section = section.get(key) if isinstance(section, dict) else None
        value = section.get(keys[-1]) if isinstance(section, dict) else None
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            section[keys[-1]] = str(path.parent / value)
    return raw


def resolve_paths(config: RunConfig) -> RunConfig:
    """Data paths made absolute (a path from the command line or a default against the working
    folder), so that the run folder's stored config finds its data from any folder later."""
    data, corruption = config.data, config.evaluate.corruption
    data.data_dir = str(Path(data.data_dir).expanduser().resolve())
    for key in ("suite", "baseline"):
        if getattr(corruption, key) is not None:
            setattr(corruption, key, str(Path(getattr(corruption, key)).expanduser().resolve()))
    return config


def validate_config(raw: dict, overrides: list[str] = ()) -> RunConfig:
    if overrides:
        defaults = _validate(raw).model_dump(mode="python")
        for item in overrides:
            _apply_override(raw, defaults, item)
    return _validate(raw)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise CardkitError(f"config file '{path}' does not exist; give the path of a YAML file "
                           f"(e.g. configs/quickstart.yaml)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CardkitError(f"config file '{path}' has {path.stat().st_size:,} bytes, more than a config "
                           f"holds ({MAX_CONFIG_BYTES:,}); give the YAML config, not a data file")
    try:
        text = path.read_text()
        _check_expanded_size(yaml.compose(text), path)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise CardkitError(f"config file '{path}' is not valid YAML{line}: "
                           f"{getattr(err, 'problem', err)}") from None
    except UnicodeDecodeError:
        raise CardkitError(f"config file '{path}' is not a text YAML file") from None
    if raw is None:
        raise CardkitError(f"config file '{path}' is empty; write the sections of a run in it (data:, "
                           f"model:, pretrain:, ...), e.g. start from configs/quickstart.yaml")
    if not isinstance(raw, dict):
        raise CardkitError(f"config file '{path}' must hold a mapping of sections "
                           f"(data:, model:, ...), got a {type(raw).__name__}")
    return raw


def _check_expanded_size(root: yaml.Node | None, path: Path) -> None:
    """Refuse a file whose aliases expand to more values than any config has (a "billion laughs"
    file of a few lines expands to 10^9): the size is counted on the node graph, unexpanded."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a recursive alias counts once
            children = node.value if isinstance(node.value, list) else []
            items = [n for pair in children for n in pair] if isinstance(node, yaml.MappingNode) else children
            sizes[id(node)] = 1 + sum(size(child) for child in items)
        return sizes[id(node)]

    if root is not None and size(root) > MAX_CONFIG_VALUES:
        raise CardkitError(f"config file '{path}' expands to more than {MAX_CONFIG_VALUES:,} values through "
                           f"its aliases (&name / *name); write the config out without nested aliases")


def _apply_override(raw: dict, defaults: dict, item: str) -> None:
    """Set `a.b.c=value` in raw; missing levels are filled from the defaults, so a key can be
    overridden without restating its section. The value is parsed as YAML (numbers, booleans,
    lists) and type-checked by validation afterwards."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise CardkitError(f"--set expects section.key=value, got '{item}'")
    parts = key.strip().split(".")
    node, default = raw, defaults
    for depth, part in enumerate(parts[:-1]):
        default = default.get(part) if isinstance(default, dict) else None
        if not isinstance(node.get(part), dict):
            if not isinstance(default, dict):
                path = ".".join(parts[:depth + 1])
                raise CardkitError(f"--set {item}: '{path}' is not a config section; "
                                   f"valid sections: {', '.join(sorted(k for k, v in defaults.items() if isinstance(v, dict)))}")
            node[part] = dict(default)
        node = node[part]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        if text.strip()[:1] not in ("[", "{", "'", '"'):
            node[parts[-1]] = text  # a plain string YAML reads otherwise ("...", "%x"), as written
            return
        where = getattr(err, "problem_mark", None)
        column = f" at column {where.column + 1}" if where else ""
        raise CardkitError(f"--set {item}: the value is not valid YAML{column} "
                           f"({getattr(err, 'problem', None) or err}); write lists as [a, b], sections as "
                           f"{{key: value}} and quote strings with special characters") from None
    node[parts[-1]] = value


def _validate(raw: dict) -> RunConfig:
    import_plugins(raw.get("plugins") if isinstance(raw, dict) else None)
    return validate_section(RunConfig, raw)


def import_plugins(modules) -> None:
    """Import each module a config's `plugins:` names (importing registers what it defines)."""
    if modules is None:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) and m.strip() for m in modules):
        raise CardkitError(f"plugins: given {modules!r}; give a list of importable module names, "
                           f"e.g. [mypackage.methods]")
    for module in modules:
        import_module(module, "plugins")


def validate_section(root: type[Section], raw: dict):
    """`root` validated from `raw`, or a CardkitError with one line on the first problem."""
    try:
        return root.model_validate(raw)
    except ValidationError as err:
        raise CardkitError(_describe(err, raw, root)) from None


def _describe(err: ValidationError, raw: dict, root: type[Section]) -> str:
    """One line for the first error: key, value given, what is valid."""
    errors = err.errors()
    first = errors[0]
    raw_loc = [str(p) for p in first["loc"]]
    # Tagged unions add the tag to the location (pretrain.objective.pgd_at.steps): drop it.
    loc = [p for i, p in enumerate(raw_loc) if not _is_tag(raw_loc[:i], p)]
    key = ".".join(loc) or "config"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    kind = first["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(raw_loc[:-1], root)
        close = difflib.get_close_matches(loc[-1], valid, n=2)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        return f"unknown config key '{key}'; {hint}valid keys here: {', '.join(valid)}{more}"
    if kind == "union_tag_invalid":
        owner = loc[-2] if loc[-1].isdigit() and len(loc) > 1 else loc[-1]
        what = {"objective": "objective", "augment": "augmentation", "domain": "domain",
                "attacks": "attack"}.get(owner, "pruning method")
        names = [c.model_fields["name"].default for c in _tagged_configs(loc)]
        given = first["input"].get("name") if isinstance(first["input"], dict) else first["input"]
        close = difflib.get_close_matches(str(given), names, n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"{key}.name: unknown {what} {given!r}; valid: {', '.join(names)}{hint}{more}"
    message = first["msg"].removeprefix("Value error, ")
    if kind == "value_error" and not loc:
        return f"config: {message}{more}"
    return f"{key}: given {first['input']!r}; {message}{more}"


def _objective_names() -> list[str]:
    return [cls.model_fields["name"].default for cls in OBJECTIVE_CONFIGS]


def _tagged_configs(path: list[str]) -> list:
    """The config classes of a tagged union at `path` (a key, or an item of a list of sections)."""
    parent = path[-1]
    if parent.isdigit():
        return {"methods": METHOD_CONFIGS, "attacks": ATTACK_CONFIGS}.get(path[-2] if len(path) > 1 else "", [])
    return {"augment": AUGMENT_CONFIGS, "domain": DOMAIN_CONFIGS, "objective": OBJECTIVE_CONFIGS}.get(parent, [])


def _is_tag(before: list[str], part: str) -> bool:
    """Tagged unions add the tag to an error's location (pretrain.objective.pgd_at.steps)."""
    if not before:
        return False
    return part in [c.model_fields["name"].default for c in _tagged_configs(before)]


def _valid_keys(loc: list[str], root: type[Section]) -> list[str]:
    model = root
    for i, part in enumerate(loc):
        if _is_tag(loc[:i], part):
            model = next(c for c in _tagged_configs(loc[:i]) if c.model_fields["name"].default == part)
            continue
        if part.isdigit() or _tagged_configs(loc[:i + 1]) or _tagged_configs(loc[:i + 1] + ["0"]):
            continue  # an item of a list of sections, or a tagged union (its tag comes next)
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        model = _section_type(annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _section_type(annotation):
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None
