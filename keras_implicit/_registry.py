"""One registry machinery for solver settings: forward solvers and backward linear solvers.

`ki.solvers` and `ki.linalg` each hold a `Registry` of `Settings` subclasses. A settings
object is a small immutable record of validated constructor arguments: it serializes
with Keras, prints as its constructor call, and `with_options` copies it with some
arguments replaced. `Registry.get` turns what a user passes (a name, a config dict or
an object) into one.
"""

from __future__ import annotations

import keras


class Settings:
    """Base of solver settings objects. Subclasses list their constructor arguments in
    `_fields` (stored under the same attribute names) and validate them in `__init__`."""

    name = "settings"
    _fields: tuple = ()

    def get_config(self) -> dict:
        return {key: getattr(self, key) for key in self._fields}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def with_options(self, **options):
        """A copy with some constructor arguments replaced (None values are ignored)."""
        options = {k: v for k, v in options.items() if v is not None}
        return type(self).from_config({**self.get_config(), **options}) if options else self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Registry:
    """Names of the `Settings` subclasses of one kind, and `get` for user arguments.

    Args:
        base: the kind's base class (e.g. `ki.solvers.Solver`).
        argument: the user-facing argument name quoted in errors (e.g. "solver").
    """

    def __init__(self, base: type, argument: str):
        self.base = base
        self.argument = argument
        self._classes = {}

    def register(self, *aliases: str, keras_name: str | None = None):
        """Class decorator: registers `cls.name` and `aliases`, and the class with Keras."""

        def decorator(cls):
            cls = keras.saving.register_keras_serializable(
                package="keras_implicit", name=keras_name
            )(cls)
            for key in (cls.name, *aliases):
                self._classes[key] = cls
            return cls

        return decorator

    def names(self) -> list:
        return sorted(self._classes)

    def get(self, identifier, options: dict):
        """A settings object from a name, a config dict or an instance of `base`.

        `options` (e.g. tol=, max_iter=) go to the constructor of a named class, or
        replace the matching settings of a given object (None values are ignored).
        """
        base, argument = self.base, self.argument
        kind = f"{base.__module__}.{base.__name__}"
        if isinstance(identifier, base):
            return identifier.with_options(**options)
        if isinstance(identifier, str):
            cls = self._classes.get(identifier.lower())
            if cls is None:
                raise ValueError(
                    f"Unknown {argument}. Expected one of {self.names()} or a {kind}. "
                    f"Received: {argument}={identifier!r}"
                )
            return cls(**{k: v for k, v in options.items() if v is not None})
        if isinstance(identifier, dict):
            obj = keras.saving.deserialize_keras_object(identifier)
            if not isinstance(obj, base):
                raise ValueError(f"The config does not describe a {kind}. Received: {identifier!r}")
            return obj.with_options(**options)
        raise ValueError(
            f"`{argument}` must be a name, a config dict or a {kind}. "
            f"Received: {argument}={identifier!r}"
        )


def serialize(settings: Settings) -> dict:
    return keras.saving.serialize_keras_object(settings)
