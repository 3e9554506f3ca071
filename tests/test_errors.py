"""The project's errors cross process boundaries whole: Ray pickles a task's exception to carry it to the driver, and
an exception whose ``__init__`` takes other arguments than its message cannot be rebuilt there unless it says how
(a sweep trial's ConfigError reached the CLI as Ray's "missing 1 required positional argument: 'message'")."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest

import ptmst_ray


def project_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(ptmst_ray.__path__, "ptmst_ray."):
        module = importlib.import_module(info.name)
        found += [obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, BaseException)
                  and obj.__module__ == module.__name__]
    return sorted(set(found), key=lambda c: c.__qualname__)


EXCEPTIONS = project_exceptions()


def an_instance(cls: type[BaseException]) -> BaseException:
    """``cls`` with a distinct made-up value for every parameter its ``__init__`` requires."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return cls(*(f"{p.name}-value" for p in params)) if params else cls("message-value")


def test_every_project_exception_is_found():
    names = {c.__name__ for c in EXCEPTIONS}
    assert {"ConfigError", "StorageError", "StageError", "DivergenceError", "SweepError"} <= names, names


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_an_exception_survives_pickling_with_its_message_and_fields(cls):
    error = an_instance(cls)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls and str(again) == str(error) and vars(again) == vars(error)


@pytest.mark.ray
def test_a_config_error_in_a_ray_task_reaches_the_driver_as_itself(ray_session):
    import ray

    from ptmst_ray.config import ConfigError

    @ray.remote(num_cpus=0)
    def bad_trial():
        raise ConfigError("distill.syn_steps", "must be >= 1")

    with pytest.raises(ConfigError) as caught:
        ray.get(bad_trial.remote())
    assert caught.value.path == "distill.syn_steps" and "distill.syn_steps: must be >= 1" in str(caught.value)
