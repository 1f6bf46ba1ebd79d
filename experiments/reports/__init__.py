"""Report text, tables and plots of each runner (``reports.align``, ``reports.fusion``); shared helpers live in
:mod:`experiments.report`."""
