"""The run folder: the run context (``run.json``), the stages a run has, where intermediates live
under ``work/``, chunk lists, progress read from markers, and per-task usage."""
