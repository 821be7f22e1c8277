"""The METHODS dict is the one list of methods: keys match module names and classes."""

from __future__ import annotations

import importlib
from pathlib import Path

from training.methods import METHODS
from training.methods.base import Method

METHODS_DIR = Path(__file__).resolve().parent.parent / "training" / "methods"


def _defines_a_method(module: str) -> bool:
    """A module defines a runnable method when it holds a Method subclass with its own `name`; shared
    pieces (base.py, adapted.py, adapters.py) define none."""
    mod = importlib.import_module(f"training.methods.{module}")
    return any(isinstance(obj, type) and issubclass(obj, Method) and obj.__module__.startswith(mod.__name__)
               and "name" in vars(obj) for obj in vars(mod).values())


def test_registry_keys_match_modules_and_names():
    modules = {p.stem for p in METHODS_DIR.glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in METHODS_DIR.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {m for m in modules if _defines_a_method(m)}
    assert set(METHODS) == modules, "every method module is registered and every entry has a module"
    for key, cls in METHODS.items():
        assert key == key.lower() and " " not in key
        assert issubclass(cls, Method) and cls.name == key
        assert cls.__module__.startswith(f"training.methods.{key}")
        importlib.import_module(cls.__module__)


def test_the_loop_never_branches_on_a_method_name():
    loop_files = [Path("training/trainer.py"), Path("training/cli.py"), Path("main.py")]
    root = METHODS_DIR.parent.parent
    for path in loop_files:
        text = (root / path).read_text()
        for key in METHODS:
            assert f'"{key}"' not in text and f"'{key}'" not in text, f"{path} mentions method {key!r}"
