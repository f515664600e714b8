"""The report stage: ``report.html`` and the node pages.

:mod:`hpcad.report.page` writes the report (``write_report``), :mod:`hpcad.report.nodes` the node
pages, :mod:`hpcad.report.plots` draws (the only module here that imports matplotlib) and
:mod:`hpcad.report.markup` builds the HTML (tables, the page).
"""
