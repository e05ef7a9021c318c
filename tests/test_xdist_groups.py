"""`make test` runs with ``--dist loadgroup`` so that the tests sharing an expensive module fixture (marked with one
``xdist_group``) run on one worker, which builds the fixture once. pytest-xdist 3.8 passes the group to its scheduler
by suffixing the node id, which pytest 9.2 ignores (pytest-dev/pytest-xdist#1386): the groups would then be spread over
the workers without a word, and each would build those fixtures again."""

import pytest


@pytest.mark.xdist_group("xdist_self_check")
def test_the_xdist_group_reaches_the_scheduler(request):
    if not getattr(request.config.option, "loadgroup", False):  # set by pytest-xdist on its workers
        pytest.skip("not run with --dist loadgroup (make test uses it)")
    assert request.node.nodeid.endswith("@xdist_self_check"), (
        f"pytest-xdist's loadgroup did not tag {request.node.nodeid!r}: the installed pytest ignores xdist_group "
        "(pytest-dev/pytest-xdist#1386); install the pytest pyproject.toml allows")
