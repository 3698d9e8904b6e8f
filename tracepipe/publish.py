"""After a run: write every ``outputs[]`` entry, then push the ones with ``push:``.

The data path is one way: the runner (:mod:`tracepipe.pipeline.runner`) walks the stages and
ends with the final frame parts; :func:`publish` hands them to the shard writer
(:func:`tracepipe.outputs._writer.write_output`) once per output, and then, when the output has
``push:`` and ``TRACEPIPE_NO_PUSH`` is not set, to :func:`tracepipe.hub.push_output`. The writer
never pushes and the hub never writes; neither the runner nor the hub imports ``tracepipe.outputs``.

Secrets: one :class:`~tracepipe.secrets.Scrubber` is made here for the recipe and used for
everything that leaves this step: the writer's files (recipe copy, card, summary, stats) and the
push's error message.
"""

from __future__ import annotations

import os
from typing import Any

from tracepipe.errors import RunFailed
from tracepipe.hub import push_output
from tracepipe.outputs._writer import write_output
from tracepipe.pipeline.frames import scan_parts
from tracepipe.secrets import Scrubber

#: set (to anything non-empty) to write outputs without pushing them
NO_PUSH_ENV = "TRACEPIPE_NO_PUSH"


def publish(
    parts: list[Any], recipe: Any, stats: Any = None,
) -> list[dict[str, Any]]:
    """Write (then push) every output of ``recipe`` from the final frame ``parts``; returns what
    each write gave (``write_output``'s dict, with ``push``: the push's lines, when it pushed).

    ``stats``: the run's :class:`~tracepipe.pipeline.stats.RunStats` (each output is appended to
    its ``outputs`` as it is written, so an output's ``stats.json`` lists the ones written before
    it), a plain dict, or None.
    No final parts (every row dropped, or no source rows): nothing is written.
    """
    if not parts:
        return []
    scrubber = Scrubber.for_recipe(recipe)
    final = scan_parts(parts)
    written: list[dict[str, Any]] = []
    for spec in recipe.outputs:
        snapshot = stats.to_dict() if hasattr(stats, "to_dict") else stats
        info = write_output(final, spec, recipe, snapshot, parts=parts, scrubber=scrubber)
        if spec.push is not None and not os.environ.get(NO_PUSH_ENV):
            info["push"] = push(recipe, spec, scrubber)
        written.append(info)
        if isinstance(getattr(stats, "outputs", None), list):
            stats.outputs.append(info)
    return written


def push(recipe: Any, spec: Any, scrubber: Scrubber | None = None) -> list[str]:
    """Push one written output (``outputs[].push``); a failed push fails the run with a
    :class:`~tracepipe.errors.RunFailed` whose message holds no secret."""
    scrubber = scrubber or Scrubber.for_recipe(recipe)
    try:
        return list(push_output(recipe, spec, scrubber=scrubber))
    except Exception as e:
        raise RunFailed(f"push of output {spec.path!r} failed: {scrubber.text(f'{type(e).__name__}: {e}')}") from None
