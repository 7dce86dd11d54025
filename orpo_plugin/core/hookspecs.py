"""The project's extension points. A third-party package implements any of these with
`@orpo_plugin.hookimpl` and lists its module under the entry-point group `orpo_plugin`:

    [project.entry-points.orpo_plugin]
    my_formats = "my_package.orpo_formats"

The built-in formats, the ORPO loss and the GGUF architectures are registered through these
same hooks, each by the side of the project that uses it.
"""

import pluggy

PROJECT = "orpo_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_formats(register):
    """Register preference-dataset formats: call register(PreferenceFormat(...)) for each."""


@hookspec
def register_losses(register):
    """Register preference losses: call register(PreferenceLoss(...)) for each; the YAML key
    `orpo_loss` selects one by name."""


@hookspec
def register_architectures(register):
    """Register model architectures for GGUF export: call register(architecture) for each, keyed by
    the class name in config.json's "architectures". The exporting side defines what an
    architecture holds and imports its type; the core only carries the registrations."""
