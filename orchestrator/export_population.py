"""Population responses and image stimuli in NWB, where NWB users look for them.

- ``processing["population"]``: a `TimeSeries` ``responses`` (trials x units, float64, NaN = unit
  masked on that trial) timestamped at each trial's start in the trials table, a `DynamicTable`
  ``response_trials`` linking each row to its trial (index, trial_id, n_masked) and a
  `DynamicTable` ``units`` (the protocol's unit ids and how often each was masked).
- ``stimulus_template["stimulus_images"]``: an `Images` container with one `GrayscaleImage` /
  `RGBImage` per shown image, named by its sha256 (the trials table's ``stimulus.image``), holding
  the exact uint8 pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from orchestrator.analysis import SessionData

MODULE = "population"
IMAGES = "stimulus_images"


def add_population(nwb: Any, data: "SessionData", trial_starts: dict[int, float]) -> None:
    """Add the session's population responses (if any) to an NWBFile being written."""
    from hdmf.common import DynamicTable, VectorData
    from pynwb import TimeSeries

    from orchestrator.analysis import unit_ids

    responses = data.population
    if responses is None or responses.size == 0:
        return
    ids = data.population_ids
    index_of = dict(zip(data.trials["trial_id"], data.trials["index"]))
    module = nwb.create_processing_module(MODULE, "cloop: population response of every completed trial")
    module.add(TimeSeries(
        name="responses", data=np.asarray(responses, dtype=np.float64), unit="a.u.",
        timestamps=[trial_starts[i] for i in ids],
        description="trials x units response vector in protocol unit order; NaN: unit masked on that trial; "
                    "timestamps are the trials' start_time",
        comments="row i belongs to the trial with trial_id response_trials.trial_id[i]"))
    masked = np.isnan(responses)
    module.add(DynamicTable(name="response_trials", description="the trial of each row of responses", columns=[
        VectorData(name="index", description="trial index", data=[int(index_of[i]) for i in ids]),
        VectorData(name="trial_id", description="database id of the trial", data=[int(i) for i in ids]),
        VectorData(name="n_masked", description="units masked (NaN) on this trial",
                   data=[int(v) for v in masked.sum(axis=1)]),
    ]))
    units = unit_ids(data.protocol_text, responses.shape[1])
    module.add(DynamicTable(name="units", description="the recorded units, in the column order of responses",
                            columns=[
        VectorData(name="unit_id", description="unit id from the protocol", data=[str(u) for u in units]),
        VectorData(name="n_masked", description="trials on which this unit was masked",
                   data=[int(v) for v in masked.sum(axis=0)]),
    ]))


def add_images(nwb: Any, images: dict[str, np.ndarray]) -> None:
    """Add the exact pixels of every shown image as a stimulus template, named by sha256."""
    if not images:
        return
    from pynwb.base import Images
    from pynwb.image import GrayscaleImage, RGBImage

    members = []
    for sha, pixels in images.items():
        kind = GrayscaleImage if pixels.ndim == 2 else RGBImage
        members.append(kind(name=sha, data=np.asarray(pixels, dtype=np.uint8),
                            description="uint8 pixels as shown; name = sha256 of the C-order bytes"))
    nwb.add_stimulus_template(Images(name=IMAGES, images=members,
                                     description="every image the session showed, by sha256 (stimulus.image)"))


def read_population(path: str | Path) -> tuple[list[int], np.ndarray, dict[str, np.ndarray]]:
    """(trial ids, trials x units responses, images by sha256) from an NWB export."""
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), "r") as io_:
        nwb = io_.read()
        ids: list[int] = []
        responses = np.empty((0, 0), dtype=np.float64)
        if MODULE in nwb.processing:
            module = nwb.processing[MODULE]
            responses = np.asarray(module["responses"].data[:], dtype=np.float64)
            ids = [int(v) for v in module["response_trials"]["trial_id"].data[:]]
        images: dict[str, np.ndarray] = {}
        if IMAGES in nwb.stimulus_template:
            for name, img in nwb.stimulus_template[IMAGES].images.items():
                images[name] = np.asarray(img.data[:], dtype=np.uint8)
    return ids, responses, images
