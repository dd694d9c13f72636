"""Read a TensorBoard event file back without TensorFlow: TFRecord framing + tensorboardX's Event proto."""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event


def read_events(directory: str | Path) -> list[Event]:
    """Every Event of every `events.out.tfevents.*` file directly in `directory`, in file order."""
    events = []
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            start = offset + 12  # length (8) + masked crc of the length (4)
            events.append(Event.FromString(data[start:start + length]))
            offset = start + length + 4  # + masked crc of the data
    return events


def scalars(directory: str | Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the simple_value summaries."""
    out: dict[str, dict[int, float]] = {}
    for event in read_events(directory):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def plugin_values(directory: str | Path, plugin: str) -> list:
    """The summary values written for TensorBoard plugin `plugin` ("text", "hparams", ...)."""
    return [value for event in read_events(directory) for value in event.summary.value
            if value.metadata.plugin_data.plugin_name == plugin]
