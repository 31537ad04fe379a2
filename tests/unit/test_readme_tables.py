"""README's claims match the code: the CLI's exit codes and settings options, the default
keys of mapping items and of ``datasets`` folders, where ``feature_module=`` goes,
``progress=``/``on_epoch_end=`` and ``pop_logs()``."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import miu_hooks as mh
from miu_hooks.cli.data_index import _DATASETS_ALTERNATIVES
from miu_hooks.cli.errors import EXIT_CODES
from miu_hooks.cli.options import setting_options, settings_sections
from miu_hooks.data import INPUT_KEYS, LABEL_KEYS
from miu_hooks.errors import ConfigError

pytestmark = pytest.mark.unit

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _exit_table() -> dict[int, str]:
    start = README.index("| exit | meaning |")
    rows = README[start:].split("\n\n", 1)[0].splitlines()[2:]
    codes: dict[int, str] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        for code, meaning in zip(cells[::2], cells[1::2], strict=True):
            numbers = [int(n) for n in re.findall(r"\d+", code)]
            meanings = [m.strip() for m in meaning.split(" / ")] if len(numbers) > 1 else [meaning]
            for n in numbers:
                codes[n] = meanings[min(numbers.index(n), len(meanings) - 1)]
    return codes


def test_the_exit_code_table_lists_every_code_once() -> None:
    table = _exit_table()
    assert sorted(table) == sorted(code for code, _, _ in EXIT_CODES)
    # spot checks that the meaning is the code's
    assert "contradicts its label" in table[10]
    assert "replaceable" in table[14]
    assert "do not fit the model" in table[19]
    assert "NaN/Inf in the input data" in table[20]


def test_the_default_keys_of_mapping_items_are_the_codes() -> None:
    listed = re.search(r"tuples or mappings \(([^,]+),\s+([^,]+), `group`", README)
    assert listed is not None
    inputs = re.findall(r"`(\w+)`", listed.group(1))
    labels = re.findall(r"`(\w+)`", listed.group(2))
    assert tuple(inputs) == INPUT_KEYS and tuple(labels) == LABEL_KEYS


def test_the_settings_option_table_is_the_generated_options() -> None:
    # One row per --help section: the classes that have the fields, then their options.
    start = README.index("| settings | options |")
    rows = README[start:].split("\n\n", 1)[0].splitlines()[2:]
    table = []
    for row in rows:
        classes, options = (c.strip() for c in row.strip().strip("|").split("|"))
        table.append((re.findall(r"`(\w+Config)`", classes), re.findall(r"`(--[\w-]+)`", options)))
    generated = [
        (re.findall(r"\w+Config", title.rsplit("(", 1)[1]), options)
        for title, options in settings_sections(setting_options()).items()
    ]
    assert table == generated


def test_the_columns_of_a_datasets_folder_are_the_codes() -> None:
    listed = re.search(r"`save_to_disk` folder \(`pip install datasets`\) with the columns\s+(.*?)"
                       r" and optional\s+(`\w+`/`\w+`)", README, re.S)  # fmt: skip
    assert listed is not None
    names = [re.findall(r"`(\w+)`", part) for part in listed.group(1).split(", ")]
    names.append(re.findall(r"`(\w+)`", listed.group(2)))
    assert names == [list(v) for v in _DATASETS_ALTERNATIVES.values()]
    assert "`PATH:split`" in README


def test_feature_module_is_a_keyword_of_the_entry_points_not_a_setting() -> None:
    from miu_hooks.integrations.accelerate import prepare_miu
    from miu_hooks.integrations.hf import MIUCallback, prepare_trainer

    for fn in (mh.unlearn, mh.validate, prepare_miu, prepare_trainer, MIUCallback.__init__):
        assert "feature_module" in inspect.signature(fn).parameters, fn
    with pytest.raises(ConfigError, match="feature_module"):
        mh.MIUConfig(feature_module="head")  # type: ignore[call-arg]
    for said in ("`feature_module=` is a keyword of `prepare_trainer` and\n  `MIUCallback` (and "
                 "of `unlearn` and `prepare_miu`)", "`feature_module=` is its keyword (not an "
                 "`MIUConfig`\nfield)"):  # fmt: skip
        assert said in README


def test_the_accelerate_section_names_pop_logs() -> None:
    from miu_hooks.integrations.accelerate import MIUAccelerate

    section = README[README.index("## Accelerate") : README.index("## Command line")]
    assert "logs = miu.pop_logs()" in section and callable(MIUAccelerate.pop_logs)


def test_progress_and_on_epoch_end_are_called_as_the_readme_says() -> None:
    """The README's tqdm wrapper wraps the retain and forget passes and the feature caching."""
    import torch
    from torch import nn

    example = re.search(r"`progress=(lambda it, desc: tqdm\(.*?\))`", README)
    assert example is not None
    from tqdm import tqdm

    shown: list[str] = []

    def progress(it, desc):
        shown.append(desc)
        return eval(example.group(1), {"tqdm": tqdm})(it, desc)

    epochs: list[tuple[int, list[str]]] = []
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 2
    data = mh.GroupTensorDataset(
        torch.randn(120, 4, generator=g), y, (torch.arange(120) // 2) % 2 + 2 * y
    )
    forget = torch.arange(120)[(data.groups == 3) & (torch.arange(120) % 3 == 0)]
    keep = torch.ones(120, dtype=torch.bool)
    keep[forget] = False
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    cfg = mh.MIUConfig(epochs=2, forget_epochs=1, batch_size=32, mine_hidden=8,
                       mine_warmup_iters=2, mine_iters=1, guard=False)  # fmt: skip
    mh.unlearn(model, mh.subset(data, torch.nonzero(keep).flatten()), mh.subset(data, forget),
               config=cfg, progress=progress,
               on_epoch_end=lambda e, logs: epochs.append((e, sorted(logs))))  # fmt: skip
    # forget_epochs=1: epoch 1 has no forget pass, and no bar for one.
    assert shown == ["caching original features", "epoch 0 forget", "epoch 0 retain",
                     "epoch 1 retain"]  # fmt: skip
    assert [e for e, _ in epochs] == [0, 1]
    assert all({"miu/mi_model", "miu/calibration"} <= set(keys) for _, keys in epochs)


def test_the_id_rules_are_the_readmes(tmp_path) -> None:
    """Ids are integers; without an id column, a sample's id is its row (from 0, no header)."""
    from miu_hooks.cli.checks import check_labels_match_groups
    from miu_hooks.cli.data_index import read_data_index
    from miu_hooks.errors import DataError, GroupRangeError

    said = README[README.index("- **Ids:** integers.") :].split("\n- ", 1)[0]
    assert "counting from 0" in said and "the header line is not counted" in said
    (tmp_path / "a.png").write_bytes(b"")  # the index checks that images exist, not their bytes
    (tmp_path / "m.csv").write_text("path,label,group\na.png,0,7\na.png,1,2\n")
    index = read_data_index(tmp_path / "m.csv")
    assert index.ids is None and len(index) == 2
    with pytest.raises(GroupRangeError, match=r"row 0 has label 0 and group 7"):
        check_labels_match_groups(index, 2)  # the first line after the header is row 0
    (tmp_path / "i.csv").write_text("path,label,group,id\na.png,0,0,x1\n")
    with pytest.raises(DataError, match=r"column 'id' must hold integers"):
        read_data_index(tmp_path / "i.csv")
