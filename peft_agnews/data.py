"""Load, validate and split labelled text: the Hub's `ag_news`, or local canonical-AG-News / CSV / JSONL / Parquet files.

Every loader returns a `datasets.Dataset` with exactly two columns, `text` (str) and `label` (a ClassLabel class id;
multi-label: a list of class ids, possibly empty), or raises a UsageError naming the file, the problem and the fix
before any training starts.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value, load_dataset

from peft_agnews.config import TrainConfig
from peft_agnews.errors import UsageError
from peft_agnews.labels import is_multi_label, label_sets_to_ids, labels_to_ids

CANONICAL_COLUMNS = ["class", "title", "description"]
_LOADERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def check_input_file(path: Path, option: str) -> None:
    """A UsageError unless `path` is an existing file (a folder is named as a folder, not as missing)."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a file; pass a data file to {option}")
    if not path.is_file():
        raise UsageError(f"data file not found: {path} (check the path passed to {option})")


def _check_readable_text(path: Path) -> str:
    """Return the first line, after checking the whole file decodes as UTF-8 (an error names the file's byte)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file passed to the decoder so far
    first = None
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            pending = len(decoder.getstate()[0])  # an unfinished character carried over from the last chunk
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise UsageError(
                    f"{path}: not UTF-8 text (byte {offset - pending + err.start}: {err.reason}); re-encode it as UTF-8"
                ) from None
            if first is None:
                first = text
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise UsageError(f"{path}: not UTF-8 text (ends inside a character: {err.reason}); re-encode it as UTF-8") from None
    return (first or "").splitlines(keepends=True)[0] if first else ""


def is_canonical_agnews(first_line: str, path: Path) -> bool:
    """The canonical AG News CSV has no header: `"class","title","description"` with an integer class."""
    try:
        row = next(csv.reader([first_line]), [])
    except csv.Error as err:  # e.g. a field over the csv module's 128 KiB limit
        raise UsageError(f"{path}: the first line is not readable as CSV ({err}); check the file's format") from None
    return len(row) == 3 and row[0].strip().lstrip("-").isdigit()


TABLE_SUFFIXES = tuple(_LOADERS)


def _raw_dataset(path: Path, what: str, cache_dir: str | None = None, **kwargs) -> Dataset:
    builder = _LOADERS[path.suffix.lower()]
    try:
        return load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
    except Exception as err:  # datasets wraps parser errors in several exception types
        if "corresponds to no data" in str(err):
            raise UsageError(f"{path}: the file has no rows; give a file with {what}") from None
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UsageError(f"{path}: could not be parsed as {builder} ({detail}); check the file's format") from None


def read_table(path: Path, option: str, what: str, all_text: bool = False,
               cache_dir: str | None = None) -> tuple[Dataset, bool]:
    """A CSV, JSON Lines, JSON or Parquet file as a Dataset of its columns, and whether it is the canonical
    headerless AG News CSV (its columns then CANONICAL_COLUMNS, all strings). The one reader of these formats, for
    training data, evaluate and predict: the file must exist, be of a supported type, decode as UTF-8 and hold rows
    (`what` names them in the error). `all_text`: every column of a CSV with a header read as written (strings),
    so ids and texts are never converted to numbers. `cache_dir`: where datasets keeps its Arrow copy."""
    check_input_file(path, option)
    suffix = path.suffix.lower()
    if suffix not in _LOADERS:
        raise UsageError(f"{path}: unsupported file type '{suffix}'; use .csv, .jsonl, .json or .parquet")
    # Text formats are decoded once, up front: a non-UTF-8 file fails here with the byte offset.
    first_line = _check_readable_text(path) if suffix in (".csv", ".jsonl", ".json") else ""
    if suffix == ".csv" and is_canonical_agnews(first_line, path):
        features = Features({c: Value("string") for c in CANONICAL_COLUMNS})
        return _raw_dataset(path, what, cache_dir, column_names=CANONICAL_COLUMNS, header=None, features=features,
                            keep_default_na=False), True
    if suffix != ".csv":
        return _raw_dataset(path, what, cache_dir), False
    header = next(csv.reader([first_line]), []) if all_text else []
    as_text = {"features": Features({c: Value("string") for c in header})} if header else {}
    return _raw_dataset(path, what, cache_dir, keep_default_na=False, **as_text), False


def read_labelled_file(path_str: str, label_names: list[str], multi_label_separator: str | None = None,
                       cache_dir: str | None = None) -> Dataset:
    """Read one labelled file into `text`/`label` columns, validating every row.

    `multi_label_separator`: read a set of classes per row (multi-label): a list of names or ids, or one text
    field of names or ids joined by this separator; None: one class per row."""
    path = Path(path_str)
    raw, canonical = read_table(path, "--*_file", "labelled examples", cache_dir=cache_dir)
    if canonical:
        if multi_label_separator is not None:
            raise UsageError(f"{path} is the canonical AG News CSV, one class per row; multi-label data needs a "
                             "'label' column of class lists (or drop --problem_type multi_label_classification)")
        return _validate(_from_canonical(raw, path, len(label_names)), path, label_names)
    missing = [c for c in ("text", "label") if c not in raw.column_names]
    if missing:
        raise UsageError(
            f"{path}: missing column(s) {missing}; found {raw.column_names}. Provide 'text' and 'label' columns "
            f"(or the canonical headerless AG News CSV \"class\",\"title\",\"description\")"
        )
    raw = raw.select_columns(["text", "label"])
    if multi_label_separator is not None:
        return _validate(label_sets_to_ids(raw, path, label_names, multi_label_separator), path, label_names)
    return _validate(labels_to_ids(raw, path, label_names), path, label_names)


def canonical_text(title: str | None, description: str | None) -> str:
    """The model input for a canonical AG News row: title + " " + description."""
    # A literal backslash-n in the canonical files stands for a newline.
    return f"{title or ''} {description or ''}".replace("\\n", "\n").strip()


def _from_canonical(raw: Dataset, path: Path, num_labels: int) -> Dataset:
    def convert(batch: dict) -> dict:
        labels = []
        for i, value in enumerate(batch["class"]):
            value = (value or "").strip()
            if not value.isdigit() or not 1 <= int(value) <= num_labels:
                raise UsageError(
                    f"{path}: class '{value}' is outside 1..{num_labels} (canonical AG News classes are 1-based)"
                )
            labels.append(int(value) - 1)
        texts = [canonical_text(title, desc) for title, desc in zip(batch["title"], batch["description"])]
        return {"text": texts, "label": labels}

    return raw.map(convert, batched=True, remove_columns=raw.column_names, desc="canonical AG News")


def fingerprint_rows(texts: list[str], labels: list) -> str:
    """sha256 over the rows' texts and labels (class ids, or lists of them), in order: equal only for the same rows
    in the same order."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        encoded = text.encode("utf-8")
        # Length-prefixed, so no two different row lists hash the same bytes.
        digest.update(len(encoded).to_bytes(8, "little") + encoded + _label_bytes(label))
    return digest.hexdigest()


def _label_bytes(label: int | list[int]) -> bytes:
    if isinstance(label, list):  # multi-label: the count, then the ids
        return b"L" + len(label).to_bytes(8, "little") + b"".join(int(i).to_bytes(8, "little") for i in label)
    return int(label).to_bytes(8, "little", signed=True)


def _validate(ds: Dataset, path: Path, label_names: list[str]) -> Dataset:
    if len(ds) == 0:
        raise UsageError(f"{path}: the file has no rows; give a file with labelled examples")
    texts = ds["text"]
    for row, text in enumerate(texts):
        if text is None or not text.strip():
            raise UsageError(f"{path}: row {row + 1} has empty text; remove or fill that row")
    classes = ClassLabel(names=label_names)
    return ds.cast_column("label", List(classes) if is_multi_label(ds.features["label"]) else classes)


def _load_hub(cfg: TrainConfig) -> DatasetDict:
    """`load_dataset(--dataset_name, --dataset_config_name)`: a Hub dataset or a local dataset folder."""
    try:
        hub = load_dataset(cfg.dataset_name, cfg.dataset_config_name, cache_dir=cfg.cache_dir, token=cfg.token)
    except Exception as err:
        raise UsageError(
            f"could not load dataset '{cfg.dataset_name}' from the Hub ({type(err).__name__}); check the name "
            "(and --dataset_config_name) and your connection, or pass local files with --train_file"
        ) from None
    if cfg.train_split_name not in hub:
        raise UsageError(f"dataset '{cfg.dataset_name}' has no '{cfg.train_split_name}' split (it has {list(hub)}); "
                         "name the training split with --train_split_name, or pass --train_file")
    for option in ("validation_split_name", "test_split_name"):
        if _named_by_user(cfg, option) and getattr(cfg, option) not in hub:
            raise UsageError(f"dataset '{cfg.dataset_name}' has no '{getattr(cfg, option)}' split (it has "
                             f"{list(hub)}); check --{option}")
    if cfg.label_column_name in cfg.text_column_names:
        raise UsageError(f"--label_column_name {cfg.label_column_name} is also one of --text_column_names")
    columns = hub[cfg.train_split_name].column_names
    missing = [c for c in _hub_columns(cfg) if c not in columns]
    if missing:
        raise UsageError(
            f"dataset '{cfg.dataset_name}' has no column(s) {missing} (it has {columns}); "
            "name the text with --text_column_names and the class with --label_column_name"
        )
    return hub


def _hub_columns(cfg: TrainConfig) -> list[str]:
    return [*cfg.text_column_names, cfg.label_column_name]


def _hub_split(split: Dataset, cfg: TrainConfig, names: list[str], where: Path) -> Dataset:
    """One split of a `load_dataset` dataset as validated `text`/`label` columns: the text columns joined with a
    space (as transformers' run_classification.py does), the label column renamed."""
    split = split.select_columns(_hub_columns(cfg))
    if cfg.text_column_names != ["text"]:
        columns = cfg.text_column_names

        def join(batch: dict) -> dict:
            rows = zip(*(batch[c] for c in columns))
            return {"text": [" ".join(str(v) for v in row if v is not None).strip() for row in rows]}

        split = split.map(join, batched=True, remove_columns=columns, desc="join text columns")
    if cfg.label_column_name != "label":
        split = split.rename_column(cfg.label_column_name, "label")
    split = split.select_columns(["text", "label"])
    if cfg.multi_label:
        return _validate(label_sets_to_ids(split, where, names, cfg.label_separator), where, names)
    return _validate(labels_to_ids(split, where, names), where, names)


def _named_by_user(cfg: TrainConfig, option: str) -> bool:
    """Whether a split name option differs from its default (a default name may be absent, a chosen one not)."""
    return getattr(cfg, option) != TrainConfig.__dataclass_fields__[option].default


def _is_labelled(split: Dataset, cfg: TrainConfig) -> bool:
    """False for test splits published without labels (GLUE-style: no label column, or ClassLabel id -1)."""
    if cfg.label_column_name not in split.column_names:
        return False
    return not isinstance(split.features[cfg.label_column_name], ClassLabel) or min(split[cfg.label_column_name]) >= 0


def _label_names(cfg: TrainConfig, feature: object) -> list[str]:
    """--label_names, else the names of the dataset's ClassLabel (one per row, or a list of them), else AG News's."""
    inner = feature.feature if isinstance(feature, List) else feature
    return cfg.resolved_label_names(inner.names if isinstance(inner, ClassLabel) else None)


def load_splits(cfg: TrainConfig) -> DatasetDict:
    """Build the train / validation (/ test) splits the run will use, every row validated (see
    `load_splits_and_validation_source`)."""
    return load_splits_and_validation_source(cfg)[0]


def load_splits_and_validation_source(cfg: TrainConfig) -> tuple[DatasetDict, str]:
    """The train / validation (/ test) splits the run will use, every row validated, and where the validation
    rows came from (in words, for the model card).

    With --dataset_name, its 'validation' split is used when it has one (else a stratified split of train), and
    its labelled 'test' split is scored at the end (--evaluate_test_split). Class names come from --label_names,
    else the dataset's ClassLabel, else AG News's; the returned splits carry them as a ClassLabel `label`."""
    hub = None
    separator = cfg.label_separator if cfg.multi_label else None

    def read_file(path: str) -> Dataset:
        return read_labelled_file(path, names, separator, cfg.cache_dir)

    if cfg.train_file:
        names = cfg.resolved_label_names()
        train = read_file(cfg.train_file)
    else:
        hub = _load_hub(cfg)
        names = _label_names(cfg, hub[cfg.train_split_name].features[cfg.label_column_name])
        train = _hub_split(hub[cfg.train_split_name], cfg, names, Path(cfg.dataset_name))

    splits = {}
    validation_name, test_name = cfg.validation_split_name, cfg.test_split_name
    if cfg.validation_file:
        splits["train"] = train
        splits["validation"] = read_file(cfg.validation_file)
        source = f"`{cfg.validation_file}`"
    elif hub is not None and validation_name in hub and _is_labelled(hub[validation_name], cfg):
        splits["train"] = train
        splits["validation"] = _hub_split(hub[validation_name], cfg, names, Path(cfg.dataset_name, validation_name))
        source = f"the `{validation_name}` split of `{cfg.dataset_name}`"
    elif hub is not None and _named_by_user(cfg, "validation_split_name"):
        raise UsageError(f"the '{validation_name}' split of '{cfg.dataset_name}' has no labels; check "
                         "--validation_split_name and --label_column_name")
    else:
        splits["train"], splits["validation"], source = _hold_out(train, cfg)
    if cfg.test_file:
        splits["test"] = read_file(cfg.test_file)
    elif hub is not None and cfg.evaluate_test_split and test_name in hub and _is_labelled(hub[test_name], cfg):
        splits["test"] = _hub_split(hub[test_name], cfg, names, Path(cfg.dataset_name, test_name))

    if cfg.max_train_samples is not None:
        splits["train"] = _head(splits["train"], cfg.max_train_samples, cfg.seed)
    if cfg.max_eval_samples is not None:
        splits["validation"] = _head(splits["validation"], cfg.max_eval_samples, cfg.seed)
        source += f", {len(splits['validation'])} of its rows drawn at random (--max_eval_samples, seed {cfg.seed})"
    return DatasetDict(splits), source


def _hold_out(train: Dataset, cfg: TrainConfig) -> tuple[Dataset, Dataset, str]:
    """(train, validation, where the validation rows came from): --validation_split of the rows, stratified by
    class; multi-label rows (a set of classes each) are drawn at random."""
    stratify = None if cfg.multi_label else "label"
    try:
        parts = train.train_test_split(test_size=cfg.validation_split, stratify_by_column=stratify, seed=cfg.seed)
    except ValueError as err:
        raise UsageError(
            f"cannot make a stratified {cfg.validation_split:.0%} validation split ({err}); "
            "give more rows per class or a --validation_file"
        ) from None
    how = "a random" if cfg.multi_label else "a stratified"
    return parts["train"], parts["test"], f"{how} {cfg.validation_split:.0%} split of the training data (seed {cfg.seed})"


def _head(ds: Dataset, n: int, seed: int) -> Dataset:
    return ds.shuffle(seed=seed).select(range(min(n, len(ds))))
