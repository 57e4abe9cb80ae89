"""Tools on top of the API: the command line, the demo, benchmarks, reports and plots.

Nothing in Hyperion imports this package; it imports the layers below it.
"""
