"""The experiments layer: recipes, trainers, evaluation tables and commands.

Each module here is ``python -m``-runnable, imports the paper modules of ``course_lib`` and is
never imported by them.
"""
