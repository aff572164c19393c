"""Acquisition-system response sources: population vectors from Open Ephys and Lab Streaming Layer.

Each source listens to the recording system's own stream, maps the stimulus onset (the flip time
the presenter reports, epoch seconds on the rig's clock) onto the acquisition clock explicitly, and
bins every unit's activity in the protocol's response window::

    window = [onset_acq + latency_s, onset_acq + latency_s + window_s)

- ``openephys`` (:mod:`rig_adapters.sources.openephys`): spikes and TTL events from the Open Ephys
  GUI's ZMQ Interface or Event Broadcaster (JSON) plugins, stamped in samples of the acquisition clock;
- ``lsl`` (:mod:`rig_adapters.sources.lsl`): any LSL outlet, spike-event streams (one sample per
  spike, the value names the unit) or continuous streams (one channel per unit, e.g. dF/F).

The payload is ``{"value": [count or mean per unit, protocol unit order], "alignment": {...}}``;
``alignment`` records how onset was mapped and how uncertain that mapping is, and is stored with
the trial. A window the stream has not passed yet is never reported: the trial fails with an
:class:`~rig_adapters.sources.window.AcquisitionError` whose ``code`` says why (late, stalled,
gap, sync missing, clock mismatch) and the orchestrator retries it per the protocol. See docs/acquisition.md.
"""

from rig_adapters.sources.window import (
    AcquisitionError,
    AcquisitionGap,
    AcquisitionLate,
    AcquisitionStalled,
    PopulationWindow,
    SyncMissing,
    parse_population_window,
)

__all__ = [
    "AcquisitionError",
    "AcquisitionGap",
    "AcquisitionLate",
    "AcquisitionStalled",
    "SyncMissing",
    "PopulationWindow",
    "parse_population_window",
]
