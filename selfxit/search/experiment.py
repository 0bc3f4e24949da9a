"""NNI plumbing of the search: the experiment class that reports trial events, its config, and keeping
NNI's files and chatter contained. Imported only while a search runs (needs the ``search`` extra)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from selfxit.search.config import SearchConfig


def _experiment_class():
    from nni.nas.execution.event import ModelEventType
    from nni.nas.experiment import NasExperiment

    class _Experiment(NasExperiment):
        """A NasExperiment that reports its model events to a recorder."""

        def __init__(self, *args, recorder, **kwargs):
            super().__init__(*args, **kwargs)
            self.recorder = recorder

        def execution_engine_factory(self, config):
            engine = super().execution_engine_factory(config)
            engine.register_model_event_callback(ModelEventType.FinalMetric, self.recorder.on_metric)
            engine.register_model_event_callback(ModelEventType.TrainingEnd, self.recorder.on_end)
            return engine

    return _Experiment


@contextlib.contextmanager
def _nni_contained(workdir: Path, spawns_processes: bool):
    """Keep NNI's files under ``workdir`` and its INFO chatter off stdout for the duration.

    NNI records every experiment in ``~/nni-experiments/.experiment`` (the default of
    ``Experiments(home_dir=...)``, bound at import): that default points to ``workdir`` here. With a
    training service, NNI's manager and trial keepers are separate processes that read ``$HOME``, so
    ``HOME`` is pointed to ``workdir`` as well while they start.
    """
    from nni.runtime import log as nni_log
    from nni.tools.nnictl import config_utils
    workdir.mkdir(parents=True, exist_ok=True)
    defaults = config_utils.Experiments.__init__.__defaults__
    config_utils.Experiments.__init__.__defaults__ = (str(workdir),)
    home = os.environ.get("HOME")
    if spawns_processes:
        os.environ["HOME"] = str(workdir)
    stdout_on = "_stdout_" in getattr(nni_log, "_handlers", {"_stdout_": None})
    nni_log.silence_stdout()
    try:
        yield
    finally:
        config_utils.Experiments.__init__.__defaults__ = defaults
        if spawns_processes:
            if home is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = home
        if stdout_on:
            nni_log.start_stdout_logging()


def _experiment_config(config: SearchConfig, budget: int, workdir: Path):
    from nni.nas.experiment import NasExperimentConfig
    if config.training_service is None:
        exp = NasExperimentConfig("sequential", "simplified")
        exp.execution_engine.continue_on_failure = True
        exp.trial_concurrency = 1
    else:
        exp = NasExperimentConfig("ts", "simplified", training_service=dict(config.training_service))
        exp.trial_concurrency = config.trial_concurrency
    exp.max_trial_number = budget
    exp.experiment_working_directory = str(workdir)
    return exp
