"""Building models and data sets for ``miu-unlearn`` (imports torch).

Models come from a ``config.json`` (``AutoConfig`` then the class named in
``architectures``, or ``AutoModelForImageClassification.from_config``) or from
``--arch package.module:factory``, and their weights are loaded strictly
(:func:`miu_hooks.original.load_weights`). Only safetensors are read.

Image transforms, for CSV manifests and ``datasets`` image columns: open with
Pillow, convert to RGB (``L`` when the config says ``num_channels: 1``), resize
to ``image_size`` x ``image_size`` (bilinear; from ``--image-size``, else the
config's ``image_size``, else 224), scale to [0, 1] and normalise with
mean = std = 0.5 (docs/method.md §1), giving float32[C, H, W] in [-1, 1].
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from miu_hooks.cli.checks import row_name
from miu_hooks.cli.data_index import DataIndex, is_text
from miu_hooks.cli.errors import ArchitectureError, MissingDependencyError
from miu_hooks.cli.inputs import ModelSource
from miu_hooks.cli.text import TokenDataset
from miu_hooks.data import GroupTensorDataset
from miu_hooks.data_checks import nonfinite_position
from miu_hooks.errors import CheckpointError, DataError, NonFiniteInputError
from miu_hooks.original import load_weights

__all__ = ["ImageDataset", "build_model", "image_settings", "load_dataset", "load_model"]


def _factory(spec: str) -> Callable[[], Any]:
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or module_spec.loader is None or not path.is_file():
                raise ImportError(f"no such file: {path}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            cwd = str(Path.cwd())  # like `python -m`: modules of the working folder import
            added = "" not in sys.path and cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(target)
            finally:
                if added:
                    sys.path.remove(cwd)
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # any import-time failure of user code
        raise ArchitectureError(f"--arch {spec}: cannot import it ({exc})") from exc
    if not callable(obj):
        raise ArchitectureError(f"--arch {spec} is not callable")
    factory: Callable[[], Any] = obj
    return factory


@contextlib.contextmanager
def _transformers() -> Iterator[Any]:
    """Import transformers with its logging and progress bars silenced (one-line errors)."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            "this model has a Hugging Face config.json: pip install 'miu-hooks[hf]'"
        ) from exc
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _hf_class(transformers: Any, config_dir: Path) -> tuple[Any, Any]:
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError here
        raise ArchitectureError(f"cannot read {config_dir / 'config.json'} ({exc})") from exc
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    return cls or transformers.AutoModelForImageClassification, config


def _hf_model(config_dir: Path) -> nn.Module:
    with _transformers() as transformers:
        cls, config = _hf_class(transformers, config_dir)
        try:
            if hasattr(cls, "from_config"):
                built: nn.Module = cls.from_config(config)
            else:
                built = cls(config)
            return built
        except Exception as exc:  # transformers raises ValueError/KeyError here
            raise ArchitectureError(
                f"cannot build the architecture of {config_dir / 'config.json'} ({exc})"
            ) from exc


def _hf_pretrained(source: ModelSource) -> nn.Module:
    """Load a ``save_pretrained`` folder strictly with ``from_pretrained`` (maps renamed keys)."""
    folder = source.config_dir or source.folder
    with _transformers() as transformers:
        cls, config = _hf_class(transformers, folder)
        try:
            model, info = cls.from_pretrained(
                str(folder),
                config=config,
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
        except Exception as exc:  # transformers raises OSError/ValueError/RuntimeError
            raise CheckpointError(f"cannot load {source.weights} ({_one_line(exc)})") from exc
    parts = []
    for what in ("missing_keys", "unexpected_keys"):
        keys = sorted(info.get(what) or [])
        if keys:
            shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
            parts.append(f"{what.split('_')[0]} {len(keys)}: {shown}")
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        shown = ", ".join(f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched[:5])
        parts.append(f"shape mismatch: {shown}")
    if parts:
        raise CheckpointError(f"{source.weights} does not match {cls.__name__}: {'; '.join(parts)}")
    loaded: nn.Module = model
    return loaded


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def build_model(source: ModelSource, *, seed: int = 0) -> nn.Module:
    """Build the architecture of ``source`` with a seeded random initialisation.

    Raises:
        ArchitectureError: The config or factory cannot build an ``nn.Module``.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if source.arch is not None:
            try:
                model = _factory(source.arch)()
            except ArchitectureError:
                raise
            except Exception as exc:  # user code
                raise ArchitectureError(f"--arch {source.arch} failed: {exc}") from exc
        elif source.config_dir is not None:
            model = _hf_model(source.config_dir)
        else:  # pragma: no cover - resolve_model_source guarantees one of both
            raise ArchitectureError(f"no architecture for {source.weights}")
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"--arch {source.arch} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def load_model(source: ModelSource, *, seed: int = 0) -> nn.Module:
    """Build the architecture and load the weights strictly (key and shape checks).

    A ``save_pretrained`` folder is loaded with ``from_pretrained`` (Transformers
    renames some keys on save), and any missing, unexpected or mis-shaped key is
    an error; other files go through :func:`miu_hooks.original.load_weights`.

    Raises:
        ArchitectureError: See :func:`build_model`.
        CheckpointError: The weights do not match the architecture (the diff is listed).
    """
    folder = source.config_dir
    if (
        source.arch is None
        and folder is not None
        and source.weights == folder / "model.safetensors"
    ):
        return _hf_pretrained(source)
    return load_weights(build_model(source, seed=seed), source.weights)


def image_settings(source: ModelSource, image_size: int | None) -> tuple[int, str]:
    """Return ``(side, PIL mode)`` for image inputs, read from the config when not given."""
    config: dict[str, Any] = {}
    if source.config_dir is not None:
        try:
            config = json.loads((source.config_dir / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
    side = image_size or config.get("image_size") or 224
    if isinstance(side, (list, tuple)):
        side = side[0]
    return int(side), "L" if config.get("num_channels") == 1 else "RGB"


def _to_tensor(image: Any, side: int, mode: str) -> Tensor:
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            return torch.as_tensor(arr, dtype=torch.float32)  # already [C, H, W] features
        image = Image.fromarray(arr)
    image = image.convert(mode).resize((side, side), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy((arr - 0.5) / 0.5)


class ImageDataset(Dataset):
    """Images from a manifest or a ``datasets`` table, transformed as the module describes.

    Items are ``(float32[C, side, side], label, group)``; ``labels`` and ``groups``
    are attributes, so group counts never decode an image.
    """

    def __init__(self, index: DataIndex, side: int, mode: str) -> None:
        self.index = index
        self.side = side
        self.mode = mode
        self.labels = torch.from_numpy(index.labels)
        self.groups = torch.from_numpy(index.groups)

    def __len__(self) -> int:
        return len(self.index)

    def _image(self, i: int) -> Any:
        if self.index.kind == "manifest":
            from PIL import Image, UnidentifiedImageError

            path = self.index.paths[i]
            try:
                with Image.open(path) as img:
                    img.load()
                    return img.copy()
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"cannot read image {path} ({exc})") from exc
        return self.index.handle[i][self.index.keys["input"]]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        inputs = _to_tensor(self._image(i), self.side, self.mode)
        if not bool(torch.isfinite(inputs).all()):  # arrays of a datasets folder may hold NaN
            raise NonFiniteInputError(
                f"{self.index.path}: the inputs of {row_name(self.index, i)} hold NaN or Inf "
                "(rows count from 0): fix or drop that sample"
            )
        return inputs, self.labels[i], self.groups[i]


def load_dataset(
    index: DataIndex, *, side: int = 224, mode: str = "RGB", pad_id: int = 0
) -> Dataset:
    """Return the data set of ``index`` (tensors in memory, images decoded lazily).

    A ``datasets`` folder of token ids gives a :class:`~miu_hooks.cli.text.TokenDataset`
    padded with ``pad_id``.

    Raises:
        DataError: The inputs cannot be read.
        MissingDependencyError: Images need Pillow (``pip install 'miu-hooks[image]'``).
    """
    if index.kind == "tensors":
        from safetensors.torch import load_file

        try:
            inputs = load_file(str(index.path))[index.keys["input"]]
        except Exception as exc:  # safetensors raises its own error types
            raise DataError(f"cannot read inputs of {index.path} ({exc})") from exc
        data = GroupTensorDataset(
            inputs, torch.from_numpy(index.labels), torch.from_numpy(index.groups)
        )
        bad = nonfinite_position(data)
        if bad is not None:
            raise NonFiniteInputError(
                f"{index.path}: the inputs of {row_name(index, bad)} hold NaN or Inf (rows "
                "count from 0): fix or drop that sample"
            )
        return data
    if is_text(index):
        return TokenDataset(index, pad_id)
    if importlib.util.find_spec("PIL") is None:
        raise MissingDependencyError(f"{index.path} holds images: pip install 'miu-hooks[image]'")
    return ImageDataset(index, side, mode)
