"""pytest settings for the whole clone (tests/ and nbval's run of notebooks/).

nbval waits 5 seconds for each IOPub message of a cell (its outputs, the kernel's "idle"); the
value is fixed in its ``IPyNbCell`` and has no command-line option. On a busy machine a cell's
last output can come later than that, and nbval then fails the cell ("Timeout of 5 seconds
exceeded waiting for output") and stops the kernel. Every notebook cell waits as long as
``--nbval-cell-timeout`` allows a cell to run instead.
"""
from nbval.plugin import IPyNbCell


def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, IPyNbCell):
            item.output_timeout = config.option.nbval_cell_timeout
