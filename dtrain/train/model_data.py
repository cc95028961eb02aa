"""Does a model fit its data? One-line errors before (task) and after (classes, channels, vocabulary)
the data is loaded; shared by training and search."""

from __future__ import annotations

from ..data.base import DataBundle, DataError


def data_task(data_cfg) -> str:
    """The task a data config provides, known before loading anything."""
    if data_cfg.name == "text":
        return "lm"
    if data_cfg.name == "synthetic":
        return data_cfg.task
    return "classification"


def check_task(model, model_cfg, data_cfg) -> None:
    task = data_task(data_cfg)
    if model.task != task:
        raise DataError(
            f"model.space={model_cfg.space!r} does {model.task} but data {data_cfg.name!r} "
            f"is {task}: pick a matching pair (e.g. model=mbv3_tiny data=digits, "
            f"model=gpt_tiny data=text)"
        )


def check_model_data(model, data: DataBundle, model_cfg) -> None:
    """One-line errors when the model cannot consume the data."""
    if model.task != data.task:
        raise DataError(
            f"model.space={model_cfg.space!r} does a {model.task} task but data "
            f"{data.name!r} is {data.task}: pick a matching model and data"
        )
    if data.task == "classification":
        if model_cfg.num_classes != data.num_classes:
            raise DataError(
                f"model.num_classes={model_cfg.num_classes} but data {data.name!r} has "
                f"{data.num_classes} classes: set model.num_classes={data.num_classes}"
            )
        if model_cfg.in_channels != data.input_shape[0]:
            raise DataError(
                f"model.in_channels={model_cfg.in_channels} but data {data.name!r} has "
                f"{data.input_shape[0]} channels: set model.in_channels={data.input_shape[0]}"
            )
    elif model_cfg.vocab_size < data.num_classes:
        raise DataError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the data's vocabulary of {data.num_classes}"
        )
